"""Offline detection: the pure rule as a table, then sweeps on both backends, including a
broker restart that must not flap the fleet."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from coordinator.registry import LinkState, LivenessRule, Online, Registry, Transition
from coordinator.registry.liveness import judge
from protocol.messages import Health
from tests.contract._fleet import heartbeat, register, status
from tests.support.db_fixtures import ManualClock

T = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
RULE = LivenessRule(interval_s=30, missed=3, missed_after_will=1)


def s(seconds: float) -> datetime:
    return T + timedelta(seconds=seconds)


@pytest.mark.parametrize(
    ("last_seen", "will_at", "since", "now", "expected"),
    [
        pytest.param(s(0), None, s(-3600), s(60), Online.ONLINE, id="two beats missed: online"),
        pytest.param(s(0), None, s(-3600), s(90), Online.ONLINE, id="exactly three: online"),
        pytest.param(s(0), None, s(-3600), s(91), Online.OFFLINE, id="over three: offline"),
        pytest.param(None, None, s(0), s(60), None, id="never seen, young: keep"),
        pytest.param(None, None, s(0), s(91), Online.OFFLINE, id="never seen, old"),
        pytest.param(s(0), None, s(600), s(660), None, id="after reconnect: keep"),
        pytest.param(s(0), None, s(600), s(691), Online.OFFLINE, id="grace over"),
        pytest.param(s(0), s(5), s(-3600), s(31), Online.OFFLINE, id="will after beat: 1 miss"),
        pytest.param(s(0), s(5), s(-3600), s(29), Online.ONLINE, id="will, not yet"),
        pytest.param(s(0), s(-5), s(-3600), s(60), Online.ONLINE, id="will before beat"),
        pytest.param(s(0), s(605), s(600), s(640), None, id="retained will: keep"),
    ],
)
def test_judge(
    last_seen: datetime | None,
    will_at: datetime | None,
    since: datetime,
    now: datetime,
    expected: Online | None,
) -> None:
    link = LinkState(connected_since=since, last_message_at=now)
    got = judge(
        last_seen=last_seen, will_at=will_at, registered_at=s(-7200), link=link, rule=RULE, now=now
    )
    assert got is expected


@pytest.mark.parametrize(
    "link",
    [
        LinkState(connected_since=None, last_message_at=s(100)),
        LinkState(connected_since=s(-3600), last_message_at=None),
        LinkState(connected_since=s(-3600), last_message_at=s(60)),  # silent for > 1 interval
    ],
)
def test_no_verdict_while_the_link_is_down_or_silent(link: LinkState) -> None:
    got = judge(
        last_seen=s(0), will_at=None, registered_at=s(-7200), link=link, rule=RULE, now=s(500)
    )
    assert got is None


def test_rule_bounds() -> None:
    with pytest.raises(ValueError, match="missed_after_will"):
        LivenessRule(missed=2, missed_after_will=3)
    with pytest.raises(ValueError, match="interval_s"):
        LivenessRule(interval_s=0)


def test_sweep_marks_silent_devices_offline_and_survives_a_broker_restart(
    registry: Registry, clock: ManualClock
) -> None:
    register(registry, ["a", "b", "c"])
    connected = clock.now
    for d in ("a", "b", "c"):
        registry.ingest([(d, heartbeat(clock.now), clock.now)])

    def sweep() -> set[tuple[str, Online, Online]]:
        link = LinkState(connected_since=connected, last_message_at=clock.now)
        return {(t.device_id, t.before, t.after) for t in registry.sweep_liveness(link, RULE)}

    assert sweep() == {(d, Online.UNKNOWN, Online.ONLINE) for d in "abc"}
    for _ in range(4):  # c goes silent; a and b keep beating
        clock.advance(30)
        registry.ingest([(d, heartbeat(clock.now), clock.now) for d in "ab"])
    assert sweep() == {("c", Online.ONLINE, Online.OFFLINE)}
    assert sweep() == set()  # nothing changes twice

    # The broker restarts: two minutes without any message, then the coordinator reconnects.
    clock.advance(120)
    assert registry.sweep_liveness(LinkState(None, None), RULE) == []
    connected = clock.now
    clock.advance(60)  # devices are still reconnecting: nobody is judged offline yet
    assert sweep() == set()
    registry.ingest([("a", heartbeat(clock.now), clock.now)])
    clock.advance(31)  # b never came back: offline once its grace (3 intervals) is over
    registry.ingest([("a", heartbeat(clock.now), clock.now)])
    assert sweep() == {("b", Online.ONLINE, Online.OFFLINE)}
    assert registry.get_device("b").online_changed_at == clock.now
    assert registry.get_device("a").online is Online.ONLINE


def test_sweep_uses_the_last_will_as_a_hint(registry: Registry, clock: ManualClock) -> None:
    register(registry, ["a"])
    connected = clock.now
    registry.ingest([("a", heartbeat(clock.now), clock.now)])
    link = LinkState(connected_since=connected, last_message_at=clock.now)
    assert registry.sweep_liveness(link, RULE) == [Transition("a", Online.UNKNOWN, Online.ONLINE)]
    clock.advance(20)
    registry.ingest([("a", status(connected, health=Health.OFFLINE), clock.now)])
    clock.advance(11)
    link = LinkState(connected_since=connected, last_message_at=clock.now)
    assert registry.sweep_liveness(link, RULE) == [Transition("a", Online.ONLINE, Online.OFFLINE)]
