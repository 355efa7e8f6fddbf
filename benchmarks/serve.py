"""The inference server under load: 1, 4 and 8 concurrent streaming clients over the socket.

For each scheduler concurrency (generations the agent runs at once, ``--concurrency``), the
real daemon (``nanofleet-agent run``) is started on a private Unix socket with the real Nano
model, and each run measures, side by side:

- the engine called directly in this process (no HTTP, no scheduler): tokens/s of one
  greedy generation, from the chat text to its last token (prefill included);
- 1, 4 and 8 clients streaming the same chat request at once through the socket
  (``stream_options.include_usage`` gives the exact token count): aggregate tokens/s
  (every completion token over the wall time of the batch), first-token latency of each
  request, errors.

Ratios: server overhead = tokens/s of one request through the socket (from sending it to
its last byte) / the engine's own; scaling = aggregate tokens/s at 8 clients / at 1.
Figures are medians over ``--runs`` runs (the engine-direct and socket measurements
alternate within each run, with a short pause between them so neither side's idle ONNX
Runtime threads, which spin for a moment after a run, take the other's cores).

    .venv/bin/python benchmarks/serve.py [--runs 3] [--tokens 64] [--concurrency 1,2]

Ends with one JSON line of every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from statistics import median
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.fidelity import LONG_PROMPT as PROMPT  # noqa: E402 (after the path)

READY_TIMEOUT_S = 120.0
#: Between measurements: ONNX Runtime's pool threads spin briefly after a run.
PAUSE_S = 0.3


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def engine_direct(engine: Any, tokens: int) -> float:
    """Tokens/s of one greedy generation (prefill included), the engine called in-process."""
    from agent.runtime import SamplingParams

    start = time.perf_counter()
    ids = engine.encode(engine.render_chat([("user", PROMPT)]))
    gen = engine.generate(ids, SamplingParams(max_tokens=tokens))
    for _ in gen:
        pass
    end = time.perf_counter()
    if len(gen.token_ids) != tokens:
        raise SystemExit(f"the engine decoded {len(gen.token_ids)} tokens, expected {tokens}")
    return tokens / (end - start)


def stream_once(sock: Path, tokens: int) -> dict[str, Any]:
    """One streamed chat completion through the socket: timings and the token count."""
    body = {
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    transport = httpx.HTTPTransport(uds=os.fspath(sock))
    start = time.perf_counter()
    first: float | None = None
    usage: dict[str, Any] | None = None
    with (
        httpx.Client(transport=transport, base_url="http://agent", timeout=300) as client,
        client.stream("POST", "/v1/chat/completions", json=body) as response,
    ):
        if response.status_code != 200:
            return {"error": f"HTTP {response.status_code}: {response.read()[:200]!r}"}
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices", []):
                if first is None and choice.get("delta", {}).get("content"):
                    first = time.perf_counter()
    end = time.perf_counter()
    if first is None or usage is None:
        return {"error": "no content or no usage in the stream"}
    n = int(usage["completion_tokens"])
    return {"start": start, "first": first, "end": end, "tokens": n}


def batch(sock: Path, clients: int, tokens: int) -> dict[str, Any]:
    """``clients`` streams started together; aggregate throughput and first-token times."""
    results: list[dict[str, Any]] = [{} for _ in range(clients)]
    barrier = threading.Barrier(clients)

    def one(i: int) -> None:
        barrier.wait()
        try:
            results[i] = stream_once(sock, tokens)
        except httpx.HTTPError as e:
            results[i] = {"error": repr(e)}

    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    if not ok:
        return {"errors": len(errors), "error_samples": errors[:3]}
    wall = max(r["end"] for r in ok) - min(r["start"] for r in ok)
    single = ok[0]
    return {
        "errors": len(errors),
        "error_samples": errors[:3],
        "aggregate_tok_s": sum(r["tokens"] for r in ok) / wall,
        "first_token_ms": [(r["first"] - r["start"]) * 1000 for r in ok],
        "request_tok_s": single["tokens"] / (single["end"] - single["start"]),
        "short": sum(1 for r in ok if r["tokens"] != tokens),
    }


class Daemon:
    """The real agent on a private socket, stopped by its PID."""

    def __init__(self, model_dir: Path, concurrency: int, threads: int | None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="nanofleet-serve-bench-"))
        self.sock = self.dir / "agent.sock"
        config = self.dir / "agent.toml"
        threads_line = f"threads = {threads}\n" if threads else ""
        config.write_text(
            f'[model]\ndir = "{model_dir}"\nverify = false\n{threads_line}'
            f'[server]\nsocket_path = "{self.sock}"\n'
            f"[server.scheduler]\nconcurrency = {concurrency}\nqueue_length_max = 64\n",
            "utf-8",
        )
        exe = Path(sys.executable).with_name("nanofleet-agent")
        self.log = (self.dir / "agent.log").open("wb")
        self.proc = subprocess.Popen(
            [os.fspath(exe), "run", "--config", os.fspath(config)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        transport = httpx.HTTPTransport(uds=os.fspath(self.sock))
        with httpx.Client(transport=transport, base_url="http://agent", timeout=5) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise SystemExit(f"the agent exited with {self.proc.returncode}: {self.dir}")
                if self.sock.exists():
                    try:
                        if client.get("/readyz").status_code == 200:
                            return
                    except httpx.HTTPError:
                        pass
                time.sleep(0.1)
        raise SystemExit(f"the agent was not ready within {READY_TIMEOUT_S:g} s: {self.dir}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="model directory (default: the Nano model)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64, help="completion tokens per request")
    parser.add_argument("--clients", default="1,4,8", help="concurrent clients per batch")
    parser.add_argument(
        "--concurrency", default="1,2", help="scheduler concurrency settings to compare"
    )
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads")
    args = parser.parse_args()

    from agent.runtime import Engine, SamplingParams

    if args.model is None:
        from coordinator.models.build import build_smollm2

        args.model = build_smollm2().path
    clients = [int(c) for c in args.clients.split(",")]
    settings = [int(c) for c in args.concurrency.split(",")]

    engine = Engine.load(args.model, threads=args.threads, verify=False)
    for _ in engine.generate(engine.encode("Hello"), SamplingParams(max_tokens=4)):
        pass  # warm-up

    figures: dict[str, Any] = {
        "model": args.model.name,
        "tokens": args.tokens,
        "runs": args.runs,
        "cpus": os.cpu_count(),
    }
    direct_all: list[float] = []
    for concurrency in settings:
        daemon = Daemon(args.model, concurrency, args.threads)
        try:
            daemon.wait_ready()
            batch(daemon.sock, 1, 4)  # warm-up through the socket
            per: dict[int, list[dict[str, Any]]] = {n: [] for n in clients}
            direct: list[float] = []
            for run in range(args.runs):
                time.sleep(PAUSE_S)
                direct.append(engine_direct(engine, args.tokens))
                for n in clients:
                    time.sleep(PAUSE_S)
                    per[n].append(batch(daemon.sock, n, args.tokens))
                print(f"concurrency {concurrency}: run {run + 1}/{args.runs} done", flush=True)
        finally:
            daemon.stop()
        direct_all += direct
        key = f"c{concurrency}"
        figures[f"{key}_engine_tok_s"] = median(direct)
        for n in clients:
            rows = per[n]
            firsts = [ms for r in rows for ms in r.get("first_token_ms", [])]
            figures[f"{key}_n{n}_errors"] = sum(r["errors"] for r in rows)
            figures[f"{key}_n{n}_short"] = sum(r.get("short", 0) for r in rows)
            figures[f"{key}_n{n}_aggregate_tok_s"] = median(
                r["aggregate_tok_s"] for r in rows if "aggregate_tok_s" in r
            )
            figures[f"{key}_n{n}_first_token_p50_ms"] = _percentile(firsts, 0.5)
            figures[f"{key}_n{n}_first_token_p99_ms"] = _percentile(firsts, 0.99)
            samples = [s for r in rows for s in r.get("error_samples", [])]
            if samples:
                figures[f"{key}_n{n}_error_samples"] = samples[:3]
        one = [r["request_tok_s"] for r in per[clients[0]] if "request_tok_s" in r]
        figures[f"{key}_socket_tok_s"] = median(one)
        figures[f"{key}_overhead_ratio"] = median(one) / median(direct)
        if len(clients) > 1:
            figures[f"{key}_scaling_{clients[-1]}_vs_{clients[0]}"] = (
                figures[f"{key}_n{clients[-1]}_aggregate_tok_s"]
                / figures[f"{key}_n{clients[0]}_aggregate_tok_s"]
            )

    print()
    print(f"engine direct: {median(direct_all):.1f} tok/s (median, prefill included)")
    for concurrency in settings:
        key = f"c{concurrency}"
        print(f"\nscheduler concurrency {concurrency}:")
        print(f"  {'clients':>7} {'agg tok/s':>10} {'ttft p50':>9} {'ttft p99':>9} {'errors':>6}")
        for n in clients:
            print(
                f"  {n:>7} {figures[f'{key}_n{n}_aggregate_tok_s']:>10.1f}"
                f" {figures[f'{key}_n{n}_first_token_p50_ms']:>7.0f}ms"
                f" {figures[f'{key}_n{n}_first_token_p99_ms']:>7.0f}ms"
                f" {figures[f'{key}_n{n}_errors']:>6}"
            )
        print(
            f"  server overhead (one request's tok/s, socket / engine): "
            f"{figures[f'{key}_overhead_ratio']:.3f}"
        )
        if len(clients) > 1:
            name = f"{key}_scaling_{clients[-1]}_vs_{clients[0]}"
            print(f"  aggregate at {clients[-1]} / at {clients[0]} clients: {figures[name]:.2f}")
    print(json.dumps(figures, sort_keys=True))


if __name__ == "__main__":
    main()
