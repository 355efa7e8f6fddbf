"""The exit-code registry: every code documented, numbers stable, restart policy consistent."""

from __future__ import annotations

from protocol.exitcodes import HELP, NO_RESTART, ExitCode, describe


def test_every_exit_code_has_a_help_text() -> None:
    for code in ExitCode:
        assert HELP.get(code, "").strip(), f"{code.name} has no help text"
    assert set(HELP) == set(ExitCode)


def test_codes_fit_in_a_process_exit_status() -> None:
    assert all(0 <= code <= 255 for code in ExitCode)
    assert len({int(c) for c in ExitCode}) == len(ExitCode)


def test_configuration_errors_are_not_restarted() -> None:
    assert ExitCode.CONFIG in NO_RESTART
    assert ExitCode.SUCCESS not in NO_RESTART
    assert ExitCode.UNAVAILABLE not in NO_RESTART


def test_describe() -> None:
    assert describe(78) == HELP[ExitCode.CONFIG]
    assert describe(3) == "unknown exit code 3"
