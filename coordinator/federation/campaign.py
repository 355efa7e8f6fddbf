"""The operator's federated round: record it, run it, gate it, sign it, roll it out.

:func:`run_round` is the one entry point (``nanofleet round start`` and the demo call it).
The registry, the repository, Flower (a :class:`~coordinator.federation.superlink.
FlowerDriver`) and the progress display are passed in; nothing here reads settings,
prints, or imports typer or rich.

Steps, in order:

1. **Preflight**, before anything is recorded or any device trains: the run fits the base
   model (:func:`~coordinator.federation.rounds.plan_manifest`), the group has registered
   devices and at least a cohort of them have a SuperNode bound (the run samples only
   those node IDs, so another group's devices never train on this group's run), the base
   is published in the repository, the signing keys the release needs open, the release
   name and version are free, and the canary's waves fit the group.
2. **Record** the run (``running``) with its planned manifest.
3. **Run** it on the SuperLink in a worker thread while this thread records each round's
   figures from the ServerApp's ``metrics.jsonl`` as they appear (every ``poll_s``), so
   ``nanofleet round status`` and the dashboard show progress live.
4. **Gate**: the last round's evaluation of the aggregate on the devices' held-out text
   (mean ratio of adapted to base perplexity) must be at most
   :attr:`QualityGate.max_perplexity_ratio`; no evaluation is no evidence and fails too.
5. **Publish**: package the adapter bundle (bound to the base's hash, the round manifest as
   provenance), sign it into the repository with the adapters key, record the release;
   then either create a canary rollout of it (the group's channel pointer is left alone:
   the rollout's waves point each device at it) or, without a canary, point the group's
   channel at it.
6. **Finish** the run (``finished``, with its final manifest).

Invariants:

- a run recorded in the registry always ends ``finished`` or ``failed``; a failed run has an
  audit entry ``round.fail`` with the stage and the reason (:func:`failure_reason`);
- nothing reaches a device unless every step before the last one succeeded: a bundle that is
  signed but that no pointer or rollout names is never installed by any device.
"""

from __future__ import annotations

import contextlib
import json
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, Final, Protocol

from tuf.api.metadata import Root, Targets

from coordinator.errors import CoordinatorError, RefusedError, SigningKeyError
from coordinator.federation.round_log import failure_reason, record_failure
from coordinator.federation.rounds import (
    METRICS_FILE,
    RunResult,
    RunSpec,
    package_adapter,
    plan_manifest,
    run_output_dir,
    run_personalization,
)
from coordinator.federation.superlink import FlowerDriver
from coordinator.registry import (
    DeviceFilter,
    NotFoundError,
    Registry,
    ReleaseView,
    RolloutSpec,
    RolloutView,
    RoundMetricView,
    RoundState,
    RoundView,
    Selector,
)
from coordinator.repository import PublishedBundle, Repository
from coordinator.rollout.policy import SizeUnit, Thresholds, WaveSize, WaveSpec, allocate
from protocol.bundle import BundleKind, BundleManifest, bundle_hash
from protocol.rounds import RoundManifest

__all__ = [
    "AdapterRelease",
    "Canary",
    "QualityGate",
    "RoundFailedError",
    "RoundMetric",
    "RoundOutcome",
    "RoundProgress",
    "Stage",
    "failure_reason",
    "metric_of",
    "run_round",
]

#: The largest epsilon a round manifest records (:class:`protocol.rounds.Privacy`): a run
#: whose noise would spend more is refused before any device trains.
MAX_EPSILON: Final = 1000.0


class Stage(StrEnum):
    """Where a round is; a failure names the stage it happened in."""

    PREFLIGHT = "preflight"
    RUN = "run"
    GATE = "gate"
    PACKAGE = "package"
    SIGN = "sign"
    RELEASE = "release"
    ROLLOUT = "rollout"
    FINISH = "finish"


@dataclass(frozen=True)
class AdapterRelease:
    """What the round's adapter is published as: bundle ``name`` (lowercase) and ``version``,
    and the ``channel`` pointed at it when there is no canary."""

    name: str
    version: str
    channel: str = "stable"


@dataclass(frozen=True)
class Canary:
    """A canary rollout of the adapter to the run's group: ``devices`` first, then the rest,
    each wave soaking ``soak_s``; a wave halts the rollout when its median held-out
    perplexity worsens by more than ``max_eval_regression`` or more than
    ``max_failure_rate`` of its devices fail."""

    devices: int = 1
    soak_s: int = 600
    max_eval_regression: float = 0.02
    max_failure_rate: float = 0.0
    wave_timeout_s: int = 3600

    def waves(self, targets: int) -> tuple[WaveSpec, ...]:
        """The waves for ``targets`` devices: one wave when the canary would be all of them.

        Raises:
            PlanError: a wave size or soak time out of range.
        """
        rest = WaveSpec(WaveSize(SizeUnit.PERCENT, 100), self.soak_s)
        if targets <= self.devices:
            return (rest,)
        return (WaveSpec(WaveSize(SizeUnit.COUNT, self.devices), self.soak_s), rest)

    def thresholds(self) -> Thresholds:
        """Raises PlanError for a threshold out of range."""
        return Thresholds(
            max_failure_rate=self.max_failure_rate,
            max_eval_regression=self.max_eval_regression,
            wave_timeout_s=self.wave_timeout_s,
        )


@dataclass(frozen=True)
class QualityGate:
    """What the aggregate must show before it is published: the last round's mean ratio of
    held-out perplexity with the adapter to without it, over the evaluating devices."""

    max_perplexity_ratio: float = 1.0

    def check(self, rows: Sequence[Mapping[str, Any]]) -> str | None:
        """The reason the run's figures fail the gate, or None when they pass."""
        if not rows:
            return "the run recorded no rounds"
        last = rows[-1]
        ratio = last.get("perplexity_ratio")
        if not isinstance(ratio, int | float) or not math.isfinite(ratio):
            return f"round {last.get('round')}: no finite evaluation of the aggregate"
        if ratio > self.max_perplexity_ratio:
            return (
                f"round {last.get('round')}: the aggregate's held-out perplexity ratio "
                f"{ratio:.4f} exceeds {self.max_perplexity_ratio:.4f}"
            )
        return None


@dataclass(frozen=True)
class RoundMetric:
    """One round's figures as the registry records them."""

    number: int
    participants: int
    loss: float | None
    perplexity: float | None


def _figure(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) and value >= 0 else None


def metric_of(row: Mapping[str, Any]) -> RoundMetric:
    """Map one ``metrics.jsonl`` row of the ServerApp to the registry's figures: the devices
    whose update was aggregated, their mean training loss, and the perplexity of the
    aggregate on their held-out text (an infinite or missing figure is ``None``).

    Raises:
        RefusedError: the row has no round number >= 1.
    """
    number = row.get("round")
    if isinstance(number, bool) or not isinstance(number, int) or number < 1:
        raise RefusedError(f"metrics row without a round number: {dict(row)!r:.200}")
    participants = row.get("fit_results", 0)
    if isinstance(participants, bool) or not isinstance(participants, int):
        participants = 0
    return RoundMetric(
        number=number,
        participants=max(0, participants),
        loss=_figure(row.get("train_loss")),
        perplexity=_figure(row.get("eval_perplexity")),
    )


class RoundProgress(Protocol):
    """What a display learns while :func:`run_round` works (called from its thread)."""

    def stage(self, stage: Stage) -> None:
        """A stage begins."""

    def round_recorded(self, metric: RoundMetricView) -> None:
        """A round's figures were recorded in the registry."""


class _Silent:
    def stage(self, stage: Stage) -> None:
        pass

    def round_recorded(self, metric: RoundMetricView) -> None:
        pass


class RoundFailedError(CoordinatorError):
    """The round failed at ``stage``; it is recorded ``failed`` with ``reason``."""

    def __init__(self, round_id: str, stage: Stage, reason: str) -> None:
        super().__init__(f"round {round_id} failed at {stage.value}: {reason}")
        self.round_id = round_id
        self.stage = stage
        self.reason = reason


@dataclass(frozen=True)
class RoundOutcome:
    """A finished round: its registry record, the run, the signed bundle, the release, and
    the canary rollout (None without one)."""

    round: RoundView
    result: RunResult
    bundle_dir: Path
    published: PublishedBundle
    release: ReleaseView
    rollout: RolloutView | None


class _MetricsTail:
    """Reads the complete lines appended to a JSON-lines file since the last call."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._offset = 0

    def read_new(self) -> list[dict[str, Any]]:
        try:
            with open(self._path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1
        self._offset += end
        rows = []
        for line in data[:end].splitlines():
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a torn line is read whole at the end from the result
        return rows


def _signing_roles(canary: Canary | None) -> tuple[str, ...]:
    # The adapters key signs the bundle; without a canary the channels key moves the
    # group's pointer (with one, the rollout's waves move device pointers later).
    online = ("adapters", "snapshot", "timestamp")
    return online if canary is not None else (*online, "channels")


def _check_keys(repository: Repository, roles: tuple[str, ...]) -> None:
    ring = repository.keys
    if ring is None:
        raise SigningKeyError("no signing keys given: the adapters key signs the round's adapter")
    root = repository.root().signed
    targets = repository.targets().signed
    for role in roles:
        delegator: Root | Targets = root if role in ("snapshot", "timestamp") else targets
        trusted = delegator.get_delegated_role(role)
        usable = sum(ring.signer(keyid) is not None for keyid in trusted.keyids)
        if usable < trusted.threshold:
            raise SigningKeyError(
                f"the {role} role needs {trusted.threshold} key(s) the repository trusts; "
                f"{usable} found in {', '.join(str(d) for d in ring.dirs)}"
            )


def _preflight(
    spec: RunSpec,
    base: BundleManifest,
    registry: Registry,
    repository: Repository,
    release: AdapterRelease,
    canary: Canary | None,
    started_at: datetime,
) -> tuple[RunSpec, RoundManifest]:
    """The run with its group's SuperNodes, and its planned manifest."""
    manifest = plan_manifest(spec, base, started_at)
    epsilon = spec.epsilon()
    if epsilon is not None and epsilon > MAX_EPSILON:
        raise RefusedError(
            f"noise multiplier {spec.noise_multiplier:g} over {spec.rounds} round(s) spends "
            f"epsilon {epsilon:.4g} at delta {spec.delta:g}, over the limit of {MAX_EPSILON:g} "
            "a round manifest records; add noise (or train without noise, clipping only)"
        )
    counts = registry.count_devices(DeviceFilter(group=spec.group))
    members = sum(counts.values())
    if members == 0:
        raise RefusedError(f"group {spec.group!r} has no registered devices")
    nodes = tuple(n.node_id for n in registry.federation_nodes(spec.group))
    if len(nodes) < spec.cohort_size:
        raise RefusedError(
            f"group {spec.group!r}: {len(nodes)} of its {members} devices have a SuperNode "
            f"bound, fewer than the cohort of {spec.cohort_size} (register them with "
            "nanofleet round register-node)"
        )
    published = repository.find(base.name, base.version)
    if published is None or published.sha256 != bundle_hash(base):
        raise RefusedError(
            f"the base {base.name} {base.version} is not published in the repository: "
            "the adapter must be bound to a base the devices can verify"
        )
    if published.manifest.kind is not BundleKind.BASE:
        raise RefusedError(f"{base.name} {base.version} is not a base bundle")
    _check_keys(repository, _signing_roles(canary))
    if repository.find(release.name, release.version) is not None:
        raise RefusedError(f"{release.name} {release.version} is already published")
    try:
        registry.find_release(release.name, release.version)
    except NotFoundError:
        pass
    else:
        raise RefusedError(f"release {release.name} {release.version} is already recorded")
    if canary is not None:
        allocate(members, canary.waves(members))
        canary.thresholds()
    return replace(spec, nodes=nodes), manifest


def _run_streaming(
    spec: RunSpec,
    base: BundleManifest,
    driver: FlowerDriver,
    run_dir: Path,
    started_at: datetime,
    record: Callable[[Mapping[str, Any]], None],
    poll_s: float,
) -> RunResult:
    """Run in a worker thread; record new metrics rows here until it ends, then the rest."""
    outcome: dict[str, Any] = {}
    done = threading.Event()

    def work() -> None:
        try:
            outcome["result"] = run_personalization(
                spec, base, driver, run_dir, started_at=started_at
            )
        except BaseException as e:  # handed to the caller's thread below
            outcome["error"] = e
        finally:
            done.set()

    worker = threading.Thread(target=work, name=f"round-{spec.round_id}", daemon=True)
    tail = _MetricsTail(run_output_dir(run_dir) / METRICS_FILE)
    worker.start()
    while not done.wait(poll_s):
        for row in tail.read_new():
            # A row that cannot be recorded now is recorded from the result at the end
            # (where a lasting failure is raised); the run goes on meanwhile.
            with contextlib.suppress(Exception):
                record(row)
    worker.join()
    if "error" in outcome:
        for row in tail.read_new():  # what the run wrote before it failed
            with contextlib.suppress(Exception):
                record(row)
        raise outcome["error"]
    result: RunResult = outcome["result"]
    for row in result.rounds:  # the whole file, as the run read it: nothing is missed
        record(row)
    return result


def run_round(
    spec: RunSpec,
    *,
    base: BundleManifest,
    registry: Registry,
    repository: Repository,
    driver: FlowerDriver,
    work_dir: Path,
    release: AdapterRelease,
    canary: Canary | None = None,
    gate: QualityGate | None = None,
    actor: str = "operator",
    progress: RoundProgress | None = None,
    poll_s: float = 1.0,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> RoundOutcome:
    """Run a personalization round end to end (see the module docstring for the steps).

    ``spec`` names the run (its ``round_id`` is the registry's key), the group and the
    training and privacy settings; ``base`` is the base bundle the group's devices run (it
    must be published in ``repository``, whose key ring must hold the adapters, snapshot and
    timestamp keys, and the channels key without a canary). ``work_dir`` receives the Flower
    app and output (``run/``) and the adapter bundle (``bundle/``); it should be new for each
    round.
    ``driver`` submits the run to a SuperLink. ``progress`` hears of each stage and each
    round's recorded figures, from the calling thread.

    Raises:
        RefusedError: preflight refused the request before anything was recorded: the spec
            does not fit the base, the group has no devices or fewer SuperNodes bound than
            the cohort, the base is not published,
            the release exists, or the canary's waves do not fit the group (``PlanError``).
        SigningKeyError: a key the release needs is missing or locked (before the run).
        ConflictError: a run with this id is already recorded.
        RoundFailedError: the run, the quality gate or publishing failed; the round is
            recorded ``failed`` with the reason and nothing reaches a device.
    """
    show = progress or _Silent()
    gate = gate or QualityGate()
    started_at = clock()
    show.stage(Stage.PREFLIGHT)
    spec, manifest = _preflight(spec, base, registry, repository, release, canary, started_at)
    registry.create_round(manifest, actor=actor)
    recorded: dict[int, RoundMetric] = {}

    def record(row: Mapping[str, Any]) -> None:
        metric = metric_of(row)
        if recorded.get(metric.number) == metric:
            return
        view = registry.record_round_metric(
            spec.round_id,
            metric.number,
            participants=metric.participants,
            loss=metric.loss,
            perplexity=metric.perplexity,
        )
        recorded[metric.number] = metric
        show.round_recorded(view)

    stage = Stage.RUN
    finished: RoundManifest | None = None
    try:
        show.stage(stage)
        result = _run_streaming(spec, base, driver, work_dir / "run", started_at, record, poll_s)
        finished = result.manifest
        stage = Stage.GATE
        show.stage(stage)
        refused = gate.check(result.rounds)
        if refused is not None:
            raise RefusedError(refused)
        stage = Stage.PACKAGE
        show.stage(stage)
        bundle_dir = work_dir / "bundle"
        package_adapter(result, base, bundle_dir, name=release.name, version=release.version)
        stage = Stage.SIGN
        show.stage(stage)
        published = repository.add_bundle(bundle_dir)
        stage = Stage.RELEASE
        show.stage(stage)
        release_view = registry.create_release(published.manifest, actor=actor)
        stage = Stage.ROLLOUT
        show.stage(stage)
        rollout = None
        if canary is not None:
            members = sum(registry.count_devices(DeviceFilter(group=spec.group)).values())
            rollout = registry.create_rollout(
                RolloutSpec(
                    release_id=release_view.id,
                    selector=Selector(groups=(spec.group,)),
                    waves=canary.waves(members),
                    thresholds=canary.thresholds(),
                ),
                actor=actor,
            )
        else:
            repository.point(spec.group, release.channel, release.name, release.version)
        stage = Stage.FINISH
        show.stage(stage)
        view = registry.finish_round(spec.round_id, RoundState.FINISHED, manifest=finished)
    except KeyboardInterrupt:
        # The operator stopped the command; the SuperLink's run may go on, unrecorded.
        record_failure(
            registry, spec.round_id, stage.value, "interrupted", actor=actor, manifest=finished
        )
        raise
    except Exception as e:
        reason = str(e).strip() or type(e).__name__
        record_failure(registry, spec.round_id, stage.value, reason, actor=actor, manifest=finished)
        raise RoundFailedError(spec.round_id, stage, reason) from e
    registry.audit(
        actor,
        "round.publish",
        subject=f"round/{spec.round_id}",
        details={
            "release_id": release_view.id,
            "bundle_sha256": published.sha256,
            "rollout_id": rollout.id if rollout is not None else None,
            "channel": None if canary is not None else f"{spec.group}/{release.channel}",
        },
    )
    return RoundOutcome(view, result, bundle_dir, published, release_view, rollout)
