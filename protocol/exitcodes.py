"""Exit codes of the nanofleet daemons (`nanofleet-agent run`, `nanofleet serve`).

The numbers are a contract with systemd units (``RestartPreventExitStatus=``) and with
operators reading ``systemctl status``: never renumber one. Codes follow sysexits(3) where one
fits. Every code has a help text; a test checks it.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Why a daemon stopped."""

    SUCCESS = 0
    FAILURE = 1
    USAGE = 64
    BAD_INPUT = 65
    MODEL_INVALID = 66
    UNAVAILABLE = 69
    INTERNAL = 70
    STATE_CORRUPT = 74
    CONFIG = 78
    WATCHDOG = 79


HELP: dict[ExitCode, str] = {
    ExitCode.SUCCESS: "Stopped normally (for example after SIGTERM and a graceful drain).",
    ExitCode.FAILURE: "An unexpected error; the log has the traceback. systemd restarts the unit.",
    ExitCode.USAGE: "The command line was wrong: an unknown option or a missing argument.",
    ExitCode.BAD_INPUT: "An input file (bundle, enrollment file, text) was refused; see the log.",
    ExitCode.MODEL_INVALID: (
        "The configured model directory is missing, incomplete or fails its hash check. "
        "Not restarted: fix the model or let an update install one."
    ),
    ExitCode.UNAVAILABLE: (
        "A service it needs (socket path, port, broker, database) could not be reached or bound; "
        "systemd retries."
    ),
    ExitCode.INTERNAL: "An internal invariant failed; please report it with the log.",
    ExitCode.STATE_CORRUPT: (
        "The state directory could not be read or written (disk full, permissions, corruption)."
    ),
    ExitCode.CONFIG: (
        "The configuration is invalid; the message names the key. Not restarted: "
        "fix the file or the NANOFLEET_ variable."
    ),
    ExitCode.WATCHDOG: "The serving loop stopped answering its watchdog; the daemon gave up.",
}

#: Codes after which a restart cannot help; systemd units list them in RestartPreventExitStatus=.
NO_RESTART: frozenset[ExitCode] = frozenset(
    {ExitCode.USAGE, ExitCode.CONFIG, ExitCode.MODEL_INVALID}
)


def describe(code: int) -> str:
    """Return the help text of ``code``, or a note that the code is unknown."""
    try:
        return HELP[ExitCode(code)]
    except ValueError:
        return f"unknown exit code {code}"
