"""The dashboard: server-rendered, read-only HTML pages under ``/ui`` (no JavaScript).

Pages: the fleet (``/ui/``), a device and its update history (``/ui/devices/{id}``),
rollouts and one rollout's waves with their progress and decision log
(``/ui/rollouts/{id}``), federated runs and one run's plot of loss and perplexity per round
with participation, and why a failed run failed (``/ui/rounds/{id}``, inline SVG).

Access: the operator token, entered once on ``/ui/login`` and kept in an HttpOnly,
SameSite=Strict cookie (or sent as a bearer header). Every value that reaches the page is
escaped (:func:`html.escape`); the pages never change state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime
from html import escape
from typing import Final
from urllib.parse import parse_qs

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from coordinator.federation.round_log import failure_reason
from coordinator.registry import (
    DeviceFilter,
    DeviceView,
    NotFoundError,
    Online,
    Registry,
    RolloutView,
    RoundState,
    RoundView,
)
from coordinator.rollout.policy import FAILED_STATES
from coordinator.web.auth import COOKIE, TokenCheck
from protocol.messages import UpdateState

__all__ = ["UI_PREFIX", "dashboard_router", "round_plot_svg"]

UI_PREFIX: Final = "/ui"
_MAX_FORM_BYTES: Final = 8192

_CSS: Final = """
body{font-family:system-ui,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
header{background:#1d2330;color:#fff;padding:.6rem 1.2rem;display:flex;gap:1.4rem}
header a{color:#cfe0ff;text-decoration:none;font-weight:600}
main{padding:1rem 1.4rem}
table{border-collapse:collapse;background:#fff;width:100%;margin:.6rem 0 1.2rem}
th,td{border-bottom:1px solid #e3e6ea;padding:.35rem .6rem;text-align:left;font-size:.92rem}
th{background:#eef1f5}
.pill{border-radius:.7rem;padding:.05rem .55rem;font-size:.82rem;font-weight:600}
.online,.passed,.completed,.healthy,.committed{background:#d9f5df;color:#17612b}
.offline,.failed,.halted,.unhealthy,.rolled_back,.aborted{background:#fde0e0;color:#8a1c1c}
.unknown,.pending,.cancelled,.paused{background:#eceff3;color:#4b5563}
.running,.degraded,.starting{background:#fff1cc;color:#7a5600}
.bar{display:flex;height:.8rem;width:14rem;background:#eceff3;border-radius:.3rem;overflow:hidden}
.bar span{display:block;height:100%}
.ok{background:#34a853}.bad{background:#d93025}.busy{background:#f4b400}
.cards{display:flex;gap:1rem}.card{background:#fff;padding:.6rem 1rem;border-radius:.4rem}
.card b{font-size:1.4rem;display:block}
.reason{background:#fff4f4;border-left:4px solid #d93025;padding:.5rem .8rem}
"""


#: Every page reloads itself this often, so a rollout or a round can be watched.
REFRESH_S = 10


def _page(title: str, body: str, *, refresh: bool = True) -> HTMLResponse:
    reload = f"<meta http-equiv='refresh' content='{REFRESH_S}'>" if refresh else ""
    html = (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"{reload}"
        f"<title>{escape(title)} · nanofleet</title><style>{_CSS}</style></head><body>"
        f"<header><a href='{UI_PREFIX}/'>Fleet</a><a href='{UI_PREFIX}/rollouts'>Rollouts</a>"
        f"<a href='{UI_PREFIX}/rounds'>Rounds</a></header><main><h1>{escape(title)}</h1>"
        f"{body}</main></body></html>"
    )
    return HTMLResponse(html, headers={"Cache-Control": "no-store"})


def _pill(value: str | None) -> str:
    text = value or "—"
    return f"<span class='pill {escape(text)}'>{escape(text)}</span>"


def _when(at: datetime | None) -> str:
    return escape(at.strftime("%Y-%m-%d %H:%M:%S UTC")) if at else "—"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], css_id: str) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table id='{css_id}'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _version(device: DeviceView) -> str:
    parts = []
    if device.base:
        parts.append(f"{device.base.name} {device.base.version}")
    if device.adapter:
        parts.append(f"+ {device.adapter.name} {device.adapter.version}")
    return escape(" ".join(parts)) or "—"


def _device_link(device_id: str) -> str:
    return f"<a href='{UI_PREFIX}/devices/{escape(device_id)}'>{escape(device_id)}</a>"


def _progress_bar(progress: dict[UpdateState, int], total: int) -> str:
    done = progress.get(UpdateState.COMMITTED, 0)
    failed = sum(n for s, n in progress.items() if s in FAILED_STATES)
    busy = sum(progress.values()) - done - failed
    if total == 0:
        return ""
    spans = "".join(
        f"<span class='{css}' style='width:{100 * n / total:.1f}%'></span>"
        for css, n in (("ok", done), ("bad", failed), ("busy", busy))
        if n
    )
    return (
        f"<div class='bar' title='{done} committed, {failed} failed, {busy} updating'>{spans}</div>"
        f" {done}/{total} committed, {failed} failed"
    )


def _rounds_done(run: RoundView) -> str:
    """Rounds recorded over rounds planned, e.g. ``2/5``."""
    planned = run.manifest.get("rounds")
    return f"{len(run.metrics)}/{planned}" if isinstance(planned, int) else str(len(run.metrics))


def round_plot_svg(run: RoundView, width: int = 640, height: int = 260) -> str:
    """An inline SVG: loss and perplexity per round (lines) and participants (bars)."""
    metrics = run.metrics
    if not metrics:
        return "<p>No rounds recorded yet.</p>"
    pad_l, pad_r, pad_t, pad_b = 48, 48, 16, 32
    plot_w, plot_h = width - pad_l - pad_r, height - pad_t - pad_b
    n = len(metrics)

    def x(i: int) -> float:
        return pad_l + (plot_w * (i + 0.5) / n)

    parts = [
        f"<svg id='round-plot' xmlns='http://www.w3.org/2000/svg' width='{width}' "
        f"height='{height}' viewBox='0 0 {width} {height}' role='img' "
        f"aria-label='loss and perplexity per round'>",
        f"<rect x='{pad_l}' y='{pad_t}' width='{plot_w}' height='{plot_h}' fill='#fff' "
        "stroke='#c8ccd2'/>",
    ]
    most = max(m.participants for m in metrics) or 1
    bar_w = plot_w / n * 0.5
    for i, m in enumerate(metrics):
        h = plot_h * m.participants / most
        parts.append(
            f"<rect class='participation' x='{x(i) - bar_w / 2:.1f}' "
            f"y='{pad_t + plot_h - h:.1f}' width='{bar_w:.1f}' height='{h:.1f}' "
            f"fill='#dbe5f5'><title>round {m.number}: {m.participants} participants</title></rect>"
        )
        parts.append(
            f"<text x='{x(i):.1f}' y='{height - 12}' font-size='11' text-anchor='middle'>"
            f"{m.number}</text>"
        )
    for name, color, values in (
        ("loss", "#d93025", [m.loss for m in metrics]),
        ("perplexity", "#1a73e8", [m.perplexity for m in metrics]),
    ):
        points = [(i, v) for i, v in enumerate(values) if v is not None and math.isfinite(v)]
        if not points:
            continue
        low, high = min(v for _, v in points), max(v for _, v in points)
        span = (high - low) or 1.0

        def y(v: float, low: float = low, span: float = span) -> float:
            return pad_t + plot_h - plot_h * 0.9 * (v - low) / span - plot_h * 0.05

        path = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in points)
        parts.append(
            f"<polyline class='{name}' points='{path}' fill='none' stroke='{color}' "
            "stroke-width='2'/>"
        )
        for i, v in points:
            parts.append(
                f"<circle cx='{x(i):.1f}' cy='{y(v):.1f}' r='3' fill='{color}'>"
                f"<title>{name} {v:.4g}</title></circle>"
            )
    parts.append(
        f"<text x='{pad_l}' y='{height - 2}' font-size='11'>round</text>"
        f"<text x='{width - pad_r + 4}' y='{pad_t + 12}' font-size='11' fill='#d93025'>loss</text>"
        f"<text x='{width - pad_r + 4}' y='{pad_t + 26}' font-size='11' fill='#1a73e8'>ppl</text>"
        f"<text x='{width - pad_r + 4}' y='{pad_t + 40}' font-size='11' fill='#6b7a90'>"
        f"clients</text></svg>"
    )
    return "".join(parts)


def _rollout_row(r: RolloutView) -> list[str]:
    return [
        f"<a href='{UI_PREFIX}/rollouts/{r.id}'>#{r.id}</a>",
        escape(f"{r.release.name} {r.release.version} ({r.release.kind.value})"),
        _pill(r.state.value),
        str(r.target_count),
        " → ".join(_pill(w.state.value) for w in r.waves),
        _when(r.created_at),
    ]


def dashboard_router(registry: Registry, token: str) -> APIRouter:
    """The ``/ui`` pages over ``registry``, for holders of ``token``."""
    check = TokenCheck(token, allow_cookie=True)
    router = APIRouter(prefix=UI_PREFIX, include_in_schema=False)

    def guard(request: Request) -> None:
        if not check.matches(check.presented(request)):
            raise HTTPException(303, headers={"Location": f"{UI_PREFIX}/login"})

    authed = [Depends(guard)]

    @router.get("/login")
    def login_form(failed: bool = False) -> HTMLResponse:
        note = "<p class='reason'>That token is not right.</p>" if failed else ""
        return _page(
            "Sign in",
            f"{note}<form method='post' action='{UI_PREFIX}/login'>"
            "<label>Operator token <input type='password' name='token' id='token' "
            "autocomplete='current-password'></label> <button type='submit'>Sign in</button>"
            "</form>",
            refresh=False,
        )

    @router.post("/login")
    async def login(request: Request) -> Response:
        raw = await request.body()
        if len(raw) > _MAX_FORM_BYTES:
            raise HTTPException(413, detail="form too large")
        presented = parse_qs(raw.decode("utf-8", "replace")).get("token", [""])[0]
        if not check.matches(presented):
            return RedirectResponse(f"{UI_PREFIX}/login?failed=true", status_code=303)
        response = RedirectResponse(f"{UI_PREFIX}/", status_code=303)
        response.set_cookie(
            COOKIE,
            presented,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            path=UI_PREFIX,
        )
        return response

    @router.get("/", dependencies=authed)
    def fleet(group: str | None = None) -> HTMLResponse:
        where = DeviceFilter(group=group, limit=1000)
        counts = registry.count_devices(DeviceFilter(group=group))
        devices = registry.list_devices(where)
        cards = "".join(
            f"<div class='card' id='count-{s.value}'><b>{counts[s]}</b>{s.value}</div>"
            for s in (Online.ONLINE, Online.OFFLINE, Online.UNKNOWN)
        )
        rows = [
            [
                _device_link(d.id),
                escape(", ".join(d.groups)),
                _pill(d.online.value),
                _pill(d.health.value if d.health else None),
                _version(d),
                _when(d.last_seen),
            ]
            for d in devices
        ]
        table = _table(
            ["device", "groups", "state", "health", "version", "last seen"], rows, "devices"
        )
        return _page("Fleet", f"<div class='cards'>{cards}</div>{table}")

    @router.get("/devices/{device_id}", dependencies=authed)
    def device(device_id: str) -> HTMLResponse:
        try:
            d = registry.get_device(device_id)
        except NotFoundError as e:
            raise HTTPException(404, detail=str(e)) from e
        facts = _table(
            ["state", "health", "version", "agent", "slot", "last seen"],
            [
                [
                    _pill(d.online.value),
                    _pill(d.health.value if d.health else None),
                    _version(d),
                    escape(d.agent_version or "—"),
                    escape(d.slot.value if d.slot else "—"),
                    _when(d.last_seen),
                ]
            ],
            "device",
        )
        history = _table(
            ["rollout", "wave", "release", "state", "error", "evaluation", "changed"],
            [
                [
                    f"<a href='{UI_PREFIX}/rollouts/{u.rollout_id}'>#{u.rollout_id}</a>",
                    str(u.wave + 1),
                    escape(f"{u.release.name} {u.release.version}"),
                    _pill(u.state.value),
                    escape(u.error_code or ""),
                    escape(
                        f"{u.baseline:.3g} → {u.candidate:.3g}"
                        if u.baseline is not None and u.candidate is not None
                        else ""
                    ),
                    _when(u.changed_at),
                ]
                for u in registry.device_updates(device_id)
            ],
            "history",
        )
        return _page(f"Device {device_id}", f"{facts}<h2>Update history</h2>{history}")

    @router.get("/rollouts", dependencies=authed)
    def rollouts() -> HTMLResponse:
        rows = [_rollout_row(r) for r in registry.list_rollouts(limit=200)]
        headers = ["rollout", "release", "state", "targets", "waves", "created"]
        return _page("Rollouts", _table(headers, rows, "rollouts"))

    @router.get("/rollouts/{rollout_id}", dependencies=authed)
    def rollout(rollout_id: int) -> HTMLResponse:
        try:
            r = registry.get_rollout(rollout_id)
        except NotFoundError as e:
            raise HTTPException(404, detail=str(e)) from e
        halted = r.halted_wave
        reason = (
            f"<p class='reason' id='halt-reason'>Halted: {escape(halted.reason or '')}</p>"
            if halted is not None
            else ""
        )
        t = r.thresholds
        summary = (
            f"<p>{escape(r.release.name)} {escape(r.release.version)} "
            f"({escape(r.release.kind.value)}) to {r.target_count} devices · state "
            f"{_pill(r.state.value)} · failure threshold {t.max_failure_rate:.0%}"
            + (
                f" · evaluation regression threshold {t.max_eval_regression:.0%}"
                if t.max_eval_regression is not None
                else ""
            )
            + "</p>"
        )
        waves = _table(
            ["wave", "size", "devices", "state", "progress", "reason"],
            [
                [
                    str(w.position + 1),
                    escape(str(w.size)),
                    str(w.device_count),
                    _pill(w.state.value),
                    _progress_bar(dict(w.progress), w.device_count),
                    escape(w.reason or ""),
                ]
                for w in r.waves
            ],
            "waves",
        )
        log = _table(
            ["at", "decision", "wave", "by", "reason"],
            [
                [
                    _when(d.at),
                    escape(d.kind),
                    str(d.wave + 1) if d.wave is not None else "",
                    escape(d.actor),
                    escape(d.reason),
                ]
                for d in registry.rollout_decisions(rollout_id)
            ],
            "decisions",
        )
        return _page(f"Rollout #{r.id}", f"{summary}{reason}{waves}<h2>Decisions</h2>{log}")

    @router.get("/rounds", dependencies=authed)
    def rounds() -> HTMLResponse:
        rows = [
            [
                f"<a href='{UI_PREFIX}/rounds/{escape(run.id)}'>{escape(run.id)}</a>",
                escape(run.group),
                _pill(run.state.value),
                _rounds_done(run),
                _when(run.created_at),
            ]
            for run in registry.list_rounds(limit=200)
        ]
        return _page(
            "Federated rounds",
            _table(["run", "group", "state", "rounds", "started"], rows, "rounds"),
        )

    @router.get("/rounds/{round_id}", dependencies=authed)
    def round_page(round_id: str) -> HTMLResponse:
        try:
            run = registry.get_round(round_id)
        except NotFoundError as e:
            raise HTTPException(404, detail=str(e)) from e
        table = _table(
            ["round", "loss", "perplexity", "participants"],
            [
                [
                    str(m.number),
                    f"{m.loss:.4g}" if m.loss is not None else "—",
                    f"{m.perplexity:.4g}" if m.perplexity is not None else "—",
                    str(m.participants),
                ]
                for m in run.metrics
            ],
            "metrics",
        )
        why = failure_reason(registry, round_id) if run.state is RoundState.FAILED else None
        reason = f"<p class='reason' id='failure-reason'>Failed at {escape(why)}</p>" if why else ""
        return _page(
            f"Run {run.id}",
            f"<p>group {escape(run.group)} · {_pill(run.state.value)} · "
            f"{_rounds_done(run)} rounds</p>{reason}{round_plot_svg(run)}{table}",
        )

    return router
