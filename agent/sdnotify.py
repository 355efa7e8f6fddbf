"""A systemd notification sender (sd_notify(3)) in a few lines of standard library.

Without ``NOTIFY_SOCKET`` (not started by systemd, or Type=simple) every call is a no-op.
An abstract socket is written ``@name``. Send errors are raised, never swallowed: a unit that
expects READY=1 and never gets it must be visible in the log.
"""

from __future__ import annotations

import os
import socket


def notify(state: str, *, timeout_s: float | None = None) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``) to systemd; False when there is no notify socket.

    A datagram waits while the manager's receive queue is full: at most ``timeout_s``
    seconds (0: not at all), forever when None.

    Raises:
        OSError: the notify socket exists but the datagram could not be sent (a full queue
            is :class:`BlockingIOError` with ``timeout_s=0``, :class:`TimeoutError` after
            ``timeout_s``).
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(timeout_s)
        sock.connect(address)  # connected, a wait for room sleeps on the manager's queue
        sock.send(state.encode())
    return True


def watchdog_interval_s() -> float | None:
    """Half of ``WATCHDOG_USEC`` in seconds (how often to send WATCHDOG=1), or None if unset.

    ``WATCHDOG_PID``, when set, must name this process (otherwise the watchdog is someone
    else's).
    """
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 2e6
