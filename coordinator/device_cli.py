"""`nanofleet device ...`: give a new device its identity (see :mod:`coordinator.provision`).

Errors print one line and exit with :attr:`~protocol.exitcodes.ExitCode.BAD_INPUT` (a
refused input) or :attr:`~protocol.exitcodes.ExitCode.CONFIG` (a missing or unreadable
setting, such as the CA's key or its passphrase).
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import Annotated

import typer
from rich.console import Console

from coordinator import pki
from coordinator.errors import ConfigError, CoordinatorError, RefusedError
from coordinator.provision import (
    MODEL_DIR,
    MQTT_TLS_PORT,
    SOCKET_GROUP,
    EnrollmentRequest,
    build_enrollment,
    write_enrollment,
)
from protocol.exitcodes import ExitCode

device_app = typer.Typer(
    help="Provision devices: identity, certificate, agent config and pinned TUF root.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

#: The passphrase of an encrypted CA key comes from this variable (never a command line).
CA_PASSPHRASE_ENV = "NANOFLEET_CA_PASSPHRASE"  # noqa: S105 (a variable name)

_err = Console(stderr=True)


def _fail(message: str, code: ExitCode) -> typer.Exit:
    _err.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _split_host_port(broker: str) -> tuple[str, int]:
    """``HOST``, ``HOST:PORT`` or ``[IPV6]:PORT``; a bare IPv6 address takes the default port."""
    if broker.startswith("["):
        host, sep, port = broker[1:].partition("]:")
        if not sep:
            return broker.strip("[]"), MQTT_TLS_PORT
    elif broker.count(":") == 1:
        host, _, port = broker.partition(":")
    else:
        return broker, MQTT_TLS_PORT
    if not port.isdigit():
        raise ConfigError(f"--broker {broker!r}: the port after ':' is not a number")
    return host, int(port)


@device_app.command("ca-init")
def ca_init(
    out: Annotated[Path, typer.Option("--out", help="Directory for ca.crt and ca.key.")],
    name: Annotated[str, typer.Option(help="The CA's common name.")] = "nanofleet fleet CA",
) -> None:
    """Create the fleet CA (once): ca.crt for brokers and devices, ca.key (0600) to keep
    offline, encrypted with NANOFLEET_CA_PASSPHRASE when it is set."""
    try:
        out.mkdir(mode=0o700, parents=True, exist_ok=True)
        if (out / "ca.key").exists() or (out / "ca.crt").exists():
            raise RefusedError(f"{out} already holds a CA; a fleet has one CA")
        passphrase = os.environ.get(CA_PASSPHRASE_ENV)
        ca = pki.create_ca(name)
        pki.write_credential(ca, out, "ca", passphrase=passphrase.encode() if passphrase else None)
    except ConfigError as e:
        raise _fail(str(e), ExitCode.CONFIG) from None
    except CoordinatorError as e:
        raise _fail(str(e), ExitCode.BAD_INPUT) from None
    except OSError as e:
        raise _fail(f"cannot write {out}: {e.strerror}", ExitCode.STATE_CORRUPT) from None
    typer.echo(
        f"wrote {out / 'ca.crt'} and {out / 'ca.key'}"
        + ("" if passphrase else f" (unencrypted: set {CA_PASSPHRASE_ENV} to encrypt it)")
    )


@device_app.command("provision")
def provision(
    device_id: Annotated[str, typer.Option("--id", help="The device id (its certificate CN).")],
    broker: Annotated[
        str,
        typer.Option(
            help="The broker the device connects to, HOST or HOST:PORT (port 8883 by default).",
            envvar="NANOFLEET_BROKER",
        ),
    ],
    repository_url: Annotated[
        str,
        typer.Option(
            "--repository-url",
            help="Base URL of the release repository (metadata/ and targets/ below it).",
            envvar="NANOFLEET_REPOSITORY_URL",
        ),
    ],
    ca_cert: Annotated[
        Path,
        typer.Option("--ca-cert", help="The fleet CA certificate.", envvar="NANOFLEET_CA_CERT"),
    ],
    ca_key: Annotated[
        Path,
        typer.Option(
            "--ca-key",
            help=f"The fleet CA key (passphrase from {CA_PASSPHRASE_ENV} when encrypted).",
            envvar="NANOFLEET_CA_KEY",
        ),
    ],
    repo: Annotated[
        Path,
        typer.Option(
            "--repo",
            help="The release repository; its metadata/root.json is the root the device pins.",
            envvar="NANOFLEET_REPO",
        ),
    ],
    group: Annotated[
        list[str] | None,
        typer.Option(
            "--group",
            help="A group of the device (repeatable; the first one is "
            "the group whose releases it installs). Default: 'default'.",
        ),
    ] = None,
    channel: Annotated[str, typer.Option(help="The release channel it follows.")] = "stable",
    model_dir: Annotated[
        str, typer.Option("--model-dir", help="The model the device serves before any update.")
    ] = str(MODEL_DIR),
    socket_group: Annotated[
        str,
        typer.Option(
            "--socket-group",
            help="Group whose members may use the inference socket ('' for the agent's own).",
        ),
    ] = SOCKET_GROUP,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="The enrollment file to write (default: ./ID.enroll)."),
    ] = None,
    superlink: Annotated[
        str | None,
        typer.Option(
            "--superlink",
            help="HOST:PORT of the SuperLink's Fleet API: the device takes part in federated "
            "rounds (the SuperLink's certificate must come from the fleet CA).",
            envvar="NANOFLEET_SUPERLINK",
        ),
    ] = None,
    registry_url: Annotated[
        str | None,
        typer.Option(
            "--registry-url",
            help="Also register the device in this registry (sqlite:///PATH, postgresql://...).",
            envvar="NANOFLEET_REGISTRY_URL",
        ),
    ] = None,
) -> None:
    """Create a device's key and certificate, its agent config and pinned TUF root, packed
    as one enrollment file (mode 0600) for `nanofleet-agent enroll`."""
    target = out if out is not None else Path(f"{device_id}.enroll")
    try:
        host, port = _split_host_port(broker)
        passphrase = os.environ.get(CA_PASSPHRASE_ENV)
        try:
            if not passphrase and b"ENCRYPTED" in ca_key.read_bytes()[:64]:
                raise ConfigError(f"the CA key {ca_key} is encrypted: set {CA_PASSPHRASE_ENV}")
            ca = pki.load_credential(
                ca_cert, ca_key, passphrase=passphrase.encode() if passphrase else None
            )
        except OSError as e:
            raise ConfigError(f"cannot read the CA: {e}") from e
        root_file = repo / "metadata" / "root.json"
        try:
            root_json = root_file.read_bytes()
        except OSError as e:
            raise ConfigError(
                f"--repo {repo}: cannot read {root_file} ({e.strerror}); "
                "create the repository with `nanofleet release init`"
            ) from e
        request = EnrollmentRequest(
            device_id=device_id,
            broker_host=host,
            broker_port=port,
            repository_url=repository_url,
            groups=tuple(group or ("default",)),
            channel=channel,
            model_dir=PurePosixPath(model_dir),
            socket_group=socket_group or None,
            superlink=superlink,
        )
        enrollment = build_enrollment(request, ca, root_json)
        write_enrollment(enrollment, target)
        if registry_url is not None:
            from coordinator.registry import open_registry

            registry = open_registry(registry_url)
            try:
                registry.register_device(
                    device_id, groups=enrollment.groups, actor="nanofleet device provision"
                )
            finally:
                registry.engine.dispose()
    except ConfigError as e:
        raise _fail(str(e), ExitCode.CONFIG) from None
    except CoordinatorError as e:
        raise _fail(str(e), ExitCode.BAD_INPUT) from None
    except OSError as e:
        raise _fail(f"cannot write {target}: {e.strerror}", ExitCode.STATE_CORRUPT) from None
    typer.echo(
        f"device {device_id}: certificate serial {enrollment.serial:x}, sha256 "
        f"{enrollment.fingerprint_sha256}\nwrote {target} (mode 0600: it holds the device key; "
        "move it to the device, run `nanofleet-agent enroll FILE`, then delete it)"
        + ("\nregistered in the registry" if registry_url is not None else "")
    )
