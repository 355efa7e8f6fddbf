"""Opt-in capture of chat turns, end to end, and what the device says over MQTT meanwhile.

The agent daemon runs as a real process (tiny model, real Unix socket) connected to real
mosquitto under mTLS with the fleet's ACLs, with a ``[federated]`` section. With
``[federated.store] capture_enabled`` the user's side of each chat turn it answers (plain
and streamed) lands in the local training store, and the model's replies do not; by default
nothing is stored. A coordinator client records everything the device publishes (every
device topic; the ACLs let a device publish nowhere else) while the agent serves and
captures: none of the captured or imported text is in it. The Flower side of the same
claim is ``test_federated.py::test_no_training_text_leaves_the_device``.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from agent.federated.datastore import LocalTextStore, Source, Split
from coordinator import pki
from protocol import topics
from tests.support.mosquitto import DEVICE_A, GROUP_A, TlsBroker
from tests.support.mqtt_client import RecordingClient
from tests.support.processes import ManagedProcess, notified

AGENT = [os.fspath(Path(os.sys.executable).parent / "nanofleet-agent"), "run"]
IMPORTED = "Vectorised ufuncs broadcast their operands before the inner loop runs."
TURNS = (
    "Which aisle holds the garden hoses at the Lakeside branch, please?",
    "Does the Lakeside branch rent carpet cleaners on Sundays?",
)


def _config(
    path: Path, model_dir: Path, sock: Path, data: Path, broker: TlsBroker, capture: bool | None
) -> Path:
    ident = broker.identities[DEVICE_A]
    switch = "" if capture is None else f"capture_enabled = {str(capture).lower()}\n"
    store = f"[federated.store]\n{switch}" if switch else ""
    path.write_text(
        f'[model]\ndir = "{model_dir}"\nthreads = 1\n'
        f'[server]\nsocket_path = "{sock}"\n'
        f'[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\ndevice_id = "{DEVICE_A}"\n'
        f'groups = ["{GROUP_A}"]\nca_file = "{broker.ca_file}"\n'
        f'cert_file = "{ident.cert_file}"\nkey_file = "{ident.key_file}"\n'
        "heartbeat_interval_s = 0.5\n"
        f'[federated]\nsuperlink = "127.0.0.1:9092"\nca_file = "{broker.ca_file}"\n'
        f'node_key_file = "{path.parent / "supernode.key"}"\ndata_path = "{data}"\n'
        f'state_dir = "{path.parent / "supernode"}"\n{store}',
        "utf-8",
    )
    return path


@pytest.fixture
def run_dir() -> Iterator[Path]:
    # Short: a Unix socket path has at most 107 bytes.
    with tempfile.TemporaryDirectory(prefix="nf-cap-", dir="/tmp") as d:
        yield Path(d)


def _chat(sock: Path, text: str, *, stream: bool) -> None:
    body = {
        "messages": [
            {"role": "system", "content": "You answer questions about our stores."},
            {"role": "user", "content": f"  {text}\n"},
        ],
        "max_tokens": 8,
        "temperature": 0,
        "stream": stream,
    }
    transport = httpx.HTTPTransport(uds=os.fspath(sock))
    with httpx.Client(transport=transport, base_url="http://agent", timeout=60) as c:
        if stream:
            with c.stream("POST", "/v1/chat/completions", json=body) as r:
                assert r.status_code == 200
                assert "[DONE]" in "".join(r.iter_text())
        else:
            r = c.post("/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text


def _serve_turns(
    tiny_model_dir: Path, run_dir: Path, broker: TlsBroker, capture: bool | None
) -> tuple[Path, list[bytes]]:
    """Run the agent, chat twice, wait for heartbeats after; return the store and what
    the device published."""
    sock, data = run_dir / "agent.sock", run_dir / "texts.sqlite3"
    store = LocalTextStore.open(data)
    store.add_texts([IMPORTED], Source.IMPORT)
    store.close()
    config = _config(run_dir / "agent.toml", tiny_model_dir, sock, data, broker, capture)
    coordinator = pki.COORDINATOR_IDENTITY
    with RecordingClient(
        broker.host, broker.port, coordinator, context=broker.context(coordinator)
    ) as watcher:
        for f in topics.COORDINATOR_FILTERS:
            watcher.subscribe(f)
        with ManagedProcess([*AGENT, "--config", config], notify=True, name="agent") as agent:
            agent.wait_ready(notified("READY=1"), timeout=60)
            _chat(sock, TURNS[0], stream=False)
            _chat(sock, TURNS[1], stream=True)
            seen = len(watcher.messages)
            deadline = time.monotonic() + 20
            heartbeat = topics.device_heartbeat(DEVICE_A)
            while sum(m.topic == heartbeat for m in watcher.messages[seen:]) < 2:
                assert time.monotonic() < deadline, "no heartbeat after the chat turns"
                time.sleep(0.05)
        # SIGTERM: the capture's queued writes finish before the process exits.
        published = [m.payload for m in watcher.messages]
    return data, published


def _stored(data: Path) -> set[str]:
    """Every text in the store, both splits."""
    store = LocalTextStore.open(data)
    try:
        return set(store.texts(Split.TRAIN)) | set(store.texts(Split.HELDOUT))
    finally:
        store.close()


def test_captured_turns_are_stored_and_never_published(
    tiny_model_dir: Path, run_dir: Path, mosquitto_tls: TlsBroker
) -> None:
    data, published = _serve_turns(tiny_model_dir, run_dir, mosquitto_tls, capture=True)
    # The user's side of both turns, stripped; not the system prompt, not the replies.
    assert _stored(data) == {IMPORTED, *TURNS}
    assert published, "the device published nothing: the watcher saw no traffic"
    wire = b"\n".join(published)
    for text in (IMPORTED, *TURNS):
        data_bytes = text.encode("utf-8")
        for start in range(0, len(data_bytes) - 16, 8):
            assert data_bytes[start : start + 16] not in wire, text


@pytest.mark.parametrize("capture", [None, False], ids=["default", "off"])
def test_without_capture_no_turn_is_stored(
    tiny_model_dir: Path, run_dir: Path, mosquitto_tls: TlsBroker, capture: bool | None
) -> None:
    data, _ = _serve_turns(tiny_model_dir, run_dir, mosquitto_tls, capture=capture)
    assert _stored(data) == {IMPORTED}
