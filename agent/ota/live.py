"""The running agent's side of an update: load a slot, swap it in, judge it, go back.

:class:`LiveActivator` is the :class:`~agent.ota.runner.Activator` of the daemon. It runs
in the update thread, never in the server's event loop:

- ``activate`` loads the staged slot (hashes verified, logits checked finite) while the
  old model keeps serving, measures the old model with the smoke prompts (the baseline),
  then swaps the new one in. Requests admitted before the swap finish on the old model.
- ``health_check`` sends the same smoke prompts through the agent's own Unix socket, as a
  client would, and lets :func:`agent.ota.health.judge` decide; a refusal raises
  :class:`~agent.errors.HealthCheckFailedError` with the reason.
- ``rollback`` swaps the old model back if this process still holds it; after a restart
  the daemon already serves the committed slot, so there is nothing to undo.
"""

from __future__ import annotations

import http.client
import json
import logging
import socket
import time
from collections.abc import Callable
from pathlib import Path

from agent.errors import ActivationFailedError, HealthCheckFailedError, ModelError
from agent.ota.health import SMOKE_PROMPTS, HealthPolicy, Sample, judge
from agent.ota.plan import ReleasePlan
from agent.runtime.served import ServedModel, load_served
from agent.server.holder import ModelHolder

log = logging.getLogger("nanofleet.agent.ota")

#: The most bytes a smoke answer may stream back.
SMOKE_RESPONSE_MAX_BYTES = 1 << 20


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("agent", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self._path))
        except OSError:
            sock.close()
            raise
        self.sock = sock


def probe_socket(path: Path, model: str, prompt: str, max_tokens: int, timeout_s: float) -> Sample:
    """One greedy streamed chat request over the agent's socket, timed as a client sees it."""
    body = json.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    conn = _UnixConnection(path, timeout_s)
    started = time.monotonic()
    try:
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            detail = resp.read(4096).decode("utf-8", "replace")
            return Sample(ok=False, error=f"HTTP {resp.status}: {detail[:300]}")
        first: float | None = None
        parts: list[str] = []
        tokens = 0
        received = 0
        for raw in resp:
            received += len(raw)
            if received > SMOKE_RESPONSE_MAX_BYTES:
                return Sample(ok=False, error="the answer exceeded the size limit")
            line = raw.decode("utf-8", "replace").strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            if chunk.get("usage"):
                tokens = int(chunk["usage"].get("completion_tokens", 0))
            for choice in chunk.get("choices", []):
                text = choice.get("delta", {}).get("content")
                if text:
                    if first is None:
                        first = time.monotonic()
                    parts.append(text)
        end = time.monotonic()
    except (OSError, http.client.HTTPException, ValueError) as e:
        return Sample(ok=False, error=f"{type(e).__name__}: {e}")
    finally:
        conn.close()
    if first is None:
        return Sample(ok=False, error="the stream carried no text")
    return Sample(
        ok=True,
        text="".join(parts),
        first_token_s=first - started,
        tokens=tokens,
        decode_s=end - first,
    )


class LiveActivator:
    """See the module docstring."""

    def __init__(
        self,
        holder: ModelHolder[ServedModel],
        *,
        socket_path: Path,
        policy: HealthPolicy,
        threads: int | None,
        probe: Callable[[Path, str, str, int, float], Sample] = probe_socket,
        loader: Callable[..., ServedModel] = load_served,
    ) -> None:
        self.holder = holder
        self.socket_path = socket_path
        self.policy = policy
        self.threads = threads
        self._probe = probe
        self._loader = loader
        self._previous: ServedModel | None = None
        self._baseline: list[Sample] = []

    def _smoke(self) -> list[Sample]:
        model = str(self.holder.current().manifest.name)
        return [
            self._probe(
                self.socket_path,
                model,
                SMOKE_PROMPTS[i % len(SMOKE_PROMPTS)],
                self.policy.max_tokens,
                self.policy.request_timeout_s,
            )
            for i in range(self.policy.requests)
        ]

    def activate(self, base_dir: Path, adapter_dir: Path | None, plan: ReleasePlan) -> None:
        try:
            new = self._loader(base_dir, adapter_dir, threads=self.threads)
        except ModelError as e:
            raise ActivationFailedError(f"the staged model does not load: {e}") from e
        self._baseline = self._smoke()
        self._previous = self.holder.swap(new)
        log.info(
            "activated",
            extra={"event": "activated", "base": str(base_dir), "adapter": str(adapter_dir)},
        )

    def health_check(self, plan: ReleasePlan) -> None:
        samples = self._smoke()
        reason = judge(self.policy, self._baseline, samples)
        if reason is not None:
            raise HealthCheckFailedError(f"the new model failed its health gate: {reason}")
        self._previous = None  # committed next; the old engine goes once its requests end

    def rollback(self, base_dir: Path | None, adapter_dir: Path | None) -> None:
        if self._previous is not None:
            self.holder.swap(self._previous)
            self._previous = None
            log.warning("rolled back to the previous model", extra={"event": "rolled_back"})
