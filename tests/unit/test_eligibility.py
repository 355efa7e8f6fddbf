"""When a device may train: idle, inside its window, with data, and no request in flight."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from pydantic import ValidationError

from agent.federated.eligibility import (
    EligibilityPolicy,
    Ineligible,
    TimeWindow,
    check_eligibility,
)

LOCAL = timezone(timedelta(hours=2))


def _at(hh_mm: str) -> datetime:
    hours, minutes = (int(x) for x in hh_mm.split(":"))
    return datetime(2025, 6, 1, hours, minutes, tzinfo=LOCAL)


NIGHT = EligibilityPolicy(idle_s=600, window="22:00-06:00", min_examples=100)
DAY = EligibilityPolicy(idle_s=600, window="09:30-17:00", min_examples=100)


@pytest.mark.parametrize(
    ("policy", "now", "idle_s", "in_flight", "examples", "reason", "detail"),
    [
        (NIGHT, "23:00", 3600, False, 500, None, "idle, inside the window"),
        (NIGHT, "02:59", None, False, 500, None, "idle"),  # no request since start
        (NIGHT, "22:00", 600, False, 100, None, "idle"),  # every bound inclusive
        (NIGHT, "05:59", 3600, False, 500, None, "idle"),
        (NIGHT, "06:00", 3600, False, 500, Ineligible.OUTSIDE_WINDOW, "06:00 is outside"),
        (NIGHT, "12:00", 3600, False, 500, Ineligible.OUTSIDE_WINDOW, "22:00-06:00"),
        (NIGHT, "21:59", 3600, False, 500, Ineligible.OUTSIDE_WINDOW, "21:59"),
        (DAY, "09:29", 3600, False, 500, Ineligible.OUTSIDE_WINDOW, "09:29"),
        (DAY, "09:30", 3600, False, 500, None, "idle"),
        (DAY, "16:59", 3600, False, 500, None, "idle"),
        (DAY, "17:00", 3600, False, 500, Ineligible.OUTSIDE_WINDOW, "09:30-17:00"),
        (NIGHT, "23:00", 599, False, 500, Ineligible.NOT_IDLE, "idle for 599 s of the 600 s"),
        (NIGHT, "23:00", -30, False, 500, Ineligible.NOT_IDLE, "idle for 0 s"),  # clock stepped
        (NIGHT, "23:00", 3600, True, 500, Ineligible.REQUEST_IN_FLIGHT, "in flight"),
        (NIGHT, "23:00", 3600, False, 99, Ineligible.TOO_FEW_EXAMPLES, "99 training examples"),
        # The first failing rule is the reason: in flight, then idle, window, examples.
        (NIGHT, "12:00", 10, True, 0, Ineligible.REQUEST_IN_FLIGHT, "in flight"),
        (NIGHT, "12:00", 10, False, 0, Ineligible.NOT_IDLE, "idle for 10 s"),
        (NIGHT, "12:00", 3600, False, 0, Ineligible.OUTSIDE_WINDOW, "outside"),
    ],
)
def test_verdicts(
    policy: EligibilityPolicy,
    now: str,
    idle_s: float | None,
    in_flight: bool,
    examples: int,
    reason: Ineligible | None,
    detail: str,
) -> None:
    moment = _at(now)
    last = None if idle_s is None else moment - timedelta(seconds=idle_s)
    verdict = check_eligibility(
        policy, now=moment, last_request_at=last, request_in_flight=in_flight, examples=examples
    )
    assert verdict.reason is reason
    assert verdict.eligible is (reason is None)
    assert detail in verdict.detail


def test_last_request_in_another_zone_is_compared_as_an_instant() -> None:
    now = _at("23:00")
    last = (now - timedelta(seconds=60)).astimezone(UTC)
    verdict = check_eligibility(
        NIGHT, now=now, last_request_at=last, request_in_flight=False, examples=500
    )
    assert verdict.reason is Ineligible.NOT_IDLE


def test_whole_day_window_and_default_policy() -> None:
    policy = EligibilityPolicy(window="00:00-24:00", min_examples=1)
    for hh_mm in ("00:00", "12:00", "23:59"):
        verdict = check_eligibility(
            policy, now=_at(hh_mm), last_request_at=None, request_in_flight=False, examples=1
        )
        assert verdict.eligible, hh_mm
    assert str(EligibilityPolicy().window) == "00:00-24:00"
    to_midnight = TimeWindow.parse("20:00-00:00")
    assert to_midnight.contains(_at("23:59"))
    assert not to_midnight.contains(_at("00:00"))
    assert not to_midnight.contains(_at("19:59"))


def test_naive_datetimes_are_refused() -> None:
    with pytest.raises(ValueError, match="now must be an aware datetime"):
        check_eligibility(
            NIGHT,
            now=datetime(2025, 6, 1, 23, 0),
            last_request_at=None,
            request_in_flight=False,
            examples=500,
        )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("22:00", "is not HH:MM-HH:MM"),
        ("22:00-06:00-07:00", "is not HH:MM-HH:MM"),
        ("2200-0600", "'2200' is not HH:MM"),
        ("7:00-09:00", "'7:00' is not HH:MM"),
        ("24:00-06:00", "'24:00' is out of range"),
        ("22:60-06:00", "'22:60' is out of range"),
        ("08:00-08:00", "start equals end (use 00:00-24:00 for the whole day)"),
        ("00:00-00:00", "start equals end"),
    ],
)
def test_bad_windows_are_refused_with_the_problem_named(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TimeWindow.parse(text)
    with pytest.raises(ValidationError, match="window"):
        EligibilityPolicy(window=text)


def test_policy_bounds_name_the_field() -> None:
    with pytest.raises(ValidationError, match=r"min_examples\n.*greater than or equal to 1"):
        EligibilityPolicy(min_examples=0)
    with pytest.raises(ValueError, match=r"window end 1500 min is outside \[0, 1440\]"):
        TimeWindow(start_min=0, end_min=1500)
