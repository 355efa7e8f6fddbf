"""Why a federated run failed, kept in the registry's audit log.

The registry's run record has a state but no reason; :func:`record_failure` appends an
audit entry ``round.fail`` (the stage and the reason) and marks the run ``failed``;
:func:`failure_reason` reads it back for the CLI and the dashboard. Imports only the
registry, so the dashboard can use it without Flower or NumPy.
"""

from __future__ import annotations

from typing import Final

from coordinator.registry import Registry, RoundState
from protocol.rounds import RoundManifest

__all__ = ["FAIL_ACTION", "MAX_REASON_CHARS", "failure_reason", "record_failure"]

FAIL_ACTION: Final = "round.fail"
MAX_REASON_CHARS: Final = 2000  # of a failure reason kept in the audit log (its tail)
_AUDIT_SCAN: Final = 10_000  # newest audit entries searched for a failure reason
_AUDIT_PAGE: Final = 1000


def record_failure(
    registry: Registry,
    round_id: str,
    stage: str,
    reason: str,
    *,
    actor: str,
    manifest: RoundManifest | None = None,
) -> None:
    """Append the failure to the audit log and mark the run ``failed`` (if still running).

    Raises:
        NotFoundError: no such run.
        RefusedError: a malformed actor.
    """
    registry.audit(
        actor,
        FAIL_ACTION,
        subject=f"round/{round_id}",
        details={"stage": stage, "reason": reason[-MAX_REASON_CHARS:]},
    )
    if registry.get_round(round_id).state is RoundState.RUNNING:
        registry.finish_round(round_id, RoundState.FAILED, manifest=manifest)


def failure_reason(registry: Registry, round_id: str) -> str | None:
    """Why the run ``round_id`` failed (``"<stage>: <reason>"``), from the newest audit
    entries, or None when none is found."""
    subject = f"round/{round_id}"
    before: int | None = None
    for _ in range(_AUDIT_SCAN // _AUDIT_PAGE):
        page = registry.list_audit(limit=_AUDIT_PAGE, before_id=before)
        for entry in page:
            if entry.action == FAIL_ACTION and entry.subject == subject:
                return f"{entry.details.get('stage')}: {entry.details.get('reason')}"
        if len(page) < _AUDIT_PAGE:
            return None
        before = page[-1].id
    return None
