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
6. runs a federated round (:mod:`coordinator.demo.federation`): a Flower SuperLink, each
   device's slice of the domain texts loaded with ``nanofleet-agent data import``, its
   SuperNode key registered and ``nanofleet-agent supernode`` started (each through a
   byte-counting relay); :func:`coordinator.federation.campaign.run_round` records, gates,
   packages and signs the adapter; each device measures its held-out perplexity with it;
7. rolls the round's adapter out: for the canary group (the first device) and, once that
   rollout completed, for the fleet group (the others): starts a rollout through the
   operator API, points the group's signed channel at the release, and shows each device's
   state and bytes until all have committed it;
8. prints the fleet as the coordinator sees it, the round per device (perplexity before and
   after, bytes sent and received), the processes, the dashboard's URL; then stops
   (``--exit``) or waits for Ctrl-C.

Every process it starts is stopped by its PID on the way out (SIGTERM, then SIGKILL after
a grace period), whatever happened before, and so are the children Flower's processes left.
The demo never imports the agent: it drives it through its commands and its socket, and the
coordinator through its API and its library.
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
