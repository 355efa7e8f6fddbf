"""`nanofleet-agent supernode`: run this device's Flower SuperNode while it may train.

The command is the SuperNode's supervisor (the device's ``nanofleet-supernode.service``
runs it; the agent daemon does not, so the SuperNode keeps its own sandbox and never sees
the inference socket or the OTA state). Every ``check_interval_s`` it gathers the facts
(serving marker, local time, training examples in the store), asks
:func:`agent.federated.eligibility.check_eligibility`, and starts or stops the
``flower-supernode`` child as :func:`agent.federated.eligibility.next_action` says. Each
decision that changes something is printed as one line.

Exit codes: 0 after SIGTERM or Ctrl-C (the child is stopped first); 78 for a missing or
disabled ``[federated]`` section or a missing node key; 69 when the SuperNode exits by
itself (systemd restarts the unit).
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer

from agent.federated.eligibility import (
    Action,
    EligibilityPolicy,
    check_eligibility,
    next_action,
)
from protocol.exitcodes import ExitCode

__all__ = ["Facts", "SupervisorLoop", "supernode"]


@dataclass(frozen=True)
class Facts:
    """What the device knows at one check."""

    now: datetime
    serving: bool
    examples: int


class SupervisorLoop:
    """The SuperNode supervisor: the decisions are pure, the I/O is passed in.

    ``facts()`` reads the world, ``start()``/``stop()``/``running()`` drive the child,
    ``say`` prints a line, ``wait(seconds)`` sleeps and returns True when asked to stop.
    """

    def __init__(
        self,
        policy: EligibilityPolicy,
        *,
        facts: Callable[[], Facts],
        start: Callable[[], int | None],
        stop: Callable[[], None],
        running: Callable[[], bool],
        say: Callable[[str], None],
        wait: Callable[[float], bool],
        interval_s: float,
    ) -> None:
        self._policy = policy
        self._facts = facts
        self._start = start
        self._stop = stop
        self._running = running
        self._say = say
        self._wait = wait
        self._interval_s = interval_s
        self._last_request_at: datetime | None = None
        self._started = False
        self._last_detail = ""

    def check(self) -> ExitCode | None:
        """One check; an exit code when the loop must end (the SuperNode died)."""
        facts = self._facts()
        if facts.serving:
            self._last_request_at = facts.now
        if self._started and not self._running():
            self._say("the SuperNode exited by itself")
            self._started = False
            return ExitCode.UNAVAILABLE
        # Serving holds back a start; once a round runs it only pauses training, so a
        # running SuperNode is judged on the window and the data alone.
        running = self._started
        verdict = check_eligibility(
            self._policy,
            now=facts.now,
            last_request_at=None if running else self._last_request_at,
            request_in_flight=facts.serving and not running,
            examples=facts.examples,
        )
        action = next_action(verdict, running=self._started)
        if action is Action.START:
            pid = self._start()
            self._started = True
            self._say(f"eligible ({verdict.detail}): SuperNode started, pid {pid}")
        elif action is Action.STOP:
            self._stop()
            self._started = False
            self._say(f"not eligible ({verdict.detail}): SuperNode stopped")
        elif not self._started and verdict.detail != self._last_detail:
            self._say(f"not eligible ({verdict.detail}): SuperNode not started")
        self._last_detail = verdict.detail
        return None

    def run(self) -> ExitCode:
        """Check until told to stop; always leaves the child stopped."""
        try:
            while True:
                code = self.check()
                if code is not None:
                    return code
                if self._wait(self._interval_s):
                    return ExitCode.SUCCESS
        finally:
            if self._started:
                self._stop()
                self._say("SuperNode stopped")


def _count_examples(data_path: Path) -> int:
    """Training examples in the store at ``data_path`` (0 when there is none).

    Raises:
        LocalDataError: the store exists but cannot be read.
    """
    from sqlalchemy.exc import SQLAlchemyError

    from agent.errors import LocalDataError
    from agent.federated.datastore import LocalTextStore

    if not data_path.exists():
        return 0
    store = LocalTextStore.open(data_path)
    try:
        return store.stats().train
    except SQLAlchemyError as e:
        raise LocalDataError(f"training text store {data_path}: cannot read: {e}") from e
    finally:
        store.close()


def supernode(
    config: Annotated[
        Path,
        typer.Option(
            "--config",
            help="The agent's TOML settings (its federated section); NANOFLEET_* override it.",
        ),
    ],
    check: Annotated[
        bool,
        typer.Option(
            "--check", help="Print whether this device may train now and exit (0 yes, 1 no)."
        ),
    ] = False,
) -> None:
    """Run this device's Flower SuperNode (TLS, node key) while the device may train:
    idle, inside its training window, with enough local data."""
    from agent.config import load_settings
    from agent.errors import ConfigError, LocalDataError
    from agent.federated.supernode import SuperNode, SuperNodeConfig

    def say(line: str) -> None:
        typer.echo(f"supernode: {line}")
        sys.stdout.flush()

    try:
        settings = load_settings(config)
        fed = settings.federated
        if fed is None or not fed.enabled:
            raise ConfigError(
                f"{config}: federated learning is off (no [federated] section with enabled = true)"
            )
        if not fed.node_key_file.is_file():
            raise ConfigError(
                f"federated.node_key_file {fed.node_key_file} does not exist "
                "(`nanofleet-agent enroll` creates it)"
            )
        node = SuperNode(
            SuperNodeConfig(
                superlink=fed.superlink,
                root_certificates=fed.ca_file,
                node_key=fed.node_key_file,
                data_path=fed.data_path,
                model_dir=settings.model.dir,
                state_dir=fed.state_dir,
                serving_marker=fed.serving_marker,
                isolation=fed.isolation,
                clientappio_port=fed.clientappio_port,
                superexec_secret_file=fed.superexec_secret_file,
            )
        )
        node.argv()  # checks the node config's values before anything starts
    except ConfigError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(ExitCode.CONFIG) from None

    marker = fed.serving_marker

    def facts() -> Facts:
        try:
            examples = _count_examples(fed.data_path) if fed.check_data else 1 << 62
        except LocalDataError as e:
            say(f"cannot read the training store: {e}")
            examples = 0
        return Facts(
            now=datetime.now().astimezone(),
            serving=marker is not None and marker.exists(),
            examples=examples,
        )

    if check:
        f = facts()
        verdict = check_eligibility(
            fed.eligibility,
            now=f.now,
            last_request_at=None,
            request_in_flight=f.serving,
            examples=f.examples,
        )
        say(("eligible: " if verdict.eligible else "not eligible: ") + verdict.detail)
        raise typer.Exit(0 if verdict.eligible else 1)

    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    previous = signal.signal(signal.SIGTERM, on_signal)
    say(f"SuperLink {fed.superlink}, store {fed.data_path}, log {node.log_path}")

    def start() -> int | None:
        return node.start().pid

    loop = SupervisorLoop(
        fed.eligibility,
        facts=facts,
        start=start,
        stop=node.stop,
        running=node.running,
        say=say,
        wait=stopping.wait,
        interval_s=fed.check_interval_s,
    )
    try:
        code = loop.run()
    except KeyboardInterrupt:
        code = ExitCode.SUCCESS
    finally:
        signal.signal(signal.SIGTERM, previous)
    if code is not ExitCode.SUCCESS:
        typer.echo(f"error: the SuperNode exited; its log: {node.log_path}", err=True)
    raise typer.Exit(int(code))
