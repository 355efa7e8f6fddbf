"""The rollout runner: carries the policy's decisions out on the registry and the fleet.

It is thin on purpose: :meth:`Registry.step` takes one policy step in one transaction (the
decision and its reason are recorded there); the runner loops until the policy says to
wait, and hands every started wave to the :class:`Publisher`.

Invariants:

- A wave's devices are announced to only after its start is committed, so every announced
  device has an update record to report against. Devices of waves that never start are
  never announced to.
- An announcement that fails is kept and retried at the start of the next
  :meth:`RolloutRunner.advance` of that rollout (in this process), before anything else.
- One :meth:`RolloutRunner.advance` takes at most ``2 * waves + 2`` steps; each started
  wave must soak or wait for reports before it can pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from coordinator.registry.api import Registry
from coordinator.registry.views import ReleaseView
from coordinator.rollout.policy import Complete, Decision, Halt, Snapshot, StartWave, Wait, decide

__all__ = ["Publisher", "RolloutRunner"]


class Publisher(Protocol):
    """Tells devices that a release is waiting for them (a hint; TUF decides what installs).

    Implementations must reach exactly ``device_ids``: a per-group announcement would also
    reach the devices of later waves.
    """

    def announce(self, device_ids: Sequence[str], release: ReleaseView) -> None:
        """Announce ``release`` to ``device_ids``; raise on failure (it will be retried)."""


class RolloutRunner:
    """Advances rollouts with ``decide`` (the pure policy by default)."""

    def __init__(
        self,
        registry: Registry,
        publisher: Publisher,
        *,
        decide: Callable[[Snapshot], Decision] = decide,
    ) -> None:
        self._registry = registry
        self._publisher = publisher
        self._decide = decide
        self._unsent: dict[int, list[tuple[tuple[str, ...], ReleaseView]]] = {}

    def advance(self, rollout_id: int) -> Decision:
        """Step ``rollout_id`` until the policy waits or the rollout ends; return the last
        decision (a :class:`Wait` says until when, a :class:`Halt` says why).

        Raises:
            coordinator.registry.errors.NotFoundError: no such rollout.
            Exception: whatever the publisher raised; the announcement is kept for a retry.
        """
        self._flush(rollout_id)
        waves = len(self._registry.snapshot(rollout_id).plan.waves)
        decision: Decision = Wait("no step taken")
        for _ in range(2 * waves + 2):
            decision, release = self._registry.step(rollout_id, self._decide)
            if isinstance(decision, StartWave):
                self._unsent.setdefault(rollout_id, []).append((decision.devices, release))
                self._flush(rollout_id)
            if isinstance(decision, Wait | Halt | Complete):
                return decision
        return decision

    def advance_all(self) -> dict[int, Decision]:
        """Advance every running or paused rollout; return each one's last decision."""
        return {rid: self.advance(rid) for rid in self._registry.active_rollouts()}

    def _flush(self, rollout_id: int) -> None:
        queue = self._unsent.get(rollout_id, [])
        while queue:
            devices, release = queue[0]
            self._publisher.announce(devices, release)
            queue.pop(0)
        self._unsent.pop(rollout_id, None)
