"""May this device train now? A pure decision, with the reason when the answer is no.

A device trains only when all of these hold, checked in this order (the first failure is
the reason given):

1. no inference request is in flight (serving always wins);
2. the last request ended at least ``idle_s`` ago (a request in the future of ``now``, after
   a clock step back, counts as just now);
3. the local wall time of ``now`` lies in the window ``HH:MM-HH:MM`` (start inclusive, end
   exclusive; a window whose end is before its start wraps midnight; ``00:00-24:00`` is the
   whole day);
4. the store holds at least ``min_examples`` training examples.

:func:`next_action` turns a verdict into what the SuperNode supervisor does: start the
SuperNode only when the device is eligible; once it runs, stop it only when the device
leaves its window or its data falls short. A request in flight or a short idle time does
not end a round: the trainer pauses while the agent serves (the serving marker).

Pure: the caller passes the clock reading (an aware datetime in the device's local zone)
and the facts; nothing here reads a clock or a file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "Action",
    "EligibilityPolicy",
    "Ineligible",
    "TimeWindow",
    "Verdict",
    "check_eligibility",
    "next_action",
]

_MINUTES_PER_DAY = 24 * 60
_HH_MM = re.compile(r"^(\d{2}):(\d{2})$")


@dataclass(frozen=True)
class TimeWindow:
    """A daily window of local time, in minutes since midnight: ``[start, end)``."""

    start_min: int
    end_min: int

    def __post_init__(self) -> None:
        if not 0 <= self.start_min < _MINUTES_PER_DAY:
            raise ValueError(f"window start {self.start_min} min is outside [0, 1440)")
        if not 0 <= self.end_min <= _MINUTES_PER_DAY:
            raise ValueError(f"window end {self.end_min} min is outside [0, 1440]")
        if self.start_min == self.end_min:
            raise ValueError(
                f"time window {self} is empty or ambiguous: start equals end "
                "(use 00:00-24:00 for the whole day)"
            )

    @classmethod
    def parse(cls, text: str) -> TimeWindow:
        """Read ``"HH:MM-HH:MM"``.

        Raises:
            ValueError: not that shape, an hour or minute out of range (only the end may be
                ``24:00``), or start equal to end (an empty window).
        """
        parts = text.split("-")
        if len(parts) != 2:
            raise ValueError(f"time window {text!r} is not HH:MM-HH:MM")
        start = _minutes(parts[0].strip(), allow_midnight_end=False)
        end = _minutes(parts[1].strip(), allow_midnight_end=True)
        return cls(start_min=start, end_min=end)

    def contains(self, moment: datetime) -> bool:
        """Whether the wall time of ``moment`` lies in the window."""
        minute = moment.hour * 60 + moment.minute + moment.second / 60
        if self.start_min < self.end_min:
            return self.start_min <= minute < self.end_min
        return minute >= self.start_min or minute < self.end_min

    def __str__(self) -> str:
        return f"{_hh_mm(self.start_min)}-{_hh_mm(self.end_min)}"


def _minutes(text: str, *, allow_midnight_end: bool) -> int:
    match = _HH_MM.match(text)
    if match is None:
        raise ValueError(f"time {text!r} is not HH:MM")
    hours, minutes = int(match[1]), int(match[2])
    if allow_midnight_end and (hours, minutes) == (24, 0):
        return _MINUTES_PER_DAY
    if hours > 23 or minutes > 59:
        raise ValueError(f"time {text!r} is out of range (00:00 to 23:59, or 24:00 as an end)")
    return hours * 60 + minutes


def _hh_mm(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


class EligibilityPolicy(BaseModel):
    """The operator's rules for when a device may train."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: Seconds without inference requests before training may start.
    idle_s: Annotated[float, Field(ge=0, le=86_400)] = 300.0
    #: Local time window, ``"HH:MM-HH:MM"`` in the configuration.
    window: TimeWindow = TimeWindow(start_min=0, end_min=_MINUTES_PER_DAY)
    #: Training examples (texts in the train split) the store must hold.
    min_examples: Annotated[int, Field(ge=1, le=10_000_000)] = 64

    @field_validator("window", mode="before")
    @classmethod
    def _parse_window(cls, value: Any) -> Any:
        return TimeWindow.parse(value) if isinstance(value, str) else value


class Ineligible(StrEnum):
    """Why a device may not train now."""

    REQUEST_IN_FLIGHT = "request_in_flight"
    NOT_IDLE = "not_idle"
    OUTSIDE_WINDOW = "outside_window"
    TOO_FEW_EXAMPLES = "too_few_examples"


@dataclass(frozen=True)
class Verdict:
    """The decision: ``reason`` is None when the device may train; ``detail`` says why."""

    reason: Ineligible | None
    detail: str

    @property
    def eligible(self) -> bool:
        return self.reason is None


def check_eligibility(
    policy: EligibilityPolicy,
    *,
    now: datetime,
    last_request_at: datetime | None,
    request_in_flight: bool,
    examples: int,
) -> Verdict:
    """Decide whether the device may train at ``now`` (see the module docstring).

    ``last_request_at`` is when the last inference request ended (None: none since start).

    Raises:
        ValueError: ``now`` or ``last_request_at`` is a naive datetime.
    """
    for name, moment in (("now", now), ("last_request_at", last_request_at)):
        if moment is not None and moment.utcoffset() is None:
            raise ValueError(f"{name} must be an aware datetime, got naive {moment.isoformat()}")
    if request_in_flight:
        return Verdict(Ineligible.REQUEST_IN_FLIGHT, "an inference request is in flight")
    if last_request_at is not None:
        idle = max(0.0, (now - last_request_at).total_seconds())
        if idle < policy.idle_s:
            return Verdict(
                Ineligible.NOT_IDLE,
                f"idle for {idle:.0f} s of the {policy.idle_s:.0f} s required",
            )
    if not policy.window.contains(now):
        return Verdict(
            Ineligible.OUTSIDE_WINDOW,
            f"local time {now:%H:%M} is outside the window {policy.window}",
        )
    if examples < policy.min_examples:
        return Verdict(
            Ineligible.TOO_FEW_EXAMPLES,
            f"{examples} training examples, {policy.min_examples} required",
        )
    return Verdict(None, "idle, inside the window, with enough examples")


class Action(StrEnum):
    """What the SuperNode supervisor does after a check."""

    START = "start"
    STOP = "stop"
    KEEP = "keep"


#: Reasons that end a running SuperNode; the others only hold back its start.
_STOP_REASONS = frozenset({Ineligible.OUTSIDE_WINDOW, Ineligible.TOO_FEW_EXAMPLES})


def next_action(verdict: Verdict, *, running: bool) -> Action:
    """Start when eligible and stopped; stop when running and outside the window or short of
    data; otherwise keep things as they are."""
    if not running:
        return Action.START if verdict.eligible else Action.KEEP
    return Action.STOP if verdict.reason in _STOP_REASONS else Action.KEEP
