"""`nanofleet round register-node`, `round start` and `round status`: federated rounds, on the
coordinator host.

Both read the coordinator's settings (``--config``, the file ``nanofleet serve`` reads, and
``NANOFLEET_`` variables): the registry (``database_url``), the repository
(``repository_path``) and its online keys (``keys``, which must hold the adapters key),
the release ``channel``, and the SuperLink (``[federation]``: ``superlink``, ``ca_file``,
``work_dir``). ``start`` drives :func:`coordinator.federation.campaign.run_round` with a
progress display on stderr; the run's base is the bundle the group's channel points at.
``register-node`` registers a device's SuperNode key with the SuperLink and binds the node
ID to the device: a run samples only the nodes bound to its group's devices.

With ``--json`` each command prints exactly one JSON document on stdout (errors too:
``{"error", "field", "message"}``).

Exit codes: 0 done; 1 the round failed (recorded ``failed`` with the reason, nothing
published); 64 a bad option value; 65 refused (unknown group or round, the group's channel
names no base, the release or round exists, waves that do not fit); 69 the database or the
SuperLink cannot be reached; 78 a bad or missing setting or signing key.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn
from rich.table import Table
from sqlalchemy.exc import OperationalError

from coordinator.errors import ConfigError, RefusedError, SigningKeyError
from coordinator.federation.accountant import noise_for_epsilon
from coordinator.federation.campaign import (
    AdapterRelease,
    Canary,
    QualityGate,
    RoundFailedError,
    RoundOutcome,
    Stage,
    run_round,
)
from coordinator.federation.nodes import register_device_node
from coordinator.federation.round_log import failure_reason
from coordinator.federation.rounds import RunSpec
from coordinator.federation.superlink import FlowerCli, RunFailedError
from coordinator.registry import (
    ConflictError,
    DeviceFilter,
    NotFoundError,
    Online,
    Registry,
    RoundMetricView,
    RoundView,
    open_registry,
)
from coordinator.repository import KeyRing, Repository, env_passphrases
from coordinator.settings import CoordinatorSettings, FederationSettings, load_settings
from coordinator.web.encode import release_json, rollout_json, round_json
from protocol.bundle import BundleManifest
from protocol.exitcodes import ExitCode
from protocol.rounds import MAX_ROUNDS

__all__ = ["round_app"]

round_app = typer.Typer(
    help="Federated rounds: start one on a group's devices, follow its figures.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        envvar="NANOFLEET_CONFIG",
        help="The coordinator's TOML settings (NANOFLEET_ variables override).",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document for scripts.")]

_ACTOR = "operator"


class _Out:
    """Where a command's result and errors go: rich on the terminal, or one JSON document."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.console = Console(soft_wrap=False, width=160)
        self.err = Console(stderr=True)

    def fail(self, code: ExitCode, field: str | None, message: str) -> NoReturn:
        if self.as_json:
            typer.echo(json.dumps({"error": code.name.lower(), "field": field, "message": message}))
        else:
            where = f"{field}: " if field else ""
            self.err.print(f"error: {where}{message}", markup=False, highlight=False)
        raise typer.Exit(code)

    def emit(self, data: Any) -> None:
        typer.echo(json.dumps(data, sort_keys=True))


class _Usage(Exception):
    """A bad option value: ``field`` names the option."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def _positive(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise _Usage(name, f"must be a finite number > 0, got {value}")


def plan_noise(
    *, epsilon: float | None, noise: float | None, sampling_rate: float, rounds: int, delta: float
) -> float:
    """The noise multiplier: ``noise`` as given, calibrated to ``epsilon``, or 0 (none).

    Raises:
        _Usage: both given, or a value out of range.
    """
    if epsilon is not None and noise is not None:
        raise _Usage("epsilon", "give --epsilon or --noise, not both")
    if not 0 < delta < 1:
        raise _Usage("delta", f"must lie in (0, 1), got {delta}")
    if noise is not None:
        if not (math.isfinite(noise) and 0 <= noise <= 1000):
            raise _Usage("noise", f"must lie in 0..1000, got {noise}")
        return noise
    if epsilon is None:
        return 0.0
    _positive("epsilon", epsilon)
    try:
        return noise_for_epsilon(epsilon, sampling_rate=sampling_rate, rounds=rounds, delta=delta)
    except ValueError as e:
        raise _Usage("epsilon", str(e)) from e


def default_cohort(counts: Mapping[Online, int]) -> int:
    """Devices per round when not given: the group's online devices (a round waits for its
    whole cohort to connect), or all registered ones when none is known to be online."""
    return counts.get(Online.ONLINE, 0) or sum(counts.values())


def _federation(settings: CoordinatorSettings) -> FederationSettings:
    if settings.federation is None:
        raise ConfigError(
            "federation: not configured; set [federation] superlink and ca_file "
            "(env NANOFLEET_FEDERATION__SUPERLINK, NANOFLEET_FEDERATION__CA_FILE)"
        )
    return settings.federation


def _open(settings: CoordinatorSettings, out: _Out) -> Registry:
    try:
        return open_registry(settings.database_url)
    except OperationalError as e:
        out.fail(ExitCode.UNAVAILABLE, "database_url", f"cannot open the registry: {e.orig}")


def _load(config: Path | None, out: _Out) -> CoordinatorSettings:
    try:
        return load_settings(config)
    except ConfigError as e:
        out.fail(ExitCode.CONFIG, "config", str(e))


def _group_base(repository: Repository, group: str, channel: str) -> BundleManifest:
    pointer = next(
        (p for p in repository.channels() if p.group == group and p.channel == channel), None
    )
    if pointer is None:
        raise RefusedError(
            f"group {group!r} has no {channel!r} channel in the repository: point it at the "
            "base model its devices run first (nanofleet release point)"
        )
    published = repository.find(pointer.base.name, pointer.base.version)
    if published is None:
        raise RefusedError(f"the base {pointer.base.name} {pointer.base.version} is not published")
    return published.manifest


class _RichProgress:
    """Draws the stages and each recorded round on stderr."""

    def __init__(self, bar: Progress, task: TaskID, console: Console) -> None:
        self._bar = bar
        self._task = task
        self._console = console

    def stage(self, stage: Stage) -> None:
        self._bar.update(self._task, description=stage.value)

    def round_recorded(self, metric: RoundMetricView) -> None:
        loss = f"{metric.loss:.4g}" if metric.loss is not None else "—"
        ppl = f"{metric.perplexity:.4g}" if metric.perplexity is not None else "—"
        self._console.print(
            f"round {metric.number}: {metric.participants} devices, loss {loss}, "
            f"held-out perplexity {ppl}",
            highlight=False,
        )
        self._bar.update(self._task, completed=metric.number)


class _Quiet:
    def stage(self, stage: Stage) -> None:
        pass

    def round_recorded(self, metric: RoundMetricView) -> None:
        pass


@round_app.command("start")
def round_start(
    group: Annotated[str, typer.Option("--group", help="The device group that trains.")],
    rounds: Annotated[int, typer.Option("--rounds", help="Rounds of the run (>= 1).")] = 3,
    rank: Annotated[int, typer.Option(help="Adapter rank (up to the base's maximum).")] = 8,
    clip: Annotated[float, typer.Option(help="L2 norm each device's update is clipped to.")] = 25.0,
    epsilon: Annotated[
        float | None,
        typer.Option(help="Privacy budget of the run: calibrates the noise (with --delta)."),
    ] = None,
    noise: Annotated[
        float | None,
        typer.Option(help="Noise multiplier instead of --epsilon (0: clipping only)."),
    ] = None,
    delta: Annotated[float, typer.Option(help="The delta of (epsilon, delta)-DP.")] = 1e-5,
    cohort: Annotated[
        int | None,
        typer.Option(
            help="Devices per round (default: the group's online devices, else all of them)."
        ),
    ] = None,
    min_nodes: Annotated[
        int | None,
        typer.Option("--min-nodes", help="Fewest devices a round needs (default: the cohort)."),
    ] = None,
    secaggplus: Annotated[
        bool,
        typer.Option(
            "--secaggplus/--no-secaggplus",
            help="Secure aggregation: the server sees only the sum (needs >= 3 devices).",
        ),
    ] = True,
    canary: Annotated[
        bool,
        typer.Option(
            "--canary/--no-canary",
            help="Roll the adapter out to --canary-devices first, then the rest, halting on a "
            "regression; without it the group's channel points at it at once.",
        ),
    ] = True,
    canary_devices: Annotated[
        int, typer.Option("--canary-devices", help="Devices in the first wave.")
    ] = 1,
    soak: Annotated[int, typer.Option(help="Seconds each wave soaks.")] = 600,
    max_eval_regression: Annotated[
        float,
        typer.Option(
            "--max-eval-regression",
            help="A wave halts the rollout when the devices' median held-out perplexity "
            "worsens by more than this (0.02 = 2 %).",
        ),
    ] = 0.02,
    max_ratio: Annotated[
        float,
        typer.Option(
            "--max-perplexity-ratio",
            help="Publish only if the aggregate's held-out perplexity over the base's, "
            "averaged over the devices in the last round, is at most this.",
        ),
    ] = 1.0,
    round_id: Annotated[
        str | None, typer.Option("--round-id", help="Run id (default: GROUP-<UTC time>).")
    ] = None,
    name: Annotated[
        str | None, typer.Option(help="Adapter bundle name (default: <group>-adapter).")
    ] = None,
    version: Annotated[
        str | None, typer.Option(help="Adapter bundle version (default: the run id).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the adapter's start.")] = 0,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Run a federated round on a group's devices and publish its adapter.

    The figures of each round go to the registry as they arrive. A good aggregate is signed
    with the adapters key and rolled out (canary first), or the channel points at it.
    """
    out = _Out(as_json)
    try:
        if not 1 <= rounds <= MAX_ROUNDS:
            raise _Usage("rounds", f"must lie in 1..{MAX_ROUNDS}, got {rounds}")
        if rank < 1:
            raise _Usage("rank", f"must be >= 1, got {rank}")
        _positive("clip", clip)
        _positive("max-perplexity-ratio", max_ratio)
        for option, value in (("cohort", cohort), ("min-nodes", min_nodes)):
            if value is not None and value < 1:
                raise _Usage(option, f"must be >= 1, got {value}")
        if not (math.isfinite(max_eval_regression) and max_eval_regression >= 0):
            raise _Usage("max-eval-regression", f"must be >= 0, got {max_eval_regression}")
        if noise is not None and epsilon is not None:
            raise _Usage("epsilon", "give --epsilon or --noise, not both")
        if epsilon is not None:
            _positive("epsilon", epsilon)
    except _Usage as e:
        out.fail(ExitCode.USAGE, e.field, e.message)

    settings = _load(config, out)
    try:
        federation = _federation(settings)
        if settings.keys is None:
            raise ConfigError("keys: the online keys' directory (with the adapters key) is needed")
    except ConfigError as e:
        out.fail(ExitCode.CONFIG, "config", str(e))
    registry = _open(settings, out)
    try:
        counts = registry.count_devices(DeviceFilter(group=group))
        members = sum(counts.values())
        if members == 0:
            out.fail(ExitCode.BAD_INPUT, "group", f"unknown group {group!r}: no registered devices")
        if cohort is not None and cohort > members:
            out.fail(
                ExitCode.USAGE,
                "cohort",
                f"{cohort} exceeds the group's {members} registered devices",
            )
        size = cohort or default_cohort(counts)
        try:
            spec = RunSpec(
                round_id=round_id or f"{group}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}",
                group=group,
                rounds=rounds,
                cohort_size=size,
                min_nodes=min_nodes or size,
                secaggplus=secaggplus,
                clip_norm=clip,
                noise_multiplier=plan_noise(
                    epsilon=epsilon,
                    noise=noise,
                    sampling_rate=min(1.0, size / members),
                    rounds=rounds,
                    delta=delta,
                ),
                delta=delta,
                sampling_rate=min(1.0, size / members),
                rank=rank,
                seed=seed,
                timeout_s=federation.run_timeout_s,
            )
        except _Usage as e:
            out.fail(ExitCode.USAGE, e.field, e.message)
        work_dir = federation.work_dir / spec.round_id
        if work_dir.exists():
            out.fail(ExitCode.BAD_INPUT, "round-id", f"{work_dir} exists: give a new --round-id")
        repository = Repository(
            settings.repository_path, KeyRing([settings.keys], env_passphrases())
        )
        driver = FlowerCli(
            federation.work_dir / "flwr-home", federation.superlink, federation.ca_file
        )
        if not driver.reachable():
            out.fail(
                ExitCode.UNAVAILABLE,
                "federation.superlink",
                f"the SuperLink at {federation.superlink} is not reachable",
            )
        outcome = _start(
            out,
            spec,
            registry=registry,
            repository=repository,
            driver=driver,
            work_dir=work_dir,
            release=AdapterRelease(
                name or f"{group.lower()}-adapter", version or spec.round_id, settings.channel
            ),
            canary=Canary(
                devices=canary_devices, soak_s=soak, max_eval_regression=max_eval_regression
            )
            if canary
            else None,
            gate=QualityGate(max_perplexity_ratio=max_ratio),
            poll_s=federation.poll_s,
        )
    finally:
        registry.engine.dispose()
    _report(out, outcome)


def _start(
    out: _Out,
    spec: RunSpec,
    *,
    registry: Registry,
    repository: Repository,
    driver: FlowerCli,
    work_dir: Path,
    release: AdapterRelease,
    canary: Canary | None,
    gate: QualityGate,
    poll_s: float,
) -> RoundOutcome:
    try:
        base = _group_base(repository, spec.group, release.channel)
        run = functools.partial(
            run_round,
            spec,
            base=base,
            registry=registry,
            repository=repository,
            driver=driver,
            work_dir=work_dir,
            release=release,
            canary=canary,
            gate=gate,
            actor=_ACTOR,
            poll_s=poll_s,
        )
        if out.as_json:
            return run(progress=_Quiet())
        with Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("rounds"),
            console=out.err,
            transient=True,
        ) as bar:
            task = bar.add_task("preflight", total=spec.rounds)
            out.err.print(
                f"round {spec.round_id}: group {spec.group}, {spec.rounds} rounds, cohort "
                f"{spec.cohort_size}, base {base.name} {base.version}",
                highlight=False,
            )
            return run(progress=_RichProgress(bar, task, out.err))
    except RoundFailedError as e:
        out.fail(ExitCode.FAILURE, e.stage.value, f"round {e.round_id} failed: {e.reason}")
    except SigningKeyError as e:
        out.fail(ExitCode.CONFIG, "keys", str(e))
    except RefusedError as e:
        out.fail(ExitCode.BAD_INPUT, None, str(e))


def _report(out: _Out, outcome: RoundOutcome) -> None:
    if out.as_json:
        out.emit(
            {
                "round": round_json(outcome.round),
                "release": release_json(outcome.release),
                "rollout": rollout_json(outcome.rollout) if outcome.rollout else None,
                "bundle_dir": str(outcome.bundle_dir),
            }
        )
        return
    _metrics_table(out.console, outcome.round)
    rel = outcome.release
    out.console.print(
        f"published {rel.name} {rel.version} (release {rel.id}, bundle "
        f"{rel.bundle_sha256[:12]}), signed with the adapters key",
        highlight=False,
    )
    if outcome.rollout is not None:
        waves = ", ".join(str(w.size) for w in outcome.rollout.waves)
        out.console.print(
            f"canary rollout {outcome.rollout.id} started: waves {waves}; follow it with "
            f"`nanofleet rollouts status {outcome.rollout.id}`",
            highlight=False,
        )
    else:
        out.console.print(f"the {outcome.round.group} group's channel points at it")


def _fmt(value: float | None) -> str:
    return f"{value:.4g}" if value is not None else "—"


def _metrics_table(console: Console, run: RoundView) -> None:
    table = Table(title=f"run {run.id} · group {run.group} · {run.state.value}")
    for column in ("round", "devices", "loss", "held-out perplexity", "recorded"):
        table.add_column(column)
    for m in run.metrics:
        table.add_row(
            str(m.number),
            str(m.participants),
            _fmt(m.loss),
            _fmt(m.perplexity),
            m.recorded_at.isoformat(timespec="seconds"),
        )
    console.print(table)


@round_app.command("register-node")
def round_register_node(
    device: Annotated[str, typer.Argument(help="The device id (registered in the registry).")],
    public_key: Annotated[
        Path,
        typer.Argument(
            help="The device's SuperNode public key (OpenSSH line; nanofleet-agent enroll "
            "writes it to flower/supernode.pub on the device)."
        ),
    ],
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Register a device's SuperNode key with the SuperLink and bind its node ID to the device.

    Only registered keys may connect, and a run samples only the nodes bound to the devices
    of its group. A device that made a new key is registered again with it.
    """
    out = _Out(as_json)
    settings = _load(config, out)
    try:
        federation = _federation(settings)
    except ConfigError as e:
        out.fail(ExitCode.CONFIG, "config", str(e))
    driver = FlowerCli(federation.work_dir / "flwr-home", federation.superlink, federation.ca_file)
    registry = _open(settings, out)
    try:
        if not driver.reachable():
            out.fail(
                ExitCode.UNAVAILABLE,
                "federation.superlink",
                f"the SuperLink at {federation.superlink} is not reachable",
            )
        try:
            node = register_device_node(registry, driver, device, public_key, actor=_ACTOR)
        except NotFoundError as e:
            out.fail(ExitCode.BAD_INPUT, "device", str(e))
        except RefusedError as e:
            out.fail(ExitCode.BAD_INPUT, "public_key", str(e))
        except (RunFailedError, ConflictError) as e:
            out.fail(ExitCode.BAD_INPUT, "public_key", f"the SuperLink refused the key: {e}")
    finally:
        registry.engine.dispose()
    if as_json:
        out.emit(
            {"device": node.device_id, "node_id": str(node.node_id), "key_sha256": node.key_sha256}
        )
        return
    out.console.print(
        f"{node.device_id}: SuperNode {node.node_id} (key sha256 {node.key_sha256[:16]}...)",
        highlight=False,
    )


@round_app.command("status")
def round_status(
    round_id: Annotated[
        str | None, typer.Argument(help="A run id: its per-round figures (default: all runs).")
    ] = None,
    group: Annotated[str | None, typer.Option(help="Only runs of this group.")] = None,
    limit: Annotated[int, typer.Option(help="Newest runs listed (1..1000).")] = 50,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List federated runs, or show one run's figures per round (and why it failed)."""
    out = _Out(as_json)
    if not 1 <= limit <= 1000:
        out.fail(ExitCode.USAGE, "limit", f"must lie in 1..1000, got {limit}")
    settings = _load(config, out)
    registry = _open(settings, out)
    try:
        if round_id is None:
            runs = registry.list_rounds(group=group, limit=limit)
            if as_json:
                out.emit({"rounds": [round_json(r) for r in runs]})
                return
            _runs_table(out.console, runs)
            return
        try:
            run = registry.get_round(round_id)
        except NotFoundError as e:
            out.fail(ExitCode.BAD_INPUT, "round_id", str(e))
        reason = failure_reason(registry, round_id)
    finally:
        registry.engine.dispose()
    if as_json:
        out.emit({**round_json(run), "failure_reason": reason})
        return
    manifest = run.manifest
    privacy = manifest.get("privacy") or {}
    epsilon = privacy.get("epsilon")
    out.console.print(
        f"[bold]{run.id}[/]: {len(run.metrics)} of {manifest.get('rounds')} rounds · cohort "
        f"{manifest.get('cohort_size')} · {manifest.get('aggregation', {}).get('kind')} · "
        f"clip {privacy.get('clip_norm')} · noise {privacy.get('noise_multiplier')} · "
        f"epsilon {'—' if epsilon is None else f'{epsilon:.3g}'}",
        highlight=False,
    )
    if reason is not None:
        out.console.print(f"[red]failed at {reason}[/]", highlight=False)
    _metrics_table(out.console, run)


def _runs_table(console: Console, runs: list[RoundView]) -> None:
    table = Table(title="federated runs")
    for column in ("run", "group", "state", "rounds", "loss", "perplexity", "started", "ended"):
        table.add_column(column)
    for run in runs:
        last = run.metrics[-1] if run.metrics else None
        table.add_row(
            run.id,
            run.group,
            run.state.value,
            f"{len(run.metrics)}/{run.manifest.get('rounds', '?')}",
            _fmt(last.loss if last else None),
            _fmt(last.perplexity if last else None),
            run.created_at.isoformat(timespec="seconds"),
            run.finished_at.isoformat(timespec="seconds") if run.finished_at else "—",
        )
    console.print(table)
