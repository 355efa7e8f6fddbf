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
from typing import Annotated, Any, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from agent.errors import ConfigError

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
