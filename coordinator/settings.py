"""The coordinator daemon's settings (`nanofleet serve`): one frozen object, loaded once.

Sources, later ones overridden by earlier ones: the TOML file given with ``--config``,
then ``NANOFLEET_`` environment variables (nested keys with ``__``, e.g.
``NANOFLEET_MQTT__HOST``). Every problem is a :class:`~coordinator.errors.ConfigError`
whose message names the key (and its environment variable) and the rule; the daemon exits
with :attr:`protocol.exitcodes.ExitCode.CONFIG` on it.

The operator token is given inline (``api_token``) or, better, in a file
(``api_token_file``, e.g. a systemd credential); exactly one of the two.
"""

from __future__ import annotations

import ipaddress
import tomllib
from pathlib import Path
from typing import Any, Final, Self

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from coordinator.errors import ConfigError

__all__ = [
    "CONFIG_FILE_MAX_BYTES",
    "ENV_PREFIX",
    "CoordinatorSettings",
    "FederationSettings",
    "MqttSettings",
    "load_settings",
]

ENV_PREFIX: Final = "NANOFLEET_"
CONFIG_FILE_MAX_BYTES: Final = 256 * 1024
MIN_TOKEN_CHARS: Final = 16
MAX_TOKEN_FILE_BYTES: Final = 4096


class MqttSettings(BaseModel):
    """The broker the coordinator ingests device reports from and announces releases on.

    Without the three TLS files the link is plain MQTT, allowed to a loopback broker only.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=8883, ge=1, le=65535)
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    shared_group: str | None = None
    """Share the device subscriptions with other coordinators ($share/<group>/...)."""
    queue_max: int = Field(default=10_000, ge=1, le=1_000_000)  # messages
    batch_max: int = Field(default=500, ge=1, le=5000)  # messages per transaction

    @model_validator(mode="after")
    def _tls_all_or_none(self) -> Self:
        given = [self.ca_file, self.cert_file, self.key_file]
        if any(given) and not all(given):
            raise ValueError("give all of ca_file, cert_file and key_file, or none")
        if not any(given) and not _is_loopback(self.host):
            raise ValueError(
                f"host {self.host!r} is not a loopback address: plain MQTT is only for a "
                "broker on this machine; set ca_file, cert_file and key_file for mTLS"
            )
        return self


class FederationSettings(BaseModel):
    """The SuperLink that ``nanofleet round start`` submits runs to, through the ``flwr`` CLI.

    The SuperLink runs beside the coordinator (Flower 1.42 serves its Control API, which has
    no login, on the Fleet API's port), so its address must be a loopback one; devices reach
    the Fleet API through a proxy that forwards only its routes.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    superlink: str = "127.0.0.1:9093"
    """``HOST:PORT`` of the SuperLink (loopback)."""
    ca_file: Path
    """The CA that signed the SuperLink's TLS certificate (the fleet CA)."""
    work_dir: Path = Path("federation")
    """Each round's Flower app, output and adapter bundle go to ``<work_dir>/<round id>``."""
    run_timeout_s: float = Field(default=3600.0, gt=0, le=7 * 86400)  # seconds per run
    poll_s: float = Field(default=1.0, gt=0, le=60)  # seconds between reads of the figures

    @model_validator(mode="after")
    def _loopback(self) -> Self:
        host, sep, port = self.superlink.rpartition(":")
        if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f"superlink {self.superlink!r} is not HOST:PORT")
        if not _is_loopback(host.strip("[]")):
            raise ValueError(
                f"superlink host {host!r} is not a loopback address: the SuperLink's Control "
                "API has no login and must stay on the coordinator's host"
            )
        return self


class CoordinatorSettings(BaseSettings):
    """Everything `nanofleet serve` is told by its operator."""

    model_config = SettingsConfigDict(
        frozen=True,
        extra="forbid",
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        case_sensitive=False,
    )

    database_url: str = "sqlite:///nanofleet-registry.sqlite3"
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)  # 0: any free port (tests)
    api_token: SecretStr | None = None
    api_token_file: Path | None = None
    repository_path: Path = Path("repository")
    """The TUF repository directory served under /repo."""
    keys: Path | None = None
    """The online signing keys' directory (timestamp, snapshot, channels, adapters). With it,
    each rollout wave signs its devices' own pointers; without it, rollouts only announce
    and devices install what their group's pointer names."""
    channel: str = Field(
        default="stable", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][\w.-]*$"
    )
    """The release channel rollouts move (the agents' ``ota.channel``)."""
    repository_url: str = "http://127.0.0.1:8080/repo"
    """The repository URL announcements name (advisory; devices trust their own)."""
    rollout_interval_s: float = Field(default=5.0, gt=0, le=3600)  # seconds between steps
    heartbeat_interval_s: float = Field(default=30.0, gt=0, le=86400)  # devices' interval
    missed_heartbeats: int = Field(default=3, ge=1, le=1000)  # before a device is offline
    mqtt: MqttSettings | None = None
    federation: FederationSettings | None = None
    """The SuperLink federated rounds run on; None: no rounds from this coordinator."""

    @model_validator(mode="after")
    def _one_token(self) -> Self:
        if (self.api_token is None) == (self.api_token_file is None):
            raise ValueError("give exactly one of api_token and api_token_file")
        if self.api_token is not None and len(self.api_token.get_secret_value()) < MIN_TOKEN_CHARS:
            raise ValueError(f"api_token must be at least {MIN_TOKEN_CHARS} characters")
        return self

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

    def token(self) -> str:
        """The operator token.

        Raises:
            ConfigError: the token file cannot be read, is too large, or holds a short token.
        """
        if self.api_token is not None:
            return self.api_token.get_secret_value()
        path = self.api_token_file
        if path is None:  # excluded by the validator
            raise ConfigError("api_token_file: not set")
        try:
            if path.stat().st_size > MAX_TOKEN_FILE_BYTES:
                raise ConfigError(f"api_token_file {path}: over {MAX_TOKEN_FILE_BYTES} bytes")
            token = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"api_token_file {path}: cannot read: {e}") from e
        if len(token) < MIN_TOKEN_CHARS:
            raise ConfigError(
                f"api_token_file {path}: the token must be at least {MIN_TOKEN_CHARS} characters"
            )
        return token


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _key(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


def _env_name(loc: tuple[int | str, ...]) -> str:
    return ENV_PREFIX + "__".join(str(part) for part in loc).upper()


def load_settings(path: Path | None) -> CoordinatorSettings:
    """Read the TOML file at ``path`` (if any), apply ``NANOFLEET_`` overrides, validate.

    Raises:
        ConfigError: the file is missing, too large or not TOML, or a key is unknown or
            invalid; the message names the key and the rule.
    """
    data: dict[str, Any] = _read_toml(path) if path is not None else {}
    try:
        return CoordinatorSettings(**data)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            loc = err["loc"]
            where = f"{_key(loc)} (env {_env_name(loc)})" if loc else "settings"
            note = "" if err["type"] == "missing" else f" (got {repr(err.get('input'))[:80]})"
            if err["type"] == "value_error" or "token" in _key(loc):
                note = ""  # never echo a token back
            problems.append(f"{where}: {err['msg']}{note}")
        raise ConfigError(f"invalid configuration: {'; '.join(problems)}") from e


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        size = path.stat().st_size
        if size > CONFIG_FILE_MAX_BYTES:
            raise ConfigError(
                f"config file {path}: {size} bytes exceeds the limit of {CONFIG_FILE_MAX_BYTES}"
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
