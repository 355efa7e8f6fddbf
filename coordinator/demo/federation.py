"""The demo's federated round, driven as an operator and a device owner would drive it.

1. the SuperLink (:mod:`coordinator.federation.superlink`): TLS with a certificate from the
   fleet CA, SuperNode authentication, on a loopback port;
2. each device gets its slice of the domain texts (:mod:`coordinator.demo.domain_data`,
   group ``alpha``: NumPy's documentation) and loads it with ``nanofleet-agent data
   import``; its SuperNode key (created by ``nanofleet-agent enroll``) is registered with
   the SuperLink and its node ID bound to the device (``nanofleet round register-node``);
3. each device starts ``nanofleet-agent supernode``, which checks that the device may train
   and starts its ``flower-supernode``; each reaches the SuperLink through its own
   byte-counting relay (:mod:`coordinator.demo.relay`);
4. :func:`coordinator.federation.campaign.run_round` runs the round (SecAgg+ with three or
   more devices, client-side clipping and server noise), records it in the registry, gates
   it on held-out perplexity, packages and signs the adapter and records the release;
5. each device reports its held-out perplexity without and with the aggregate
   (``nanofleet-agent data evaluate``, the computation of the round's evaluate step).

``run_round`` then creates the adapter's canary rollout (:data:`CANARY`): one device
first, then the rest; the coordinator signs each wave's device pointers and each agent
reports its own held-out evaluation after it commits the adapter.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from coordinator.demo import workspace as wsp
from coordinator.demo.agents import Child, command
from coordinator.demo.domain_data import Group, device_slices
from coordinator.demo.fleet import HOST, Fleet, free_port
from coordinator.demo.relay import CountingRelay
from coordinator.errors import CoordinatorError
from coordinator.federation.campaign import (
    AdapterRelease,
    Canary,
    QualityGate,
    RoundOutcome,
    Stage,
    run_round,
)
from coordinator.federation.nodes import register_device_node
from coordinator.federation.rounds import RunSpec
from coordinator.federation.superlink import FlowerCli, SuperLink, SuperLinkConfig
from coordinator.registry import RoundMetricView, open_registry
from protocol.bundle import ADAPTER_NAME, BundleManifest

__all__ = [
    "DeviceRound",
    "RoundReport",
    "device_table",
    "prepare_links",
    "run_federated_round",
]

#: The domain the demo's devices share, and how much text each holds (characters).
DOMAIN: Group = "alpha"
TEXT_CHARS = 12_000
#: The adapter release the round produces (its group channel is only pointed without a
#: canary; the canary rollout moves each device's own pointer).
RELEASE_NAME = "nano-federated"
RELEASE_VERSION = "1"
CANDIDATE_CHANNEL = "candidate"
#: The demo's quality gate on the last round's mean held-out perplexity ratio: the product
#: default is 1.0 (no worse); with 3 devices the DP noise costs about what the round gains,
#: so the demo lets an adapter within 1 % through (and prints the bound).
MAX_PERPLEXITY_RATIO = 1.01
#: The adapter's rollout: one device first, then the rest, each wave soaking 2 s; a wave
#: halts it when a device fails, or when the devices' own held-out perplexity (measured by
#: each agent after it commits the adapter) worsens by more than 5 %.
CANARY = Canary(
    devices=1, soak_s=2, max_eval_regression=0.05, max_failure_rate=0.0, wave_timeout_s=300
)
#: Eligibility the demo's devices are given (defaults: 300 s idle, 64 examples).
MIN_EXAMPLES = 16
SUPERNODE_CHECK_S = 1.0
SUPERNODE_START_S = 60.0
IMPORT_S = 120.0
EVALUATE_S = 180.0
_STARTED = re.compile(r"SuperNode started, pid (\d+)")


def round_spec(devices: int) -> RunSpec:
    """The demo's run: 1 round (each costs five ClientApp processes per device, a minute or
    more on two shared cores), rank 4, every device; SecAgg+ from 3 devices (it needs 3 for
    any dropout tolerance); updates clipped to L2 norm 1 on the device and Gaussian noise
    (z 0.05: epsilon about 410 at delta 1e-5) added to the mean on the server. A larger
    clipping norm learns more (about -3 % held-out perplexity at norm 20 without noise), but
    any noise for a useful epsilon then destroys the adapter: three devices cannot carry
    client-level DP (docs/federated.md). No anchor term: the model would first write its 48
    anchor texts on each device (1-3 minutes each, three devices on two cores), more than
    the whole round, and one round clipped to norm 1 moves general text little anyway."""
    return RunSpec(
        round_id="demo-round-1",
        group=wsp.FLEET,
        rounds=1,
        cohort_size=devices,
        min_nodes=devices,
        secaggplus=devices >= 3,
        clip_norm=1.0,
        noise_multiplier=0.05,
        rank=4,
        seed=7,
        device={
            "epochs": 2,
            "learning-rate": 0.03,
            "batch-rows": 64,
            "l2": 0.0,
            "max-steps": 150,
            "max-compute-s": 25.0,
            "window": 64,
            "max-rows": 1500,
            "anchor-weight": 0.0,
        },
        timeout_s=420.0,
    )


@dataclass
class DeviceRound:
    """One device's part: its data, its held-out perplexity, its traffic in the round."""

    name: str
    store: str = ""
    base_perplexity: float | None = None
    perplexity: float | None = None
    sent: int = 0
    received: int = 0


@dataclass(frozen=True)
class RoundReport:
    outcome: RoundOutcome
    devices: dict[str, DeviceRound]
    seconds: float


def prepare_links(fleet: Fleet, names: list[str]) -> tuple[int, dict[str, str]]:
    """Pick the SuperLink's port and open one counting relay per device in front of it;
    return the port and each device's SuperLink address (its relay)."""
    port = free_port()
    addresses = {}
    for name in names:
        relay = CountingRelay((HOST, port)).start()
        fleet.relays[name] = relay
        addresses[name] = f"{HOST}:{relay.port}"
    return port, addresses


class _Progress:
    """Shows the round's stages and each recorded round."""

    def __init__(self, console: Console, status: Any, rounds: int) -> None:
        self._console = console
        self._status = status
        self._rounds = rounds
        self._started = time.monotonic()

    def stage(self, stage: Stage) -> None:
        what = {
            Stage.PREFLIGHT: "checking the base, the keys and the group",
            Stage.RUN: f"devices training (round 1/{self._rounds})",
            Stage.GATE: "checking the aggregate's held-out perplexity",
            Stage.PACKAGE: "packaging the adapter bundle",
            Stage.SIGN: "signing it with the adapters key",
            Stage.RELEASE: "recording the release",
            Stage.ROLLOUT: "creating its canary rollout",
            Stage.FINISH: "recording the round finished",
        }[stage]
        self._status.update(f"{what}...")

    def round_recorded(self, metric: RoundMetricView) -> None:
        elapsed = time.monotonic() - self._started
        perplexity = f"{metric.perplexity:.2f}" if metric.perplexity is not None else "-"
        loss = f"{metric.loss:.3f}" if metric.loss is not None else "-"
        self._console.print(
            f"   round {metric.number}/{self._rounds}: {metric.participants} device updates "
            f"aggregated, mean train loss {loss}, held-out perplexity of the aggregate "
            f"{perplexity} ({elapsed:.0f} s)"
        )
        if metric.number < self._rounds:
            self._status.update(f"devices training (round {metric.number + 1}/{self._rounds})...")


def _started(node: Child) -> Callable[[], bool]:
    return lambda: _STARTED.search(node.tail(50)) is not None


def _device_env() -> dict[str, str]:
    return {
        "NANOFLEET_FEDERATED__CLIENTAPPIO_PORT": str(free_port()),
        "NANOFLEET_FEDERATED__ELIGIBILITY__MIN_EXAMPLES": str(MIN_EXAMPLES),
        "NANOFLEET_FEDERATED__CHECK_INTERVAL_S": str(SUPERNODE_CHECK_S),
    }


def _agent_command(name: str, home: Path, args: list[str], log: str) -> Child:
    return Child(name, [command("nanofleet-agent"), *args], home / log)


def run_federated_round(
    console: Console,
    ws: wsp.Workspace,
    fleet: Fleet,
    homes: dict[str, Path],
    *,
    superlink_port: int,
    base: BundleManifest,
) -> RoundReport:
    """Run the demo's round on every device in ``homes`` (see the module docstring).

    Raises:
        CoordinatorError: a process failed to start, a device refused its data, or the
            round failed (it is then recorded ``failed`` and nothing is published).
    """
    started = time.monotonic()
    names = list(homes)
    devices = {name: DeviceRound(name) for name in names}
    tls = wsp.superlink_tls(ws)
    with console.status("starting flower-superlink (TLS, SuperNode authentication)..."):
        link = SuperLink(
            SuperLinkConfig(
                host=HOST,
                port=superlink_port,
                certfile=tls.certificate,
                keyfile=tls.key,
                ca_certfile=ws.ca_files.certificate,
                state_dir=ws.root / "superlink",
            )
        )
        fleet.superlink = link
        link.start()
    console.print(
        f"   flower-superlink pid {link.pid} on {link.config.address} (TLS from the fleet CA, "
        "only registered SuperNode keys)"
    )
    cli = FlowerCli(ws.root / "flower", link.config.address, ws.ca_files.certificate)

    slices = device_slices(DOMAIN, devices=len(names), max_chars=TEXT_CHARS)
    imports = []
    for name, piece in zip(names, slices, strict=True):
        home = homes[name]
        text = home / "training.txt"
        text.write_text("\n\n".join(piece.train_texts() + piece.heldout_texts()), "utf-8")
        child = _agent_command(
            f"{name}-import",
            home,
            ["data", "import", str(text), "--config", str(home / "etc" / "agent.toml")],
            "data-import.log",
        )
        child.start()
        imports.append((name, child, len(piece.train) + len(piece.heldout)))
    for name, child, documents in imports:
        if child.wait(IMPORT_S) != 0:
            raise CoordinatorError(f"{name}: data import failed:\n{child.tail()}")
        devices[name].store = child.tail(1).split(": ", 1)[-1]
        console.print(
            f"   {name}: {documents} documents of NumPy's docs imported "
            f"(nanofleet-agent data import): {devices[name].store}"
        )
    registry = open_registry(f"sqlite:///{ws.coordinator_dir / 'registry.sqlite3'}")
    try:
        nodes = [
            register_device_node(
                registry,
                cli,
                name,
                homes[name] / "etc" / "flower" / "supernode.pub",
                actor="nanofleet demo",
            )
            for name in names
        ]
    finally:
        registry.engine.dispose()
    console.print(
        f"   {len(names)} SuperNode public keys registered and bound to their devices "
        f"(nanofleet round register-node: node IDs {', '.join(str(n.node_id) for n in nodes)}); "
        "each private key was made on its device by nanofleet-agent enroll"
    )
    for name in names:
        home = homes[name]
        node = Child(
            f"{name}-supernode",
            [command("nanofleet-agent"), "supernode", "--config", str(home / "etc" / "agent.toml")],
            home / "supernode-command.log",
            env=_device_env(),
        )
        fleet.supernodes.append(node)
        node.start()
    for node in fleet.supernodes:
        name = node.name.removesuffix("-supernode")
        with console.status(f"waiting for {name}'s eligibility check and SuperNode..."):
            node.wait_until(_started(node), "SuperNode start", SUPERNODE_START_S)
        line = next(ln for ln in node.tail(50).splitlines() if _STARTED.search(ln))
        fleet.flower_pids[name] = int(_STARTED.search(line)[1])  # type: ignore[index]
        console.print(
            f"   {name}: nanofleet-agent supernode pid {node.pid}: "
            f"{line.removeprefix('supernode: ')}"
        )

    spec = round_spec(len(names))
    privacy = (
        f"SecAgg+ ({spec.cohort_size} shares), "
        if spec.secaggplus
        else "no SecAgg+ (< 3 devices), "
    ) + f"updates clipped to L2 {spec.clip_norm:g}, noise z {spec.noise_multiplier:g}"
    console.print(
        f"   run {spec.round_id}: {spec.rounds} round(s), rank-{spec.rank} LM-head adapter, "
        f"{privacy}; published if the aggregate's mean held-out perplexity ratio is at most "
        f"{MAX_PERPLEXITY_RATIO:g}"
    )
    before = {name: (r.sent, r.received) for name, r in fleet.relays.items()}
    registry = open_registry(f"sqlite:///{ws.coordinator_dir / 'registry.sqlite3'}")
    try:
        with console.status("starting the run...") as status:
            outcome = run_round(
                spec,
                base=base,
                registry=registry,
                repository=ws.repository(),
                driver=cli,
                work_dir=ws.root / "round",
                release=AdapterRelease(RELEASE_NAME, RELEASE_VERSION, channel=CANDIDATE_CHANNEL),
                gate=QualityGate(max_perplexity_ratio=MAX_PERPLEXITY_RATIO),
                canary=CANARY,
                actor="nanofleet demo",
                progress=_Progress(console, status, spec.rounds),
                poll_s=0.5,
            )
    finally:
        registry.engine.dispose()
    for name, relay in fleet.relays.items():
        devices[name].sent = relay.sent - before[name][0]
        devices[name].received = relay.received - before[name][1]
    privacy_done = outcome.result.manifest.privacy
    epsilon = privacy_done.epsilon if privacy_done is not None else None
    console.print(
        f"   run {spec.round_id} finished in {time.monotonic() - started:.0f} s; "
        f"{RELEASE_NAME} {RELEASE_VERSION} ({outcome.published.sha256[:12]}) signed by the "
        f"adapters key, bound to {base.name} {base.version}; client-level DP: "
        + (f"epsilon {epsilon:.3g}" if epsilon is not None else "epsilon not finite")
        + f" at delta {spec.delta:g} (3 devices cannot carry DP, see docs/federated.md)"
    )
    _evaluate(console, homes, devices, outcome.bundle_dir / ADAPTER_NAME, spec)
    console.print(f"   {_agreement(devices, outcome.result.rounds)}")
    return RoundReport(outcome, devices, time.monotonic() - started)


def _agreement(devices: dict[str, DeviceRound], rounds: list[dict[str, Any]]) -> str:
    """Whether the devices' own figures are those the round's last evaluate step reported
    (the ServerApp records them without the device's name, so they compare as sets)."""
    last = rounds[-1] if rounds else {}
    reported = sorted(float(p) for p in last.get("device_perplexity") or [])
    measured = sorted(d.perplexity for d in devices.values() if d.perplexity is not None)
    same = len(reported) == len(measured) and all(
        abs(a - b) <= 1e-6 * max(1.0, abs(b)) for a, b in zip(measured, reported, strict=True)
    )
    if same:
        return (
            "each device's held-out perplexity with the adapter is the one it reported in "
            "the round's evaluate step"
        )
    shown = ", ".join(f"{p:.3f}" for p in measured)
    sent = ", ".join(f"{p:.3f}" for p in reported)
    return (
        f"[yellow]the devices measured {shown}; the round's evaluate step reported {sent}[/yellow]"
    )


def _evaluate(
    console: Console,
    homes: dict[str, Path],
    devices: dict[str, DeviceRound],
    adapter: Path,
    spec: RunSpec,
) -> None:
    children = []
    for name, home in homes.items():
        child = _agent_command(
            f"{name}-evaluate",
            home,
            [
                "data", "evaluate", "--config", str(home / "etc" / "agent.toml"),
                "--adapter", str(adapter), "--json",
                "--window", str(spec.device["window"]),
                "--max-rows", str(spec.device["max-rows"]),
            ],
            "data-evaluate.log",
        )  # fmt: skip
        child.start()
        children.append((name, child))
    with console.status("each device measures its held-out perplexity with the adapter..."):
        for name, child in children:
            if child.wait(EVALUATE_S) != 0:
                raise CoordinatorError(f"{name}: evaluation failed:\n{child.tail()}")
            figures = json.loads(child.tail(1))
            devices[name].base_perplexity = float(figures["base_perplexity"])
            devices[name].perplexity = float(figures["perplexity"])


def device_table(report: RoundReport, updates: list[dict[str, Any]], adapter_size: int) -> Table:
    """Per device: held-out perplexity before and after, and what crossed the network."""
    downloads = {u["device_id"]: int(u.get("bytes_done", 0)) for u in updates}
    table = Table(title=f"the federated round {report.outcome.round.id} (per device)")
    for col in ("device", "held-out ppl", "change", "round sent", "round recv", "release"):
        table.add_column(col, no_wrap=True)
    for name, d in report.devices.items():
        if d.base_perplexity is not None and d.perplexity is not None:
            ppl = f"{d.base_perplexity:.2f} -> {d.perplexity:.2f}"
            change = f"{(d.perplexity / d.base_perplexity - 1) * 100:+.2f} %"
        else:
            ppl, change = "-", "-"
        table.add_row(
            name, ppl, change, f"{d.sent:,} B", f"{d.received:,} B",
            f"{downloads.get(name, 0):,} B",
        )  # fmt: skip
    rounds = report.outcome.result.rounds
    table.caption = (
        "held-out ppl: the device's held-out texts, base model -> with the round's adapter "
        "(nanofleet-agent data evaluate);\nround sent/recv: TLS bytes between the device's "
        f"SuperNode and the SuperLink over {len(rounds)} round(s) (the adapter update, Flower's "
        f"polls; never text); release: the adapter bundle ({adapter_size:,} B) downloaded"
    )
    return table
