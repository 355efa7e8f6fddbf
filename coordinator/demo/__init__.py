"""``nanofleet demo``: a whole fleet on one machine, on embedded defaults.

The script, with progress shown throughout (:mod:`coordinator.demo.script`):

1. builds the Nano model from the PyPI GGUF (once; later runs find it in the cache) and
   makes the operator's workspace (:mod:`coordinator.demo.workspace`): the fleet CA, the
   release signing keys, the TUF repository with the model signed into it as the base;
2. starts mosquitto with the production mTLS config and per-device ACLs on a free loopback
   port (:mod:`coordinator.local_broker` says why a real mosquitto);
3. starts the coordinator, ``nanofleet serve`` (SQLite registry, MQTT ingestion, the
   repository files, the operator API with a generated token, the dashboard);
4. provisions each device (``--agents``, 3 by default), enrolls it with
   ``nanofleet-agent enroll``, starts ``nanofleet-agent run``, and waits until the
   coordinator's API shows every device online;
5. streams a chat answer from the first agent over its Unix socket;
6. signs an adapter-only release bound to the base and records it; then for the canary
   group (the first device) and, once that rollout completed, for the fleet group (the
   others): starts a rollout through the operator API, points the group's signed channel
   at the release, and shows each device's state and bytes until all have committed it;
7. (a hook for the federated round: not run until an agent command starts a device's
   SuperNode, see ``script._federated_round``);
8. prints the fleet as the coordinator sees it, the processes, the dashboard's URL; then
   stops (``--exit``) or waits for Ctrl-C.

Every process it starts is stopped by its PID on the way out (SIGTERM, then SIGKILL after
a grace period), whatever happened before. The demo never imports the agent: it drives it
through its commands and its socket, and the coordinator through its API.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DEFAULT_PROMPT", "run_demo"]

DEFAULT_PROMPT = "Give me three tips for staying healthy."


def __getattr__(name: str) -> Any:
    # The script imports the repository tooling, numpy and the HTTP client: load it only
    # when the demo runs, not for every `nanofleet` command that reads DEFAULT_PROMPT.
    if name == "run_demo":
        from coordinator.demo.script import run_demo

        return run_demo
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
