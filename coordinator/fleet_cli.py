"""`nanofleet devices ...` and `nanofleet rollouts ...`: the operator CLI over the HTTP API.

Every command talks to a running `nanofleet serve` (``--url``, env ``NANOFLEET_API_URL``)
with the operator token (``--token``, env ``NANOFLEET_API_TOKEN``), prints rich tables, and
with ``--json`` prints exactly one JSON document on stdout instead (errors too:
``{"error", "field", "message"}``), for scripts.

Exit codes: 0 done; 64 (usage) a missing token or URL; 65 (bad input) the coordinator
refused the request (the message names the field); 69 (unavailable) the coordinator could
not be reached.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Annotated, Any, NoReturn

import httpx
import typer
from rich.console import Console
from rich.progress_bar import ProgressBar
from rich.table import Table

from protocol.exitcodes import ExitCode

__all__ = ["devices_app", "rollouts_app"]

DEFAULT_URL = "http://127.0.0.1:8080"
_FINAL = {"halted", "aborted", "completed"}

devices_app = typer.Typer(
    help="The fleet's devices: list them, show one with its update history.",
    no_args_is_help=True,
)
rollouts_app = typer.Typer(
    help="Staged rollouts: start, status, pause, resume, abort, rollback.",
    no_args_is_help=True,
)

UrlOpt = Annotated[
    str, typer.Option("--url", envvar="NANOFLEET_API_URL", help="The coordinator's base URL.")
]
TokenOpt = Annotated[
    str | None,
    typer.Option("--token", envvar="NANOFLEET_API_TOKEN", help="The operator token."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document for scripts.")]


class _Api:
    def __init__(self, url: str, token: str | None, as_json: bool) -> None:
        self.as_json = as_json
        self.console = Console(stderr=False, soft_wrap=False, width=160)
        if not token:
            self.fail(
                ExitCode.USAGE,
                "token",
                "missing operator token: pass --token or set NANOFLEET_API_TOKEN",
            )
        if not url.startswith(("http://", "https://")):
            self.fail(ExitCode.USAGE, "url", f"--url {url!r} is not an http(s) URL")
        self._url = url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"}

    def fail(self, code: ExitCode, field: str | None, message: str) -> NoReturn:
        if self.as_json:
            typer.echo(json.dumps({"error": code.name.lower(), "field": field, "message": message}))
        else:
            where = f"{field}: " if field else ""
            typer.echo(f"error: {where}{message}", err=True)
        raise typer.Exit(code)

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            with httpx.Client(base_url=self._url, headers=self._headers, timeout=30.0) as client:
                response = client.request(method, f"/api/v1{path}", **kwargs)
        except httpx.HTTPError as e:
            self.fail(ExitCode.UNAVAILABLE, None, f"cannot reach the coordinator: {e}")
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail")
            except ValueError:
                detail = response.text[:300]
            if isinstance(detail, dict):
                self.fail(ExitCode.BAD_INPUT, detail.get("field"), str(detail.get("message")))
            if isinstance(detail, list) and detail:  # FastAPI's validation errors
                first = detail[0]
                loc = ".".join(str(p) for p in first.get("loc", ())[1:])
                self.fail(ExitCode.BAD_INPUT, loc or None, str(first.get("msg")))
            self.fail(ExitCode.BAD_INPUT, None, f"HTTP {response.status_code}: {detail}")
        return response.json()

    def emit(self, data: Any, render: Callable[[], None]) -> None:
        if self.as_json:
            typer.echo(json.dumps(data, sort_keys=True))
        else:
            render()


def _short(at: str | None) -> str:
    return at[:19].replace("T", " ") if at else "—"


def _version(d: dict[str, Any]) -> str:
    base = d.get("base")
    text = f"{base['name']} {base['version']}" if base else "—"
    adapter = d.get("adapter")
    return text + (f" + {adapter['name']} {adapter['version']}" if adapter else "")


# -- devices -----------------------------------------------------------------------------


@devices_app.command("list")
def devices_list(
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
    group: Annotated[str | None, typer.Option(help="Only members of this group.")] = None,
    tag: Annotated[str | None, typer.Option(help="Only devices with this tag.")] = None,
    online: Annotated[str | None, typer.Option(help="online, offline or unknown.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 100,
) -> None:
    """List devices: state, health, version, last seen."""
    api = _Api(url, token, as_json)
    params = {k: v for k, v in (("group", group), ("tag", tag), ("online", online)) if v}
    data = api.call("GET", "/devices", params={**params, "limit": limit})

    def render() -> None:
        table = Table(title=f"devices ({', '.join(f'{k} {v}' for k, v in data['counts'].items())})")
        for column in ("device", "groups", "state", "health", "version", "last seen"):
            table.add_column(column)
        for d in data["devices"]:
            table.add_row(
                d["id"],
                ", ".join(d["groups"]),
                d["online"],
                d["health"] or "—",
                _version(d),
                _short(d["last_seen"]),
            )
        api.console.print(table)

    api.emit(data, render)


@devices_app.command("show")
def devices_show(
    device_id: Annotated[str, typer.Argument(help="The device id.")],
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show one device and its update history."""
    api = _Api(url, token, as_json)
    data = api.call("GET", f"/devices/{device_id}")

    def render() -> None:
        d = data["device"]
        api.console.print(
            f"[bold]{d['id']}[/] groups {', '.join(d['groups']) or '—'} · {d['online']} · "
            f"health {d['health'] or '—'} · {_version(d)} · last seen {_short(d['last_seen'])}"
        )
        table = Table(title="update history")
        for column in ("rollout", "wave", "release", "state", "error", "changed"):
            table.add_column(column)
        for u in data["updates"]:
            table.add_row(
                str(u["rollout_id"]),
                str(u["wave"] + 1),
                f"{u['release']['name']} {u['release']['version']}",
                u["state"],
                u["error_code"] or "",
                _short(u["changed_at"]),
            )
        api.console.print(table)

    api.emit(data, render)


# -- rollouts ----------------------------------------------------------------------------


def _rollout_table(api: _Api, r: dict[str, Any]) -> None:
    rel = r["release"]
    api.console.print(
        f"[bold]rollout {r['id']}[/]: {rel['name']} {rel['version']} ({rel['kind']}) to "
        f"{r['target_count']} devices · [bold]{r['state']}[/]"
    )
    if r.get("halt_reason"):
        api.console.print(f"[red]halted:[/] {r['halt_reason']}")
    table = Table()
    for column in ("wave", "size", "devices", "state", "progress", "committed", "failed"):
        table.add_column(column)
    for w in r["waves"]:
        progress = w["progress"]
        done = progress.get("committed", 0)
        failed = progress.get("failed", 0) + progress.get("rolled_back", 0)
        total = max(w["device_count"], 1)
        table.add_row(
            str(w["position"] + 1),
            w["size"],
            str(w["device_count"]),
            w["state"],
            ProgressBar(total=total, completed=done + failed, width=24),
            str(done),
            str(failed),
        )
    api.console.print(table)


def _split(values: list[str]) -> list[str]:
    return [part.strip() for v in values for part in v.split(",") if part.strip()]


@rollouts_app.command("start")
def rollouts_start(
    release: Annotated[str, typer.Option(help="Release id or NAME:VERSION.")],
    group: Annotated[list[str], typer.Option(help="Target group (repeatable).")] = [],  # noqa: B006
    tag: Annotated[list[str], typer.Option(help="Target tag (repeatable).")] = [],  # noqa: B006
    device: Annotated[
        list[str], typer.Option(help="Target device ids (repeatable, or comma-separated).")
    ] = [],  # noqa: B006
    wave: Annotated[
        list[str], typer.Option(help="Wave size: '10%' or a count like '5' (repeatable).")
    ] = [],  # noqa: B006
    soak: Annotated[int, typer.Option(help="Soak time per wave (seconds).", min=0)] = 0,
    max_failure_rate: Annotated[float, typer.Option(help="Halt above this share (0..1).")] = 0.1,
    max_eval_regression: Annotated[
        float | None,
        typer.Option(help="Adapters: halt when the median metric worsens by more (0.05 = 5%)."),
    ] = None,
    wave_timeout: Annotated[int, typer.Option(help="Seconds a wave has to finish.")] = 3600,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Start a staged rollout of a release to groups, tags or listed devices."""
    api = _Api(url, token, as_json)
    body = {
        "release": release,
        "groups": _split(group),
        "tags": _split(tag),
        "devices": _split(device),
        "waves": _split(wave) or ["100%"],
        "soak_s": soak,
        "max_failure_rate": max_failure_rate,
        "max_eval_regression": max_eval_regression,
        "wave_timeout_s": wave_timeout,
    }
    data = api.call("POST", "/rollouts", json=body)
    api.emit(data, lambda: _rollout_table(api, data))


@rollouts_app.command("status")
def rollouts_status(
    rollout_id: Annotated[int | None, typer.Argument(help="Rollout id (omit: list).")] = None,
    watch: Annotated[bool, typer.Option(help="Refresh until the rollout ends.")] = False,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show a rollout's waves and progress, or list rollouts."""
    api = _Api(url, token, as_json)
    if rollout_id is None:
        data = api.call("GET", "/rollouts")

        def render_list() -> None:
            table = Table(title="rollouts")
            for column in ("id", "release", "state", "targets", "waves", "halt reason"):
                table.add_column(column)
            for r in data["rollouts"]:
                table.add_row(
                    str(r["id"]),
                    f"{r['release']['name']} {r['release']['version']}",
                    r["state"],
                    str(r["target_count"]),
                    " ".join(w["state"] for w in r["waves"]),
                    r.get("halt_reason") or "",
                )
            api.console.print(table)

        api.emit(data, render_list)
        return
    data = api.call("GET", f"/rollouts/{rollout_id}")
    while watch and not as_json and data["state"] not in _FINAL:
        _rollout_table(api, data)
        time.sleep(2.0)
        data = api.call("GET", f"/rollouts/{rollout_id}")

    def render() -> None:
        _rollout_table(api, data)
        table = Table(title="decisions")
        for column in ("at", "decision", "wave", "by", "reason"):
            table.add_column(column)
        for d in data.get("decisions", []):
            table.add_row(
                _short(d["at"]),
                d["kind"],
                "" if d["wave"] is None else str(d["wave"] + 1),
                d["actor"],
                d["reason"],
            )
        api.console.print(table)

    api.emit(data, render)


def _action(action: str) -> Callable[..., None]:
    def command(
        rollout_id: Annotated[int, typer.Argument(help="Rollout id.")],
        reason: Annotated[str | None, typer.Option(help="Why (kept in the log).")] = None,
        url: UrlOpt = DEFAULT_URL,
        token: TokenOpt = None,
        as_json: JsonOpt = False,
    ) -> None:
        api = _Api(url, token, as_json)
        body = {"reason": reason} if reason else {}
        data = api.call("POST", f"/rollouts/{rollout_id}/{action}", json=body)
        api.emit(data, lambda: _rollout_table(api, data))

    command.__doc__ = f"{action.capitalize()} a rollout."
    return command


for _name in ("pause", "resume", "abort"):
    rollouts_app.command(_name)(_action(_name))


@rollouts_app.command("rollback")
def rollouts_rollback(
    group: Annotated[str, typer.Option(help="The group to roll back.")],
    wave: Annotated[list[str], typer.Option(help="Wave sizes (repeatable).")] = [],  # noqa: B006
    soak: Annotated[int, typer.Option(min=0, help="Soak time per wave (seconds).")] = 0,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Roll a group back to its previous completed release."""
    api = _Api(url, token, as_json)
    body = {"group": group, "waves": _split(wave) or ["100%"], "soak_s": soak}
    data = api.call("POST", "/rollbacks", json=body)
    api.emit(data, lambda: _rollout_table(api, data))
