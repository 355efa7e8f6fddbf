"""The agent's one settings object: a TOML file plus ``NANOFLEET_`` environment overrides.

Invariants:

- Loaded once at start by :func:`load_settings`, frozen, passed down. Nothing else reads the
  environment or the file.
- Every key has a bounded default whose unit is in its name (``_s``, ``_bytes``, ...).
- Unknown keys are refused (a typo must not silently fall back to a default).
- An environment variable wins over the file: ``NANOFLEET_SERVER__QUEUE_LENGTH_MAX=4``
  overrides ``[server] queue_length_max``; nested keys are joined by ``__``.
- Any problem raises :class:`agent.errors.ConfigError` whose message names the key
  (``server.tcp_host``) and the rule it broke.
"""

from __future__ import annotations

import ipaddress
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from agent.errors import ConfigError
from agent.federated.eligibility import EligibilityPolicy
from agent.federated.store_limits import StoreLimits
from agent.ota.health import HealthPolicy
from protocol.topics import check_segment

#: A config file larger than this is refused before it is parsed.
CONFIG_FILE_MAX_BYTES = 1 << 20

ENV_PREFIX = "NANOFLEET_"

_Frozen = ConfigDict(frozen=True, extra="forbid")


class ModelSettings(BaseModel):
    """Which model the agent serves at start."""

    model_config = _Frozen

    #: The model directory (a bundle unpacked: graph, tokenizer, manifest).
    dir: Path
    #: ONNX Runtime intra-op threads; None lets the runtime pick (all cores).
    threads: Annotated[int, Field(ge=1, le=64)] | None = None
    #: Check every file's hash against the manifest when loading.
    verify: bool = True


class LimitSettings(BaseModel):
    """Bounds on everything a client of the inference API controls."""

    model_config = _Frozen

    body_max_bytes: Annotated[int, Field(ge=1024, le=16 << 20)] = 256 * 1024
    messages_max: Annotated[int, Field(ge=1, le=1024)] = 64
    max_tokens_max: Annotated[int, Field(ge=1, le=32768)] = 1024
    stop_strings_max: Annotated[int, Field(ge=0, le=16)] = 4
    stop_string_max_chars: Annotated[int, Field(ge=1, le=1024)] = 64


class SchedulerSettings(BaseModel):
    """How requests queue for the engine."""

    model_config = _Frozen

    #: Generations that run at once. 1 was measured best on a 2-core box (docs/server.md).
    concurrency: Annotated[int, Field(ge=1, le=16)] = 1
    #: Requests waiting for a slot; one more gets 429.
    queue_length_max: Annotated[int, Field(ge=0, le=4096)] = 16
    #: Wall time a request may take from admission to its last token.
    request_deadline_s: Annotated[float, Field(gt=0, le=3600)] = 120.0
    #: Value of the Retry-After header sent with 429.
    retry_after_s: Annotated[int, Field(ge=1, le=3600)] = 2
    #: A generation without a new token for this long counts as hung: the systemd watchdog
    #: pings stop and systemd restarts the agent.
    engine_stall_max_s: Annotated[float, Field(gt=0, le=3600)] = 60.0


class ServerSettings(BaseModel):
    """Where and how the local inference API listens."""

    model_config = _Frozen

    socket_path: Path = Path("/run/nanofleet/agent.sock")
    #: Group that owns the socket (name or number); members may connect (mode 0660).
    #: None keeps the agent's own group.
    socket_group: str | None = None
    #: Optional TCP listener; loopback addresses only. Requires tcp_token_file.
    tcp_host: str | None = None
    tcp_port: Annotated[int, Field(ge=1, le=65535)] | None = None
    #: File holding the bearer token TCP clients must send (at least 32 characters).
    tcp_token_file: Path | None = None
    #: On SIGTERM, in-flight requests get this long to finish before the agent exits.
    drain_timeout_s: Annotated[float, Field(gt=0, le=600)] = 30.0
    limits: LimitSettings = LimitSettings()
    scheduler: SchedulerSettings = SchedulerSettings()

    @model_validator(mode="after")
    def _tcp_is_loopback_with_token(self) -> Self:
        if self.tcp_host is None and self.tcp_port is None:
            if self.tcp_token_file is not None:
                raise ValueError("tcp_token_file is set but tcp_host/tcp_port are not")
            return self
        if self.tcp_host is None or self.tcp_port is None:
            raise ValueError("tcp_host and tcp_port must be set together")
        if not _is_loopback(self.tcp_host):
            raise ValueError(
                f"tcp_host {self.tcp_host!r} is not a loopback address "
                "(allowed: 127.0.0.0/8, ::1, localhost)"
            )
        if self.tcp_token_file is None:
            raise ValueError("tcp_token_file is required when the TCP listener is enabled")
        return self


class LogSettings(BaseModel):
    """Structured logs (JSON lines on stdout, for journald)."""

    model_config = _Frozen

    level: str = Field(default="INFO", pattern="^(DEBUG|INFO|WARNING|ERROR)$")


class OtaSettings(BaseModel):
    """Signed updates (``[ota]``, optional: without it the agent never updates).

    Example (see docs/ota.md)::

        [ota]
        state_dir = "/var/lib/nanofleet/ota"
        root_file = "/etc/nanofleet/root.json"
        repository_url = "https://coordinator.example/repo"
        group = "lab"
        channel = "stable"
        [ota.health]
        requests = 3

    ``state_dir`` must be on durable storage (the TUF cache there is the rollback
    protection) and on one file system (slots hard-link into the blob store).
    """

    model_config = _Frozen

    #: Durable state: TUF metadata cache, blob store, model slots, the update record.
    state_dir: Path
    #: The root metadata pinned at provisioning (the only source of trust).
    root_file: Path
    #: Base URL of the repository (``metadata/`` and ``targets/`` below it).
    repository_url: Annotated[str, Field(min_length=8, max_length=2048, pattern=r"^https?://")]
    #: The device group whose channel pointer (``channels/{group}/{channel}``) it installs.
    group: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][\w.-]*$")]
    #: The release channel within the group.
    channel: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][\w.-]*$")] = (
        "stable"
    )
    #: Check the repository this often even without an announcement (0: only on hints).
    poll_interval_s: Annotated[float, Field(ge=0, le=86400)] = 600.0
    #: A download slower than this on average is cut and resumed later.
    min_rate_bytes_s: Annotated[int, Field(ge=1, le=1 << 30)] = 16 * 1024
    #: The health gate (``[ota.health]``, :class:`agent.ota.health.HealthPolicy`).
    health: HealthPolicy = HealthPolicy()


def _segment(what: str) -> AfterValidator:
    return AfterValidator(lambda value: check_segment(value, what))


#: A device follows at most this many groups (the broker's ACL allows as many).
MQTT_GROUPS_MAX = 32
#: And at most this many release channels in each.
MQTT_CHANNELS_MAX = 8


class MqttSettings(BaseModel):
    """The MQTT link to the fleet's broker (``[mqtt]``, optional; :mod:`agent.mqtt`).

    Example::

        [mqtt]
        host = "broker.example"
        port = 8883
        device_id = "dev-a"
        groups = ["lab"]
        channels = ["stable"]
        ca_file = "/etc/nanofleet/ca.crt"
        cert_file = "/etc/nanofleet/device.crt"
        key_file = "/etc/nanofleet/device.key"

    Under mTLS (``ca_file``, ``cert_file``, ``key_file``, all three) the broker takes the
    certificate's common name as the identity its ACLs key on, and the link refuses to start
    unless that name is ``device_id``. Without them the link speaks plain MQTT, which is
    allowed only to a loopback broker (the embedded default).
    """

    model_config = _Frozen

    host: Annotated[str, Field(min_length=1, max_length=253)]
    port: Annotated[int, Field(ge=1, le=65535)] = 8883
    #: This device's id: its certificate's CN and its topic segment.
    device_id: Annotated[str, _segment("device_id")]
    #: Groups whose announcements (and round invitations) this device follows.
    groups: Annotated[
        tuple[Annotated[str, _segment("group")], ...],
        Field(min_length=1, max_length=MQTT_GROUPS_MAX),
    ]
    #: Release channels followed in every group.
    channels: Annotated[
        tuple[Annotated[str, _segment("channel")], ...],
        Field(min_length=1, max_length=MQTT_CHANNELS_MAX),
    ] = ("stable",)
    #: Follow the groups' round invitations too (federated personalization).
    follow_rounds: bool = True
    #: The fleet CA (PEM) that signed the broker's certificate.
    ca_file: Path | None = None
    #: This device's certificate and key (PEM).
    cert_file: Path | None = None
    key_file: Path | None = None
    keepalive_s: Annotated[int, Field(ge=5, le=600)] = 60
    #: How long the broker keeps this device's session (subscriptions, queued messages).
    session_expiry_s: Annotated[int, Field(ge=60, le=30 * 86400)] = 7 * 86400
    heartbeat_interval_s: Annotated[float, Field(ge=0.2, le=3600)] = 60.0
    #: TCP connect plus TLS handshake, per attempt.
    connect_timeout_s: Annotated[float, Field(gt=0, le=120)] = 10.0
    #: Reconnect backoff: attempt n waits a random time in [min, min(max, min * 2**(n+1))].
    reconnect_min_s: Annotated[float, Field(ge=0.05, le=600)] = 1.0
    reconnect_max_s: Annotated[float, Field(ge=0.05, le=3600)] = 120.0
    #: Received announcements and invitations waiting for the daemon; the oldest is dropped.
    event_queue_length_max: Annotated[int, Field(ge=1, le=4096)] = 64
    #: Update progress messages held while the broker is away; the oldest is dropped.
    outbox_length_max: Annotated[int, Field(ge=1, le=4096)] = 256
    #: On stop, how long to wait for the broker to take the "offline" status.
    stop_timeout_s: Annotated[float, Field(gt=0, le=60)] = 5.0

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        duplicates = sorted({g for g in self.groups if self.groups.count(g) > 1})
        duplicates += sorted({c for c in self.channels if self.channels.count(c) > 1})
        if duplicates:
            raise ValueError(f"groups and channels must not repeat a name: {duplicates}")
        if self.reconnect_min_s > self.reconnect_max_s:
            raise ValueError(
                f"reconnect_min_s ({self.reconnect_min_s:g}) exceeds reconnect_max_s "
                f"({self.reconnect_max_s:g})"
            )
        files = {"ca_file": self.ca_file, "cert_file": self.cert_file, "key_file": self.key_file}
        missing = [name for name, path in files.items() if path is None]
        if missing and len(missing) < len(files):
            raise ValueError(
                f"ca_file, cert_file and key_file go together for mTLS; missing: "
                f"{', '.join(missing)}"
            )
        if missing and not _is_loopback(self.host):
            raise ValueError(
                f"host {self.host!r} is not a loopback address: plain MQTT is only for a "
                "broker on this machine; set ca_file, cert_file and key_file for mTLS"
            )
        return self

    @property
    def tls(self) -> bool:
        """True when the link uses mTLS."""
        return self.ca_file is not None


class FederatedSettings(BaseModel):
    """Federated personalization (``[federated]``, optional): the device's SuperNode, run by
    ``nanofleet-agent supernode`` (:mod:`agent.supernode_cmd`).

    Example (``nanofleet device provision --superlink`` writes it)::

        [federated]
        enabled = true
        superlink = "fleet.example:9092"
        ca_file = "/etc/nanofleet/tls/ca.crt"
        node_key_file = "/etc/nanofleet/flower/supernode.key"
        data_path = "/var/lib/nanofleet-federated/training-texts.sqlite3"
        state_dir = "/var/lib/nanofleet-supernode"
        [federated.eligibility]
        idle_s = 300
        window = "22:00-06:00"
        min_examples = 64
        [federated.store]
        capture_enabled = false   # store what users write in chat turns (opt-in)
        max_age_s = 7776000       # retention: 90 days, 100,000 texts, 64 MiB

    The SuperNode is started only while the device is eligible
    (:mod:`agent.federated.eligibility`) and stopped when it leaves the window or its data
    falls short; an inference request during a round pauses training (serving marker)
    instead of ending it.
    """

    model_config = _Frozen

    #: Take part in rounds. Off: ``nanofleet-agent supernode`` exits at once.
    enabled: bool = False
    #: ``HOST:PORT`` of the SuperLink's Fleet API (TLS).
    superlink: Annotated[
        str,
        Field(
            min_length=3, max_length=260, pattern=r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):\d{1,5}$"
        ),
    ]
    #: The fleet CA (PEM) that signed the SuperLink's certificate.
    ca_file: Path
    #: The SuperNode's private key (OpenSSH PEM, P-384); ``enroll`` creates it, mode 0600.
    node_key_file: Path
    #: The local training-text store (:mod:`agent.federated.datastore`).
    data_path: Path
    #: The SuperNode's own state: its log and Flower home.
    state_dir: Path
    #: A file that exists while the agent serves a request (None: not watched).
    serving_marker: Path | None = None
    #: ``subprocess``: the SuperNode starts each ClientApp itself; ``process``: a separate
    #: ``flower-superexec`` (its own systemd unit) does, over the loopback Runtime API.
    isolation: Literal["subprocess", "process"] = "subprocess"
    #: Loopback port of the SuperNode's Runtime API (None: Flower's default, 9094).
    clientappio_port: Annotated[int, Field(ge=1, le=65535)] | None = None
    #: Secret shared with ``flower-superexec`` (``process`` isolation).
    superexec_secret_file: Path | None = None
    #: Count the store's training examples before starting. A deployment where the
    #: SuperNode may not read the store (the systemd units) turns it off; the ClientApp
    #: then finds the store short and the round goes on without this device.
    check_data: bool = True
    #: When this device may train.
    eligibility: EligibilityPolicy = EligibilityPolicy()
    #: The store's retention limits, and whether the agent stores the user's side of the
    #: chat turns it serves (``capture_enabled``, off by default). Applied by every writer:
    #: the agent's capture and ``nanofleet-agent data import``.
    store: StoreLimits = StoreLimits()
    #: How often eligibility is checked again.
    check_interval_s: Annotated[float, Field(ge=0.05, le=3600)] = 30.0

    @model_validator(mode="after")
    def _process_isolation_needs_secret(self) -> Self:
        if self.isolation == "process" and self.superexec_secret_file is None:
            raise ValueError("isolation 'process' needs superexec_secret_file")
        return self


class AgentSettings(BaseSettings):
    """Everything the agent is told by its operator."""

    model_config = SettingsConfigDict(
        frozen=True,
        extra="forbid",
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        case_sensitive=False,
    )

    model: ModelSettings
    server: ServerSettings = ServerSettings()
    log: LogSettings = LogSettings()
    ota: OtaSettings | None = None
    mqtt: MqttSettings | None = None
    federated: FederatedSettings | None = None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Earlier sources win: the environment overrides the file (passed as init values).
        return env_settings, init_settings


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _key(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


def load_settings(path: Path | None) -> AgentSettings:
    """Read the TOML file at ``path`` (if any), apply ``NANOFLEET_`` overrides, validate.

    Raises:
        ConfigError: the file is missing, too large or not TOML, or a key is unknown or
            invalid; the message names the key and the rule.
    """
    data: dict[str, Any] = {}
    if path is not None:
        data = _read_toml(path)
    try:
        return AgentSettings(**data)
    except ValidationError as e:
        problems = "; ".join(
            f"{_key(err['loc'])} (env {_env_name(err['loc'])}): {err['msg']}" + _input_note(err)
            for err in e.errors()
        )
        raise ConfigError(f"invalid configuration: {problems}") from e


def _env_name(loc: tuple[int | str, ...]) -> str:
    return ENV_PREFIX + "__".join(str(part) for part in loc).upper()


def _input_note(err: Any) -> str:
    if err["type"] == "missing":
        return ""
    shown = repr(err.get("input"))
    return f" (got {shown[:80]})"


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        size = path.stat().st_size
        if size > CONFIG_FILE_MAX_BYTES:
            raise ConfigError(
                f"config file {path}: {size} bytes exceeds the limit of "
                f"{CONFIG_FILE_MAX_BYTES} bytes"
            )
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"config file {path}: cannot read: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path}: not UTF-8 text") from e
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path}: not valid TOML: {e}") from e
