"""`nanofleet-agent data ...`: the device's local training texts (:mod:`agent.federated.datastore`).

The store is the one the ClientApp trains on (``[federated] data_path``, or ``--store``);
``import`` applies the retention limits of ``[federated.store]`` (the defaults with
``--store``).
Nothing here sends anything anywhere; the commands print counts, never text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from agent.federated.store_limits import StoreLimits
from protocol.exitcodes import ExitCode

__all__ = ["data_app"]

data_app = typer.Typer(
    help="The local training texts federated rounds learn from (they never leave the device).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", help="The agent's settings; the store is its federated.data_path."),
]
_StoreOption = Annotated[
    Path | None, typer.Option("--store", help="The store file (instead of --config).")
]


def _store_path(config: Path | None, store: Path | None) -> Path:
    return _store(config, store)[0]


def _store(config: Path | None, store: Path | None) -> tuple[Path, StoreLimits]:
    """The store's path and the limits its writers apply (the defaults with ``--store``)."""
    from agent.config import load_settings
    from agent.errors import ConfigError

    if (config is None) == (store is None):
        typer.echo("error: give exactly one of --config and --store", err=True)
        raise typer.Exit(ExitCode.USAGE)
    if store is not None:
        return store, StoreLimits()
    assert config is not None
    try:
        settings = load_settings(config)
    except ConfigError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(ExitCode.CONFIG) from None
    if settings.federated is None:
        typer.echo(f"error: {config} has no [federated] section (give --store)", err=True)
        raise typer.Exit(ExitCode.CONFIG)
    return settings.federated.data_path, settings.federated.store


@data_app.command("import")
def import_files(
    files: Annotated[
        list[Path], typer.Argument(help="UTF-8 text files; each paragraph becomes one text.")
    ],
    config: _ConfigOption = None,
    store: _StoreOption = None,
) -> None:
    """Load text files into the local store (created mode 0600 if missing); print what was
    stored, what was there already and what retention removed."""
    from agent.errors import LocalDataError
    from agent.federated.datastore import LocalTextStore

    path, limits = _store(config, store)
    try:
        db = LocalTextStore.open(path, limits)
    except LocalDataError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(ExitCode.STATE_CORRUPT) from None
    try:
        for file in files:
            try:
                report = db.import_text_file(file)
            except LocalDataError as e:
                typer.echo(f"error: {e}", err=True)
                raise typer.Exit(ExitCode.BAD_INPUT) from None
            typer.echo(
                f"{file}: {report.stored} texts stored, {report.duplicates} already there, "
                f"{report.evicted} removed by retention"
            )
        stats = db.stats()
    finally:
        db.close()
    typer.echo(_stats_line(path, stats.rows, stats.train, stats.heldout, stats.bytes))


@data_app.command("stats")
def stats(config: _ConfigOption = None, store: _StoreOption = None) -> None:
    """Print how many texts the store holds, per split."""
    from agent.errors import LocalDataError
    from agent.federated.datastore import LocalTextStore

    path = _store_path(config, store)
    if not path.exists():
        typer.echo(_stats_line(path, 0, 0, 0, 0))
        return
    try:
        db = LocalTextStore.open(path)
    except LocalDataError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(ExitCode.STATE_CORRUPT) from None
    try:
        s = db.stats()
    finally:
        db.close()
    typer.echo(_stats_line(path, s.rows, s.train, s.heldout, s.bytes))


def _stats_line(path: Path, rows: int, train: int, heldout: int, size: int) -> str:
    return f"store {path}: {rows} texts ({train} train, {heldout} held out), {size:,} bytes"


@data_app.command("evaluate")
def evaluate_adapter(
    adapter: Annotated[
        Path, typer.Option("--adapter", help="An adapter.npz (from an adapter bundle).")
    ],
    config: Annotated[
        Path,
        typer.Option("--config", help="The agent's settings: its model and federated.data_path."),
    ],
    window: Annotated[int, typer.Option("--window", min=8, max=4096)] = 64,
    max_rows: Annotated[int, typer.Option("--max-rows", min=16, max=1_000_000)] = 4000,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Held-out perplexity of the local store's held-out texts, with the base model alone and
    with ADAPTER: what a round's evaluate step reports, computed on this device."""
    import json

    import numpy as np

    from agent.config import load_settings
    from agent.errors import LocalDataError, ModelError, TrainingInputError
    from agent.federated.local import FeatureConfig, LocalModel, evaluate_round
    from agent.federated.trainer import Adapter

    path = _store_path(config, None)
    settings = load_settings(config)  # valid: _store_path has read it
    try:
        model = LocalModel(settings.model.dir)
        loaded = model.engine.load_adapter(adapter)
        _, positions, metrics = evaluate_round(
            model,
            path,
            Adapter(a=np.asarray(loaded.lora_a), b=np.asarray(loaded.lora_b)),
            FeatureConfig(window=window, max_rows=max_rows),
        )
    except ModelError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(ExitCode.MODEL_INVALID) from None
    except (LocalDataError, TrainingInputError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(ExitCode.BAD_INPUT) from None
    base, tuned = metrics["base_perplexity"], metrics["perplexity"]
    if as_json:
        typer.echo(
            json.dumps({"base_perplexity": base, "perplexity": tuned, "positions": positions})
        )
        return
    typer.echo(
        f"held-out perplexity over {positions} positions: base {base:.3f}, "
        f"with the adapter {tuned:.3f} ({(tuned / base - 1) * 100:+.1f} %)"
    )
