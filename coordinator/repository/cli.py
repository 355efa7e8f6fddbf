"""`nanofleet keys ...` and `nanofleet release ...`: signing keys and the TUF release repository.

Passphrases of offline keys come from ``NANOFLEET_KEY_PASSPHRASE_<ROLE>`` or
``NANOFLEET_KEY_PASSPHRASE``, else a prompt. Errors print one line and exit with
:attr:`~protocol.exitcodes.ExitCode.BAD_INPUT` (a refused input) or
:attr:`~protocol.exitcodes.ExitCode.CONFIG` (a missing passphrase or setting).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from coordinator.errors import ConfigError, CoordinatorError
from coordinator.repository.keys import KeyRing, env_passphrases
from coordinator.repository.repo import DEFAULT_DEVICE_BIN_BITS, Repository
from protocol.exitcodes import ExitCode

keys_app = typer.Typer(
    help="Create, list and rotate the repository's signing keys.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
release_app = typer.Typer(
    help="Manage the signed (TUF) release repository: bundles, channels, timestamps.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

KeysOpt = Annotated[
    list[Path],
    typer.Option(
        "--keys",
        help="Key directory (repeatable: e.g. the offline keys' USB stick and the online keys).",
        envvar="NANOFLEET_KEYS",
    ),
]
RepoOpt = Annotated[
    Path, typer.Option("--repo", help="Repository directory.", envvar="NANOFLEET_REPO")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]

_err = Console(stderr=True)


@contextmanager
def _errors() -> Iterator[None]:
    try:
        yield
    except ConfigError as e:
        _err.print(f"error: {e}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(ExitCode.CONFIG) from None
    except CoordinatorError as e:
        _err.print(f"error: {e}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(ExitCode.BAD_INPUT) from None


def _prompt(text: str) -> str:
    value: str = typer.prompt(text, hide_input=True)
    return value


def _keyring(dirs: list[Path]) -> KeyRing:
    if not dirs:
        raise ConfigError("--keys: give at least one key directory (or set NANOFLEET_KEYS)")
    return KeyRing(dirs, env_passphrases(prompt=_prompt))


def _emit(rows: list[dict[str, Any]], as_json: bool, title: str) -> None:
    if as_json:
        typer.echo(json.dumps(rows, indent=1))
        return
    table = Table(title=title)
    for column in rows[0] if rows else ["(none)"]:
        table.add_column(column)
    for row in rows:
        table.add_row(*("" if v is None else str(v) for v in row.values()))
    Console().print(table)


# ---- keys ---------------------------------------------------------------------------------


@keys_app.command("create")
def keys_create(
    role: Annotated[
        str, typer.Argument(help="root, targets, snapshot, timestamp, adapters, channels")
    ],
    keys: KeysOpt,
    count: Annotated[int, typer.Option(min=1, max=16, help="How many keys to create.")] = 1,
    as_json: JsonOpt = False,
) -> None:
    """Create ed25519 key(s) for ROLE in the first --keys directory."""
    with _errors():
        ring = _keyring(keys)
        created = [ring.create(role) for _ in range(count)]
    _emit(
        [{"role": k.role, "keyid": k.keyid, "file": str(k.private_path)} for k in created],
        as_json,
        "created keys",
    )


@keys_app.command("list")
def keys_list(keys: KeysOpt, as_json: JsonOpt = False) -> None:
    """List the keys found in the --keys directories."""
    with _errors():
        found = _keyring(keys).keys()
        rows = [
            {
                "role": k.role,
                "keyid": k.keyid,
                "encrypted": k.encrypted,
                "file": str(k.private_path),
            }
            for k in found
        ]
    _emit(rows, as_json, "keys")


@keys_app.command("rotate")
def keys_rotate(
    role: Annotated[str, typer.Argument(help="The role whose keys change.")],
    repo: RepoOpt,
    keys: KeysOpt,
    revoke: Annotated[
        list[str] | None,
        typer.Option("--revoke", help="Keyid to revoke (repeatable; default: all of ROLE's keys)."),
    ] = None,
    new: Annotated[
        int | None,
        typer.Option(
            "--new", min=0, max=16, help="Fresh keys to add (default: as many as revoked)."
        ),
    ] = None,
    threshold: Annotated[int | None, typer.Option(min=1, help="The role's new threshold.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Replace keys of ROLE and re-sign what depends on them (a new root for top-level roles)."""
    with _errors():
        created = Repository(repo, _keyring(keys)).rotate(
            role, revoke=revoke or None, new_keys=new, threshold=threshold
        )
    _emit([{"role": role, "keyid": k} for k in created], as_json, "new keys")


# ---- release ------------------------------------------------------------------------------


@release_app.command("init")
def release_init(
    repo: RepoOpt,
    keys: KeysOpt,
    root_threshold: Annotated[int, typer.Option(min=1, help="Signatures root needs.")] = 1,
    device_bin_bits: Annotated[
        int,
        typer.Option(
            min=1,
            max=12,
            help="Device pointers go into 2**N hash bins; a device downloads only its own "
            "(6: 64 bins, about 160 devices each at 10,000).",
        ),
    ] = DEFAULT_DEVICE_BIN_BITS,
) -> None:
    """Create a new repository signed by the keys in --keys (one or more per role)."""
    with _errors():
        created = Repository.init(
            repo, _keyring(keys), root_threshold=root_threshold, device_bin_bits=device_bin_bits
        )
    _err.print(f"repository created; devices pin {created.metadata_dir / '1.root.json'}")


class _HashBar:
    """Draws :class:`coordinator.repository.repo.Progress` as a rich bar, one file at a time."""

    def __init__(self, bar: Progress) -> None:
        self._bar = bar
        self._task: TaskID | None = None

    def start(self, description: str, total: int) -> None:
        if self._task is not None:
            self._bar.remove_task(self._task)
        self._task = self._bar.add_task(description, total=total)

    def advance(self, n: int) -> None:
        if self._task is not None:
            self._bar.advance(self._task, n)


@contextmanager
def _hash_bar() -> Iterator[_HashBar]:
    with Progress(
        TextColumn("hashing [bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=_err,
        transient=True,
    ) as bar:
        yield _HashBar(bar)


@release_app.command("add-bundle")
def release_add_bundle(
    directory: Annotated[Path, typer.Argument(help="A bundle directory with manifest.json.")],
    repo: RepoOpt,
    keys: KeysOpt,
    as_json: JsonOpt = False,
) -> None:
    """Publish a bundle (base: offline targets key; adapter: the adapters key)."""
    with _errors(), _hash_bar() as bar:
        published = Repository(repo, _keyring(keys)).add_bundle(directory, progress=bar)
    _emit(
        [
            {
                "name": published.manifest.name,
                "version": published.manifest.version,
                "kind": published.manifest.kind.value,
                "sha256": published.sha256,
                "release_counter": published.release_counter,
            }
        ],
        as_json,
        "published",
    )


@release_app.command("point")
def release_point(
    name: Annotated[str, typer.Argument(help="Bundle name.")],
    version: Annotated[str, typer.Argument(help="Bundle version.")],
    group: Annotated[str, typer.Option("--group", help="Device group.")],
    channel: Annotated[str, typer.Option("--channel", help="Release channel, e.g. stable.")],
    repo: RepoOpt,
    keys: KeysOpt,
) -> None:
    """Point a group's channel at a published bundle (an adapter brings its base along)."""
    with _errors():
        pointer = Repository(repo, _keyring(keys)).point(group, channel, name, version)
    typer.echo(pointer.model_dump_json())


@release_app.command("publish")
def release_publish(
    directory: Annotated[Path, typer.Argument(help="A bundle directory with manifest.json.")],
    group: Annotated[str, typer.Option("--group", help="Device group.")],
    channel: Annotated[str, typer.Option("--channel", help="Release channel, e.g. stable.")],
    repo: RepoOpt,
    keys: KeysOpt,
) -> None:
    """Publish a bundle and point a group's channel at it: add-bundle, then point.

    The coordinator's announcement then tells the group's devices to look (devices also
    find the release on their own periodic check).
    """
    with _errors(), _hash_bar() as bar:
        repository = Repository(repo, _keyring(keys))
        published = repository.add_bundle(directory, progress=bar)
        pointer = repository.point(
            group, channel, published.manifest.name, published.manifest.version
        )
    typer.echo(pointer.model_dump_json())


@release_app.command("timestamp")
def release_timestamp(
    repo: RepoOpt,
    keys: KeysOpt,
    force: Annotated[bool, typer.Option("--force", help="Re-sign even if not due.")] = False,
    warn_days: Annotated[
        int, typer.Option(min=1, help="Warn when offline metadata expires within this many days.")
    ] = 30,
) -> None:
    """Re-sign the online roles (timestamp, snapshot, adapters, channels) that are due."""
    with _errors():
        repository = Repository(repo, _keyring(keys))
        done = repository.refresh(force=force)
        expiring = repository.expiring_offline(timedelta(days=warn_days))
    _err.print(f"re-signed: {', '.join(done) or 'nothing due'}")
    for role in expiring:
        _err.print(f"warning: the offline {role} metadata expires soon; re-sign it offline")


@release_app.command("list")
def release_list(repo: RepoOpt, as_json: JsonOpt = False) -> None:
    """List published bundles and channel pointers."""
    with _errors():
        repository = Repository(repo)
        rows: list[dict[str, Any]] = [
            {
                "kind": b.manifest.kind.value,
                "name": b.manifest.name,
                "version": b.manifest.version,
                "sha256": b.sha256,
                "release_counter": b.release_counter,
                "channel": None,
            }
            for b in repository.bundles()
        ]
        rows += [
            {
                "kind": "channel",
                "name": p.adapter.name if p.adapter else p.base.name,
                "version": p.adapter.version if p.adapter else p.base.version,
                "sha256": p.adapter.sha256 if p.adapter else p.base.sha256,
                "release_counter": None,
                "channel": f"{p.group}/{p.channel}",
            }
            for p in repository.channels()
        ]
    _emit(rows, as_json, "releases")
