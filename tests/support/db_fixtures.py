"""Fixtures for the registry: fresh databases on SQLite and PostgreSQL, a manual clock.

- ``backend`` is parametrized over :data:`BACKENDS`, so a test that uses ``registry`` or
  ``database_url`` runs once per backend (the contract suite). ``sqlite_registry`` is for
  tests that only need a registry, not the backend comparison.
- One PostgreSQL server per session (:class:`tests.support.postgres.PostgresServer`),
  started only if a test asks for PostgreSQL. Each test gets its own database, cloned from
  a migrated template (PostgreSQL ``CREATE DATABASE ... TEMPLATE``, a file copy for SQLite),
  so no test sees another's rows and no test pays for the migrations.
- Missing PostgreSQL binaries fail the test with the message to run
  ``scripts/bootstrap.sh``; they are never a silent skip.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from coordinator.registry import Registry, make_engine, upgrade
from protocol.bundle import AdapterInfo, BundleFile, BundleKind, BundleManifest, ModelInfo
from protocol.rounds import FedAvg, RoundManifest
from tests.support.postgres import PostgresServer, PostgresUnavailableError

BACKENDS = ("sqlite", "postgresql")
EPOCH = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


class ManualClock:
    """A clock that moves only when told: ``clock()`` is now, ``clock.advance(s)`` moves on."""

    def __init__(self, start: datetime = EPOCH) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> datetime:
        self.now += timedelta(seconds=seconds)
        return self.now


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def make_manifest(
    name: str = "smollm2-135m",
    version: str = "1.0.0",
    kind: BundleKind = BundleKind.BASE,
    *,
    base_sha256: str | None = None,
) -> BundleManifest:
    """A valid manifest whose file hashes derive from ``name`` and ``version``."""
    tokenizer = _sha(f"tokenizer:{name}")
    if kind is BundleKind.BASE:
        return BundleManifest(
            name=name,
            version=version,
            kind=kind,
            files=[
                BundleFile(path="model.onnx", sha256=_sha(f"{name}:{version}:onnx"), size=1000),
                BundleFile(path="tokenizer.json", sha256=tokenizer, size=100),
            ],
            model=ModelInfo(
                architecture="llama",
                quantization="q4_1-exact",
                context_length=2048,
                vocab_size=49152,
                hidden_size=576,
                num_layers=30,
                tokenizer_sha256=tokenizer,
                chat_template="{{ messages }}",
                bos_token_id=1,
                eos_token_ids=[2],
                max_adapter_rank=16,
            ),
        )
    return BundleManifest(
        name=name,
        version=version,
        kind=kind,
        files=[BundleFile(path="adapter.npz", sha256=_sha(f"{name}:{version}:lora"), size=4096)],
        adapter=AdapterInfo(
            target="lm_head",
            rank=8,
            base_bundle_sha256=base_sha256 or _sha("base"),
            tokenizer_sha256=tokenizer,
        ),
    )


def make_round_manifest(
    round_id: str = "run-1", group: str = "edge", *, finished: bool = False
) -> RoundManifest:
    """A valid FedAvg run manifest, unfinished unless ``finished``."""
    return RoundManifest(
        round_id=round_id,
        group=group,
        rounds=3,
        cohort_size=4,
        min_nodes=2,
        adapter_rank=8,
        aggregation=FedAvg(kind="fedavg"),
        privacy=None,
        base_bundle_sha256=_sha("base"),
        result_sha256=_sha(f"{round_id}:result") if finished else None,
        started_at=EPOCH,
        finished_at=EPOCH + timedelta(minutes=5) if finished else None,
    )


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the whole session."""
    try:
        server = PostgresServer()
        server.start()
    except PostgresUnavailableError as e:
        pytest.fail(str(e), pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def _pg_template(postgres_server: PostgresServer) -> str:
    name = postgres_server.create_database()
    engine = make_engine(postgres_server.url(name))
    try:
        upgrade(engine)
    finally:
        engine.dispose()
    return name


@pytest.fixture(scope="session")
def _sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("registry-template") / "registry.sqlite3"
    engine = make_engine(f"sqlite:///{path}")
    try:
        upgrade(engine)
    finally:
        engine.dispose()
    return path


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """The database backend under test."""
    name: str = request.param
    return name


@pytest.fixture
def database_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of a fresh, empty (never migrated) database on ``backend``."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'empty.sqlite3'}"
        return
    server: PostgresServer = request.getfixturevalue("postgres_server")
    name = server.create_database()
    try:
        yield server.url(name)
    finally:
        server.drop_database(name)


@pytest.fixture
def registry_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of a fresh database on ``backend``, already at the newest revision."""
    if backend == "sqlite":
        path = tmp_path / "registry.sqlite3"
        shutil.copyfile(request.getfixturevalue("_sqlite_template"), path)
        yield f"sqlite:///{path}"
        return
    server: PostgresServer = request.getfixturevalue("postgres_server")
    name = server.create_database(template=request.getfixturevalue("_pg_template"))
    try:
        yield server.url(name)
    finally:
        server.drop_database(name)


@pytest.fixture
def clock() -> ManualClock:
    """A manual clock starting at :data:`EPOCH`."""
    return ManualClock()


def _registry(url: str, clock: ManualClock) -> Iterator[Registry]:
    engine = make_engine(url)
    try:
        yield Registry(engine, clock=clock)
    finally:
        engine.dispose()


@pytest.fixture
def registry(registry_url: str, clock: ManualClock) -> Iterator[Registry]:
    """A registry on a fresh migrated database, once per backend, driven by ``clock``."""
    yield from _registry(registry_url, clock)


@pytest.fixture
def sqlite_registry(
    _sqlite_template: Path, tmp_path: Path, clock: ManualClock
) -> Iterator[Registry]:
    """A registry on a fresh migrated SQLite file, driven by ``clock``."""
    path = tmp_path / "registry.sqlite3"
    shutil.copyfile(_sqlite_template, path)
    yield from _registry(f"sqlite:///{path}", clock)


@pytest.fixture
def manifest_factory() -> Callable[..., BundleManifest]:
    """:func:`make_manifest`, for tests that need releases."""
    return make_manifest
