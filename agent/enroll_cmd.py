"""`nanofleet-agent enroll FILE`: install an enrollment file from `nanofleet device provision`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from protocol.exitcodes import ExitCode


def enroll(
    file: Annotated[
        Path, typer.Argument(help="The enrollment file (from `nanofleet device provision`).")
    ],
    dest: Annotated[
        Path,
        typer.Option(
            "--dest",
            help="Where to install the settings, certificates and TUF root.",
            envvar="NANOFLEET_ENROLL_DEST",
        ),
    ] = Path("/etc/nanofleet"),
    force: Annotated[
        bool, typer.Option("--force", help="Replace an enrollment already installed in DEST.")
    ] = False,
) -> None:
    """Check an enrollment file (identity, CA signature, TUF root, settings) and install it
    with restricted permissions: keys 0600, directories 0750. With federated settings it
    also creates the device's SuperNode key pair (flower/supernode.key and .pub)."""
    from agent.enroll import EnrollmentError
    from agent.enroll import enroll as install

    try:
        installed = install(file, dest, force=force)
    except EnrollmentError as e:
        typer.echo(f"error: {file}: {e}", err=True)
        raise typer.Exit(ExitCode.BAD_INPUT) from None
    except OSError as e:
        typer.echo(f"error: {e.filename or dest}: {e.strerror}", err=True)
        raise typer.Exit(ExitCode.STATE_CORRUPT) from None
    if installed.node_public_key is not None:
        typer.echo(
            f"SuperNode key created; register its public key with the federation "
            f"(on the coordinator): nanofleet round register-node {installed.device_id} "
            f"{installed.node_public_key}"
        )
    typer.echo(
        f"enrolled device {installed.device_id} into {installed.dest}\n"
        f"start the agent: nanofleet-agent run --config {installed.config}\n"
        f"(or `systemctl enable --now nanofleet-agent` with deploy/systemd); "
        f"then delete {file}: it holds the device key"
    )
