"""The real agent daemon with one named crash point: ``python crash_agent.py POINT CONFIG``.

The daemon's own code runs unchanged; this harness only wraps a few of its functions so
that the process SIGKILLs itself (no cleanup, no flush: a power cut as far as the disk
knows) the first time the update reaches ``POINT``. It first prints
``fault-injected POINT`` to stdout, so a test knows the point was reached.

Points, in lifecycle order (see :data:`POINTS`):

- ``check``: the signed metadata was refreshed and names the release, nothing is fetched;
- ``mid_download``: some, not all, of the release's bytes are in the blob store;
- ``before_stage``: every blob is verified, the inactive slot is not written yet;
- ``mid_stage``: the slot holds some of the release's files, not its marker;
- ``before_activation``: the slot is staged, the old model still serves;
- ``mid_activation``: the new model was swapped in, the health gate has not run;
- ``mid_health_check``: the gate's smoke requests on the new model have run, no verdict yet;
- ``mid_commit``: the new slot pointer is written and synced as a temp file, not renamed;
- ``after_commit``: the slot pointer names the new slot, the record still says health_check;
- ``mid_rollback``: the gate refused the new model, the old one is not swapped back yet.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

POINTS = (
    "check",
    "mid_download",
    "before_stage",
    "mid_stage",
    "before_activation",
    "mid_activation",
    "mid_health_check",
    "mid_commit",
    "after_commit",
    "mid_rollback",
)


def _crash(point: str) -> None:
    print(f"fault-injected {point}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def _install(point: str) -> None:
    from agent.ota import client, live, runner, slots
    from agent.ota.lifecycle import (
        Activate,
        FetchProgressed,
        Persist,
        Phase,
        Rollback,
        Stage,
    )

    execute = runner.UpdateRunner._execute
    step = runner.UpdateRunner._step

    def at_action(self: Any, action: Any) -> Any:
        if (
            (point == "before_stage" and isinstance(action, Stage))
            or (point == "before_activation" and isinstance(action, Activate))
            or (point == "mid_rollback" and isinstance(action, Rollback))
            or (
                point == "after_commit"
                and isinstance(action, Persist)
                and action.record.phase is Phase.COMMITTED
            )
        ):
            _crash(point)
        return execute(self, action)

    def at_event(self: Any, event: Any) -> Any:
        if (
            point == "mid_download"
            and isinstance(event, FetchProgressed)
            and 0 < event.done < event.total
        ):
            _crash(point)
        return step(self, event)

    mock.patch.object(runner.UpdateRunner, "_execute", at_action).start()
    mock.patch.object(runner.UpdateRunner, "_step", at_event).start()

    if point == "check":
        check = client.RepositoryClient.check

        def checking(self: Any, *args: Any, **kwargs: Any) -> Any:
            plan = check(self, *args, **kwargs)
            if plan is not None:
                _crash(point)
            return plan

        mock.patch.object(client.RepositoryClient, "check", checking).start()

    if point == "mid_stage":
        link = slots._link
        calls = [0]

        def linking(blob: Path, dest: Path) -> None:
            link(blob, dest)
            calls[0] += 1
            if calls[0] == 2:
                _crash(point)

        mock.patch.object(slots, "_link", linking).start()

    if point == "mid_commit":
        replace = os.replace

        def replacing(src: Any, dst: Any, **kwargs: Any) -> None:
            if str(dst).endswith(f"/{slots.POINTER_NAME}"):
                _crash(point)
            replace(src, dst, **kwargs)

        mock.patch("agent.ota._fs.os.replace", replacing).start()

    if point in ("mid_activation", "mid_health_check"):
        cls = live.LiveActivator
        wrapped: Callable[..., Any] = cls.activate if point == "mid_activation" else cls._smoke

        def then_crash(self: Any, *args: Any) -> Any:
            result = wrapped(self, *args)
            if point == "mid_activation" or self._previous is not None:
                _crash(point)
            return result

        name = "activate" if point == "mid_activation" else "_smoke"
        mock.patch.object(cls, name, then_crash).start()


def main() -> int:
    point, config = sys.argv[1], Path(sys.argv[2])
    if point not in POINTS:
        print(f"unknown fault point {point!r}; known: {', '.join(POINTS)}", file=sys.stderr)
        return 2
    _install(point)
    from agent.daemon import run

    return int(run(config))


if __name__ == "__main__":
    sys.exit(main())
