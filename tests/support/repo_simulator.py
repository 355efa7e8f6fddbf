"""A TUF repository in memory that signs on demand, for the OTA client's tests and attacks.

In the spirit of python-tuf's test simulator: the test holds the metadata objects and the
signers, changes anything (versions, expiry, keys, targets, custom fields, served bytes),
calls :meth:`RepoSimulator.publish` to re-sign, and watches the device's client refuse.
It is independent of the coordinator's repository code on purpose: it must be able to do
what a correct repository never does.

Files are served from :attr:`RepoSimulator.files` (URL path -> bytes; ``overrides`` win),
either through :class:`SimFetcher` (no network) or :class:`RepoHTTPServer` (a real loopback
HTTP server with Range support and fault knobs: throttling, a cut after N bytes, ignoring
Range, and a log of every request and byte sent).

Bundle builders (:func:`write_base_bundle`, :func:`write_adapter_bundle`) write a small
but real bundle directory: a valid manifest over a few KiB of files.
"""

from __future__ import annotations

import hashlib
import json
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from securesystemslib.signer import CryptoSigner, Signer
from tuf.api import exceptions
from tuf.api.metadata import (
    DelegatedRole,
    Delegations,
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer
from tuf.ngclient.fetcher import FetcherInterface

from agent.errors import HealthCheckFailedError
from agent.ota.client import RepositoryClient
from agent.ota.fetcher import FetchLimits, HttpFetcher
from agent.ota.lifecycle import Announce, Policy
from agent.ota.plan import PlannedBundle, PlannedFile, ReleasePlan
from agent.ota.runner import DeviceController, Outcome, RecordStore, UpdateRunner
from agent.ota.slots import SlotManager
from agent.ota.store import BlobStore
from protocol.bundle import (
    MANIFEST_NAME,
    AdapterInfo,
    BundleFile,
    BundleKind,
    BundleManifest,
    ModelInfo,
    bundle_hash,
    canonical_json,
)
from protocol.messages import BundleRef, ReleaseAnnouncement, UpdateProgress
from protocol.release import (
    ADAPTERS_ROLE,
    CHANNELS_ROLE,
    DELEGATED_PATHS,
    BundleTargetInfo,
    ChannelPointer,
    DevicePointer,
    bundle_target_path,
    channel_target_path,
    custom_field,
    device_pointer_path,
    manifest_target_path,
)

TOP_ROLES = ("root", "targets", "snapshot", "timestamp")
DELEGATED = (ADAPTERS_ROLE, CHANNELS_ROLE)

# ---- bundles ------------------------------------------------------------------------------


def _file_entry(path: str, data: bytes) -> BundleFile:
    return BundleFile(path=path, sha256=hashlib.sha256(data).hexdigest(), size=len(data))


def write_bundle(directory: Path, manifest: BundleManifest, files: dict[str, bytes]) -> Path:
    """Write ``files`` and ``manifest.json`` into ``directory``; return the directory."""
    directory.mkdir(parents=True, exist_ok=True)
    for path, data in files.items():
        (directory / path).parent.mkdir(parents=True, exist_ok=True)
        (directory / path).write_bytes(data)
    (directory / MANIFEST_NAME).write_bytes(canonical_json(manifest))
    return directory


def write_base_bundle(
    directory: Path,
    *,
    name: str = "tiny",
    version: str = "1.0.0",
    seed: int = 0,
    weights_bytes: int = 48 * 1024,
    max_adapter_rank: int = 8,
) -> BundleManifest:
    """Write a small base bundle (fake graph and weights, a real manifest) into ``directory``."""
    rng = random.Random(seed)
    tokenizer = json.dumps({"model": {"type": "BPE"}, "seed": seed}).encode()
    files = {
        "model.onnx": rng.randbytes(2048),
        "model.onnx.data": rng.randbytes(weights_bytes),
        "tokenizer.json": tokenizer,
    }
    manifest = BundleManifest(
        name=name,
        version=version,
        kind=BundleKind.BASE,
        files=[_file_entry(p, d) for p, d in files.items()],
        model=ModelInfo(
            architecture="llama",
            quantization="q4_1-exact",
            context_length=256,
            vocab_size=384,
            hidden_size=64,
            num_layers=2,
            tokenizer_sha256=hashlib.sha256(tokenizer).hexdigest(),
            chat_template="{% for m in messages %}{{ m.content }}{% endfor %}",
            bos_token_id=1,
            eos_token_ids=[2],
            max_adapter_rank=max_adapter_rank,
        ),
    )
    write_bundle(directory, manifest, files)
    return manifest


def write_adapter_bundle(
    directory: Path,
    base: BundleManifest,
    *,
    name: str = "tuned",
    version: str = "1",
    rank: int = 4,
    seed: int = 1,
    base_sha256: str | None = None,
) -> BundleManifest:
    """Write a small adapter bundle bound to ``base`` (or to ``base_sha256`` if given)."""
    assert base.model is not None
    data = random.Random(seed).randbytes(4096)
    manifest = BundleManifest(
        name=name,
        version=version,
        kind=BundleKind.ADAPTER,
        files=[_file_entry("adapter.npz", data)],
        adapter=AdapterInfo(
            target="lm_head",
            rank=rank,
            base_bundle_sha256=base_sha256 or bundle_hash(base),
            tokenizer_sha256=base.model.tokenizer_sha256,
        ),
    )
    write_bundle(directory, manifest, {"adapter.npz": data})
    return manifest


def ref_of(manifest: BundleManifest) -> BundleRef:
    return BundleRef(name=manifest.name, version=manifest.version, sha256=bundle_hash(manifest))


# ---- the simulator ------------------------------------------------------------------------


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


class RepoSimulator:
    """See the module docstring. Every role starts with one ed25519 key."""

    def __init__(self, *, lifetime: timedelta = timedelta(days=1)) -> None:
        self.lifetime = lifetime
        self.signers: dict[str, dict[str, Signer]] = {role: {} for role in (*TOP_ROLES, *DELEGATED)}
        self.files: dict[str, bytes] = {}
        self.overrides: dict[str, bytes] = {}
        self.counter = 0
        expires = _now() + lifetime
        self.root = Metadata(Root(consistent_snapshot=True, expires=expires))
        self.targets = Metadata(Targets(expires=expires))
        self.targets.signed.delegations = Delegations(keys={}, roles={})
        for role in DELEGATED:
            self.targets.signed.delegations.roles[role] = DelegatedRole(  # type: ignore[index]
                name=role,
                keyids=[],
                threshold=1,
                terminating=True,
                paths=list(DELEGATED_PATHS[role]),
            )
        self.delegated = {role: Metadata(Targets(expires=expires)) for role in DELEGATED}
        self.snapshot = Metadata(Snapshot(expires=expires))
        self.timestamp = Metadata(Timestamp(expires=expires))
        for role in (*TOP_ROLES, *DELEGATED):
            self.add_key(role)
        self.publish_root()
        self.publish(bump=False)

    # -- keys and signing

    def add_key(self, role: str) -> CryptoSigner:
        """Add a fresh key to ``role`` (in root or in the targets delegation)."""
        signer = CryptoSigner.generate_ed25519()
        if role in DELEGATED:
            self.targets.signed.add_key(signer.public_key, role)
        else:
            self.root.signed.add_key(signer.public_key, role)
        self.signers[role][signer.public_key.keyid] = signer
        return signer

    def revoke_keys(self, role: str) -> None:
        """Remove every key of ``role`` from its delegator and forget the signers."""
        for keyid in list(self.signers[role]):
            if role in DELEGATED:
                self.targets.signed.revoke_key(keyid, role)
            else:
                self.root.signed.revoke_key(keyid, role)
        self.signers[role].clear()

    def sign(self, md: Metadata[Any], role: str, signers: list[Signer] | None = None) -> bytes:
        md.signatures.clear()
        for signer in signers if signers is not None else self.signers[role].values():
            md.sign(signer, append=True)
        return md.to_bytes(JSONSerializer(compact=True))

    def publish_root(
        self, extra_signers: list[Signer] | None = None, *, bump: bool = False
    ) -> bytes:
        """Sign root with its own keys (plus ``extra_signers``, e.g. the previous root's)."""
        if bump:
            self.root.signed.version += 1
        data = self.sign(
            self.root, "root", [*self.signers["root"].values(), *(extra_signers or [])]
        )
        self.files[f"metadata/{self.root.signed.version}.root.json"] = data
        return data

    @property
    def root_bytes(self) -> bytes:
        return self.files["metadata/1.root.json"]

    def publish(
        self, roles: tuple[str, ...] = ("targets", *DELEGATED), *, bump: bool = True
    ) -> None:
        """Re-sign ``roles`` (bumping versions), then a new snapshot and timestamp."""
        for role in roles:
            md = self.targets if role == "targets" else self.delegated[role]
            if bump:
                md.signed.version += 1
            data = self.sign(md, role)
            self.files[f"metadata/{md.signed.version}.{role}.json"] = data
            self.snapshot.signed.meta[f"{role}.json"] = _meta(md.signed.version, data)
        self.publish_snapshot(bump=bump)

    def publish_snapshot(self, *, bump: bool = True) -> None:
        if bump:
            self.snapshot.signed.version += 1
        data = self.sign(self.snapshot, "snapshot")
        self.files[f"metadata/{self.snapshot.signed.version}.snapshot.json"] = data
        self.timestamp.signed.snapshot_meta = _meta(self.snapshot.signed.version, data)
        self.publish_timestamp(bump=bump)

    def publish_timestamp(self, *, bump: bool = True) -> None:
        if bump:
            self.timestamp.signed.version += 1
        self.files["metadata/timestamp.json"] = self.sign(self.timestamp, "timestamp")

    # -- content

    def add_target(
        self, role: str, path: str, data: bytes, custom: dict[str, Any] | None = None
    ) -> TargetFile:
        """List ``data`` as target ``path`` in ``role`` and serve it under its hashed name."""
        sha256 = hashlib.sha256(data).hexdigest()
        target = TargetFile(
            len(data),
            {"sha256": sha256},
            path,
            unrecognized_fields={"custom": custom} if custom is not None else None,
        )
        md = self.targets if role == "targets" else self.delegated[role]
        md.signed.targets[path] = target
        directory, _, name = path.rpartition("/")
        self.files[f"targets/{directory}/{sha256}.{name}"] = data
        return target

    def add_bundle(
        self,
        directory: Path,
        *,
        role: str | None = None,
        counter: int | None = None,
        info: dict[str, Any] | None = None,
    ) -> BundleManifest:
        """List every file of the bundle in ``directory`` (default role by kind).

        ``info`` replaces the manifest target's custom field verbatim (to publish what the
        protocol would refuse).
        """
        raw = (directory / MANIFEST_NAME).read_bytes()
        manifest = BundleManifest.model_validate_json(raw)
        kind = manifest.kind
        role = role or ("targets" if kind is BundleKind.BASE else ADAPTERS_ROLE)
        for entry in manifest.files:
            data = (directory / entry.path).read_bytes()
            self.add_target(
                role, bundle_target_path(kind, manifest.name, manifest.version, entry.path), data
            )
        if kind is BundleKind.BASE and counter is None:
            self.counter += 1
            counter = self.counter
        custom = info or custom_field(BundleTargetInfo(manifest=manifest, release_counter=counter))
        self.add_target(
            role, manifest_target_path(kind, manifest.name, manifest.version), raw, custom
        )
        return manifest

    def point(
        self,
        group: str,
        channel: str,
        base: BundleRef,
        adapter: BundleRef | None = None,
        *,
        role: str = CHANNELS_ROLE,
    ) -> ChannelPointer:
        pointer = ChannelPointer(group=group, channel=channel, base=base, adapter=adapter)
        self.add_target(
            role,
            channel_target_path(group, channel),
            canonical_json(pointer),
            custom_field(pointer),
        )
        return pointer

    def point_device(
        self,
        device_id: str,
        channel: str,
        base: BundleRef,
        adapter: BundleRef | None = None,
        *,
        role: str = CHANNELS_ROLE,
        names: str | None = None,
    ) -> DevicePointer:
        """List a device's own pointer at ``devices/{device_id}/{channel}``; ``names`` puts
        another device id inside it (an attack)."""
        pointer = DevicePointer(
            device_id=names or device_id, channel=channel, base=base, adapter=adapter
        )
        self.add_target(
            role,
            device_pointer_path(device_id, channel),
            canonical_json(pointer),
            custom_field(pointer),
        )
        return pointer

    def remove_target(self, role: str, path: str) -> None:
        """Stop listing ``path`` in ``role`` (publish to take effect)."""
        md = self.targets if role == "targets" else self.delegated[role]
        del md.signed.targets[path]

    # -- serving

    def serve(self, path: str) -> bytes | None:
        """Return the bytes served at URL path ``path`` (no leading slash), None for 404."""
        return self.overrides.get(path, self.files.get(path))


def _meta(version: int, data: bytes) -> MetaFile:
    return MetaFile(
        version=version, length=len(data), hashes={"sha256": hashlib.sha256(data).hexdigest()}
    )


class SimFetcher(FetcherInterface):
    """Serves a simulator's files without a network; URLs are ``http://sim/<path>``."""

    def __init__(self, sim: RepoSimulator) -> None:
        self.sim = sim

    def _fetch(self, url: str) -> Iterator[bytes]:
        path = url.removeprefix("http://sim/")
        data = self.sim.serve(path)
        if data is None:
            raise exceptions.DownloadHTTPError(f"{url}: not found", 404)
        return iter([data])


# ---- a real loopback HTTP server ------------------------------------------------------------


@dataclass
class ServerFaults:
    """Misbehaviour of :class:`RepoHTTPServer`, changeable while it runs."""

    throttle_bytes_per_s: float | None = None
    """Send the body in small pieces at this rate."""
    cut_after: dict[str, int] = field(default_factory=dict)
    """Path -> byte count: the next response for that path closes the connection after it."""
    ignore_range: bool = False
    wrong_content_range: bool = False
    """Answer a Range request with a Content-Range that starts one byte late."""


@dataclass(frozen=True)
class ServedRequest:
    path: str
    range: str | None
    status: int


class RepoHTTPServer:
    """Serves ``source(path)`` over HTTP/1.1 on loopback with Range; see :class:`ServerFaults`."""

    def __init__(self, source: Callable[[str], bytes | None]) -> None:
        self.source = source
        self.faults = ServerFaults()
        self.requests: list[ServedRequest] = []
        self.bytes_sent: Counter[str] = Counter()
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                # Headers and body go out in separate writes: without this, Nagle's
                # algorithm and the client's delayed ACK add 40 ms to every response.
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                server._serve(self)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def __enter__(self) -> RepoHTTPServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    def sent_to(self, prefix: str) -> int:
        """Bytes of bodies sent for paths starting with ``prefix``."""
        with self._lock:
            return sum(n for p, n in self.bytes_sent.items() if p.startswith(prefix))

    def _serve(self, handler: BaseHTTPRequestHandler) -> None:
        path = handler.path.lstrip("/")
        data = self.source(path)
        range_header = handler.headers.get("Range")
        faults = self.faults
        if data is None:
            self._log(path, range_header, 404)
            handler.send_response(404)
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        start = 0
        if range_header and not faults.ignore_range:
            start = int(range_header.removeprefix("bytes=").split("-")[0])
            handler.send_response(206)
            shown = start + 1 if faults.wrong_content_range else start
            handler.send_header("Content-Range", f"bytes {shown}-{len(data) - 1}/{len(data)}")
            self._log(path, range_header, 206)
        else:
            handler.send_response(200)
            self._log(path, range_header, 200)
        body = data[start:]
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        with self._lock:
            cut = faults.cut_after.pop(path, None)
        if cut is not None:
            body = body[:cut]
        self._send(handler, path, body, faults.throttle_bytes_per_s)
        if cut is not None:
            handler.close_connection = True
            handler.wfile.flush()
            handler.connection.shutdown(2)

    def _send(
        self, handler: BaseHTTPRequestHandler, path: str, body: bytes, rate: float | None
    ) -> None:
        piece = len(body) if rate is None else max(1, int(rate / 20))
        for i in range(0, len(body), piece):
            chunk = body[i : i + piece]
            try:
                handler.wfile.write(chunk)
                handler.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                return
            with self._lock:
                self.bytes_sent[path] += len(chunk)
            if rate is not None:
                time.sleep(len(chunk) / rate)  # the simulated slow link itself

    def _log(self, path: str, range_header: str | None, status: int) -> None:
        with self._lock:
            self.requests.append(ServedRequest(path, range_header, status))


# ---- a device wired to a simulator ----------------------------------------------------------


class FakeActivator:
    """Stands in for the live server: records activations; the health gate is scripted."""

    def __init__(self) -> None:
        self.activated: list[tuple[Path, Path | None]] = []
        self.rolled_back: list[Path | None] = []
        self.healthy = True

    def activate(self, base_dir: Path, adapter_dir: Path | None, plan: ReleasePlan) -> None:
        self.activated.append((base_dir, adapter_dir))

    def health_check(self, plan: ReleasePlan) -> None:
        if not self.healthy:
            raise HealthCheckFailedError("scripted: the new model answers badly")

    def rollback(self, base_dir: Path | None, adapter_dir: Path | None) -> None:
        self.rolled_back.append(base_dir)


class SimDevice:
    """One device's OTA stack (client, store, slots, runner) against ``repo_url``."""

    def __init__(
        self,
        state: Path,
        root: bytes,
        repo_url: str,
        *,
        limits: FetchLimits | None = None,
        group: str = "lab",
        channel: str = "stable",
        device_id: str | None = None,
    ) -> None:
        self.state = state
        self.activator = FakeActivator()
        self.reports: list[UpdateProgress] = []
        self.client = RepositoryClient(
            root=root,
            metadata_dir=state / "tuf",
            metadata_url=f"{repo_url}/metadata/",
            targets_url=f"{repo_url}/targets/",
            fetcher=HttpFetcher(limits or FetchLimits(read_timeout_s=5, deadline_s=30)),
        )
        self.store = BlobStore(state / "blobs")
        self.slots = SlotManager(state / "slots")
        self.controller = DeviceController(
            group=group,
            channel=channel,
            client=self.client,
            store=self.store,
            slots=self.slots,
            activator=self.activator,
            reporter=self.reports.append,
            device_id=device_id,
        )
        self.records = RecordStore(state / "record.json")
        self.runner = self.new_runner()

    def new_runner(self, policy: Policy | None = None) -> UpdateRunner:
        return UpdateRunner(
            self.controller,
            self.records,
            policy=policy or Policy(max_attempts=1),
            backoff=lambda attempt: 0.0,
            wait=lambda seconds: None,
        )

    def poll(self, hint: ReleaseAnnouncement | None = None) -> Outcome:
        return self.runner.handle(Announce(hint))

    def installed_files(self) -> dict[str, str]:
        """Path -> sha256 of every file in the committed slot (empty when none)."""
        current = self.slots.current()
        if current is None:
            return {}
        root = self.slots.path(current.slot)
        return {
            str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))
            if p.is_file()
        }


def _from_offset(data: bytes, offset: int) -> Iterator[bytes]:
    yield data[offset:]


def plan_from_bundle(
    directory: Path,
    *,
    counter: int = 1,
    adapter_dir: Path | None = None,
    group: str = "lab",
    channel: str = "stable",
    store: BlobStore | None = None,
) -> ReleasePlan:
    """Return the plan a device would verify for the bundle(s) on disk; fill ``store`` too."""

    def planned(bundle_dir: Path, release_counter: int | None) -> PlannedBundle:
        raw = (bundle_dir / MANIFEST_NAME).read_bytes()
        manifest = BundleManifest.model_validate_json(raw)
        files = []
        for path in [MANIFEST_NAME, *(f.path for f in manifest.files)]:
            data = (bundle_dir / path).read_bytes()
            sha256 = hashlib.sha256(data).hexdigest()
            target = bundle_target_path(manifest.kind, manifest.name, manifest.version, path)
            files.append(
                PlannedFile(
                    path=path, target_path=target, url_path=target, sha256=sha256, size=len(data)
                )
            )
            if store is not None:
                store.ingest(sha256, len(data), partial(_from_offset, data))
        return PlannedBundle(
            ref=ref_of(manifest), manifest=manifest, release_counter=release_counter, files=files
        )

    return ReleasePlan(
        group=group,
        channel=channel,
        timestamp_version=1,
        base=planned(directory, counter),
        adapter=planned(adapter_dir, None) if adapter_dir else None,
    )
