"""The rollout runner on a real (SQLite) registry with an in-memory publisher and a
simulated fleet: automatic halts on failures and on an evaluation regression, a clean
completion, and announcement retries."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

from coordinator.errors import RefusedError
from coordinator.registry import Registry, ReleaseView, RolloutSpec, Selector
from coordinator.rollout.policy import (
    Complete,
    Halt,
    RolloutState,
    Thresholds,
    Wait,
    WaveSize,
    WaveSpec,
    WaveState,
)
from coordinator.rollout.publisher import MqttPublisher, PointerPublisher
from coordinator.rollout.runner import RolloutRunner
from protocol import topics
from protocol.bundle import BundleKind, bundle_hash
from protocol.messages import BundleRef, ReleaseAnnouncement, UpdateProgress, UpdateState
from tests.support.db_fixtures import ManualClock, make_manifest

SOAK_S = 60


@dataclass
class InMemoryPublisher:
    """Records announcements; fails the next ``fail_next`` calls."""

    sent: list[tuple[tuple[str, ...], ReleaseView]] = field(default_factory=list)
    fail_next: int = 0

    def announce(self, device_ids: Sequence[str], release: ReleaseView) -> None:
        if self.fail_next:
            self.fail_next -= 1
            raise ConnectionError("broker unavailable")
        self.sent.append((tuple(device_ids), release))

    def announced(self) -> set[str]:
        return {d for devices, _ in self.sent for d in devices}


@dataclass
class SimulatedFleet:
    """Devices that install what they were announced: ``failing`` ones fail the update;
    the rest commit and report ``evaluation`` (baseline, candidate) if given."""

    registry: Registry
    clock: ManualClock
    publisher: InMemoryPublisher
    failing: set[str] = field(default_factory=set)
    evaluation: tuple[float, float] | None = None
    delivered: int = 0

    def deliver(self) -> None:
        """Every device announced since the last call reports its outcome."""
        now = self.clock.advance(5)
        batch = []
        for devices, release in self.publisher.sent[self.delivered :]:
            target = BundleRef(
                name=release.name, version=release.version, sha256=release.bundle_sha256
            )
            for device in devices:
                failed = device in self.failing
                report = UpdateProgress(
                    state=UpdateState.FAILED if failed else UpdateState.COMMITTED,
                    target=target,
                    timestamp_version=3,
                    bytes_done=100,
                    bytes_total=100,
                    error_code="health_check_failed" if failed else None,
                    at=now,
                )
                batch.append((device, report, now))
                if not failed and self.evaluation is not None:
                    baseline, candidate = self.evaluation
                    self.registry.record_evaluation(
                        device, release.bundle_sha256, baseline=baseline, candidate=candidate
                    )
        self.delivered = len(self.publisher.sent)
        self.registry.ingest(batch)


def make_fleet(registry: Registry, n: int) -> list[str]:
    devices = [f"dev-{i:02d}" for i in range(n)]
    for device in devices:
        registry.register_device(device, groups=["warehouse"], actor="op")
    return devices


def waves(*sizes: str) -> tuple[WaveSpec, ...]:
    return tuple(WaveSpec(WaveSize.parse(s), SOAK_S) for s in sizes)


@pytest.fixture
def publisher() -> InMemoryPublisher:
    return InMemoryPublisher()


@pytest.fixture
def runner(sqlite_registry: Registry, publisher: InMemoryPublisher) -> RolloutRunner:
    return RolloutRunner(sqlite_registry, publisher)


def run_until_settled(
    runner: RolloutRunner, fleet: SimulatedFleet, rollout_id: int, clock: ManualClock
) -> Halt | Complete:
    """Advance, let devices report, wait out soaks, until the rollout halts or completes."""
    for _ in range(20):
        decision = runner.advance(rollout_id)
        if isinstance(decision, Halt | Complete):
            return decision
        assert isinstance(decision, Wait)
        fleet.deliver()
        if decision.until is not None and decision.until > clock.now:
            clock.now = decision.until
    raise AssertionError("the rollout neither halted nor completed")


def test_second_wave_failures_halt_the_rollout(
    sqlite_registry: Registry,
    runner: RolloutRunner,
    publisher: InMemoryPublisher,
    clock: ManualClock,
) -> None:
    registry = sqlite_registry
    devices = make_fleet(registry, 24)
    release = registry.create_release(make_manifest("smollm2-135m", "2.0.0"), actor="op")
    rollout = registry.create_rollout(
        RolloutSpec(
            release.id,
            Selector(groups=("warehouse",)),
            waves("10%", "25%", "100%"),
            Thresholds(max_failure_rate=0.2, wave_timeout_s=600),
        ),
        actor="op",
    )
    plan = registry.snapshot(rollout.id).plan
    first, second, rest = plan.wave_devices
    assert (len(first), len(second), len(rest)) == (3, 6, 15)
    fleet = SimulatedFleet(registry, clock, publisher, failing=set(second[:3]))

    decision = run_until_settled(runner, fleet, rollout.id, clock)

    assert isinstance(decision, Halt)
    assert decision.index == 1
    assert "wave 2 of 3: 3 of 6 devices failed (50.0%; failed 3)" in decision.reason
    assert "over the failure threshold of 20.0%" in decision.reason
    assert [d for d, _ in publisher.sent] == [first, second]
    assert publisher.announced() == set(first) | set(second)
    assert not publisher.announced() & set(rest)  # the remaining devices never heard of it
    assert len(devices) - len(publisher.announced()) == 15
    view = registry.get_rollout(rollout.id)
    assert view.state is RolloutState.HALTED
    assert [w.state for w in view.waves] == [
        WaveState.PASSED,
        WaveState.FAILED,
        WaveState.CANCELLED,
    ]
    assert view.waves[1].reason == decision.reason
    assert view.waves[2].progress == {}
    log = registry.rollout_decisions(rollout.id)
    assert (log[-1].kind, log[-1].wave, log[-1].reason) == ("halt", 1, decision.reason)
    assert {u.device_id for u in registry.rollout_updates(rollout.id)} == set(first) | set(second)
    # later advances change nothing and announce nothing
    assert isinstance(runner.advance(rollout.id), Wait)
    assert len(publisher.sent) == 2


def test_adapter_evaluation_regression_halts_the_rollout(
    sqlite_registry: Registry,
    runner: RolloutRunner,
    publisher: InMemoryPublisher,
    clock: ManualClock,
) -> None:
    registry = sqlite_registry
    make_fleet(registry, 20)
    base = make_manifest("smollm2-135m", "1.0.0")
    adapter = registry.create_release(
        make_manifest("support-lora", "0.3.0", BundleKind.ADAPTER, base_sha256=bundle_hash(base)),
        actor="federation",
    )
    rollout = registry.create_rollout(
        RolloutSpec(
            adapter.id,
            Selector(groups=("warehouse",)),
            waves("25%", "100%"),
            Thresholds(max_failure_rate=0.1, max_eval_regression=0.05, wave_timeout_s=600),
        ),
        actor="federation",
    )
    first, rest = registry.snapshot(rollout.id).plan.wave_devices
    # every device installs the adapter fine, but held-out perplexity gets 12.5 % worse
    fleet = SimulatedFleet(registry, clock, publisher, evaluation=(12.0, 13.5))

    decision = run_until_settled(runner, fleet, rollout.id, clock)

    assert isinstance(decision, Halt)
    assert decision.index == 0
    assert "regressed by a median of 12.5% over 5 devices" in decision.reason
    assert "over the regression threshold of 5.0%" in decision.reason
    assert publisher.announced() == set(first)
    assert not publisher.announced() & set(rest)
    view = registry.get_rollout(rollout.id)
    assert view.state is RolloutState.HALTED
    assert view.waves[0].progress == {UpdateState.COMMITTED: 5}
    assert registry.rollout_decisions(rollout.id)[-1].reason == decision.reason


def test_healthy_rollout_completes_after_every_soak(
    sqlite_registry: Registry,
    runner: RolloutRunner,
    publisher: InMemoryPublisher,
    clock: ManualClock,
) -> None:
    registry = sqlite_registry
    devices = make_fleet(registry, 20)
    release = registry.create_release(make_manifest("smollm2-135m", "2.0.0"), actor="op")
    rollout = registry.create_rollout(
        RolloutSpec(release.id, Selector(groups=("warehouse",)), waves("1", "30%", "100%")),
        actor="op",
    )
    started = clock.now
    fleet = SimulatedFleet(registry, clock, publisher)

    decision = run_until_settled(runner, fleet, rollout.id, clock)

    assert isinstance(decision, Complete)
    assert "all 3 waves passed; 20 devices" in decision.reason
    assert sorted(publisher.announced()) == devices
    assert [len(d) for d, _ in publisher.sent] == [1, 6, 13]
    assert (clock.now - started).total_seconds() >= 3 * SOAK_S  # each wave soaked
    view = registry.get_rollout(rollout.id)
    assert view.state is RolloutState.COMPLETED
    assert all(w.state is WaveState.PASSED for w in view.waves)
    assert registry.active_rollouts() == []


def test_failed_announcement_is_retried_first(
    sqlite_registry: Registry,
    runner: RolloutRunner,
    publisher: InMemoryPublisher,
) -> None:
    registry = sqlite_registry
    make_fleet(registry, 4)
    release = registry.create_release(make_manifest(), actor="op")
    rollout = registry.create_rollout(
        RolloutSpec(release.id, Selector(groups=("warehouse",)), waves("50%", "100%")), actor="op"
    )
    publisher.fail_next = 1
    with pytest.raises(ConnectionError, match="broker unavailable"):
        runner.advance(rollout.id)
    assert publisher.sent == []
    assert registry.get_rollout(rollout.id).waves[0].state is WaveState.RUNNING
    assert isinstance(runner.advance(rollout.id), Wait)
    first = registry.snapshot(rollout.id).plan.wave_devices[0]
    assert [d for d, _ in publisher.sent] == [first]  # announced once, after the retry


def test_advance_all_moves_every_active_rollout(
    sqlite_registry: Registry, runner: RolloutRunner, publisher: InMemoryPublisher
) -> None:
    registry = sqlite_registry
    make_fleet(registry, 4)
    registry.register_device("lab-1", groups=["lab"], actor="op")
    release = registry.create_release(make_manifest(), actor="op")
    a = registry.create_rollout(
        RolloutSpec(release.id, Selector(groups=("warehouse",))), actor="op"
    )
    b = registry.create_rollout(RolloutSpec(release.id, Selector(groups=("lab",))), actor="op")
    decisions = runner.advance_all()
    assert set(decisions) == {a.id, b.id}
    assert all(isinstance(d, Wait) for d in decisions.values())
    assert publisher.announced() == {"dev-00", "dev-01", "dev-02", "dev-03", "lab-1"}


@dataclass
class RecordingRepository:
    """Stands in for :class:`coordinator.repository.Repository`'s pointer writes."""

    calls: list[tuple[tuple[str, ...], str, str, str]] = field(default_factory=list)
    refuse: bool = False

    def point_devices(
        self, device_ids: Sequence[str], channel: str, name: str, version: str
    ) -> list[object]:
        if self.refuse:
            raise RefusedError(f"{name} {version} is not published")
        self.calls.append((tuple(device_ids), channel, name, version))
        return []


def test_pointer_publisher_signs_the_waves_pointers_before_announcing(
    sqlite_registry: Registry,
) -> None:
    release = sqlite_registry.create_release(make_manifest(version="2.0.0"), actor="op")
    repository = RecordingRepository()
    then = InMemoryPublisher()
    publisher = PointerPublisher(repository, then, channel="beta")  # type: ignore[arg-type]
    publisher.announce(("d1", "d2"), release)
    assert repository.calls == [(("d1", "d2"), "beta", release.name, "2.0.0")]
    assert then.announced() == {"d1", "d2"}

    repository.refuse = True
    with pytest.raises(RefusedError):
        publisher.announce(("d3",), release)
    assert "d3" not in then.announced()  # never announce what devices cannot find


def test_mqtt_publisher_tells_each_device_on_its_own_topic(sqlite_registry: Registry) -> None:
    release = sqlite_registry.create_release(make_manifest(version="2.0.0"), actor="op")
    sent: list[tuple[str, bytes]] = []

    class Link:
        def publish_many(self, messages: list[tuple[str, bytes]], *, timeout_s: float) -> None:
            sent.extend(messages)

    publisher = MqttPublisher(
        Link(),  # type: ignore[arg-type]
        channel="stable",
        repository_url="https://coordinator.example/repo",
        timestamp_version=lambda: 7,
    )
    publisher.announce(("d1", "d2"), release)
    assert [t for t, _ in sent] == [topics.device_releases("d1"), topics.device_releases("d2")]
    for (_, payload), device in zip(sent, ("d1", "d2"), strict=True):
        message = ReleaseAnnouncement.model_validate_json(payload)
        assert (message.group, message.channel, message.timestamp_version) == (
            device,
            "stable",
            7,
        )
