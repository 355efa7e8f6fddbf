"""MQTT topic names: the layout, the segment rule, the coordinator's filters and parsing."""

from __future__ import annotations

import pytest

from protocol import topics
from protocol.topics import DeviceChannel, TopicError


def test_device_topics() -> None:
    assert topics.device_status("dev-01") == "nanofleet/v1/devices/dev-01/status"
    assert topics.device_heartbeat("dev-01") == "nanofleet/v1/devices/dev-01/heartbeat"
    assert topics.update_progress("dev-01") == "nanofleet/v1/devices/dev-01/progress"


def test_group_topics() -> None:
    assert (
        topics.release_announcements("warehouse-east", "stable")
        == "nanofleet/v1/groups/warehouse-east/releases/stable"
    )
    assert topics.round_invitations("warehouse-east") == "nanofleet/v1/groups/warehouse-east/rounds"


def test_coordinator_filters_cover_every_device_channel() -> None:
    assert topics.COORDINATOR_FILTERS == (
        "nanofleet/v1/devices/+/status",
        "nanofleet/v1/devices/+/heartbeat",
        "nanofleet/v1/devices/+/progress",
        "nanofleet/v1/devices/+/evaluation",
    )


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("", "empty"),
        ("a" * 65, "over the limit of 64"),
        ("a/b", "'/'"),
        ("a+", "'+'"),
        ("#", "'#'"),
        ("a\x00b", "NUL"),
        ("dev 1", "letters, digits"),
        ("-dev", "starting with a letter or digit"),
        ("dév", "letters, digits"),
    ],
)
def test_bad_segments_are_refused_with_the_reason(value: str, reason: str) -> None:
    makers = [
        (topics.device_status, "device_id"),
        (topics.device_heartbeat, "device_id"),
        (topics.update_progress, "device_id"),
        (topics.round_invitations, "group"),
        (lambda v: topics.release_announcements(v, "stable"), "group"),
        (lambda v: topics.release_announcements("g", v), "channel"),
    ]
    for make, name in makers:
        with pytest.raises(TopicError) as caught:
            make(value)
        assert str(caught.value).startswith(name)
        assert reason in str(caught.value)


def test_longest_valid_segment_is_accepted() -> None:
    assert topics.check_segment("a" * 64, "device_id") == "a" * 64


@pytest.mark.parametrize("channel", list(DeviceChannel))
def test_parse_device_topic_inverts_device_topic(channel: DeviceChannel) -> None:
    parsed = topics.parse_device_topic(topics.device_topic("dev-01", channel))
    assert (parsed.device_id, parsed.channel) == ("dev-01", channel)


@pytest.mark.parametrize(
    "topic",
    [
        "nanofleet/v2/devices/dev-01/status",
        "nanofleet/v1/devices/dev-01/status/extra",
        "nanofleet/v1/devices/dev-01/reboot",
        "nanofleet/v1/devices//status",
        "nanofleet/v1/groups/g/rounds",
    ],
)
def test_parse_device_topic_refuses_other_topics(topic: str) -> None:
    with pytest.raises(TopicError):
        topics.parse_device_topic(topic)
