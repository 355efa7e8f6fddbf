"""Flower's minimal NumPy app, the yardstick of ``benchmarks/federated.py``'s overhead figure.

A ClientApp whose NumPyClient returns the arrays it got (no training) and a ServerApp
running the legacy FedAvg for ``num-rounds`` rounds with evaluation after each, so it
exchanges the same messages per round as the personalization app, with arrays of the
same shapes (``hidden``/``vocab``/``rank`` from the run config).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Context
from flwr.client import NumPyClient
from flwr.clientapp import ClientApp
from flwr.common import ndarrays_to_parameters
from flwr.server import Grid, LegacyContext, ServerApp, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow

Array = np.ndarray[Any, Any]


class _Echo(NumPyClient):
    def fit(self, parameters: list[Array], config: dict[str, Any]) -> Any:
        return parameters, 1, {}

    def evaluate(self, parameters: list[Array], config: dict[str, Any]) -> Any:
        return 0.0, 1, {}


client = ClientApp(client_fn=lambda context: _Echo().to_client())
server = ServerApp()


@server.main()
def _main(grid: Grid, context: Context) -> None:
    config = dict(context.run_config)
    hidden, vocab, rank = (
        int(config.get(k, d)) for k, d in (("hidden", 128), ("vocab", 384), ("rank", 4))
    )
    cohort = int(config.get("cohort-size", 3))
    strategy = FedAvg(
        min_fit_clients=cohort,
        min_evaluate_clients=cohort,
        min_available_clients=cohort,
        initial_parameters=ndarrays_to_parameters(
            [np.zeros((hidden, rank), np.float32), np.zeros((rank, vocab), np.float32)]
        ),
    )
    legacy = LegacyContext(
        context, config=ServerConfig(num_rounds=int(config["num-rounds"])), strategy=strategy
    )
    DefaultWorkflow()(grid, legacy)
