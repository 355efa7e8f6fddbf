"""The Flower ClientApp of a device: the agent's only flwr importer.

It is installed with the agent and named by the run's app (``agent.federated.client_app:app``);
no code comes from the network. Each message runs in a fresh process started by the
SuperNode, so everything is loaded from the node config on each call:

- ``data-path``: the device's local text store (SQLite), read here and nowhere else; the
  hidden states computed from it (and the anchor's) are kept for the next message in
  :class:`~agent.federated.cache.FeatureCache` beside it;
- ``model-dir``: the base model directory the agent serves;
- ``serving-marker`` (optional): a file that exists while the agent is serving; training
  pauses while it does (checked every ``check-rows`` rows of a minibatch).

Both handlers first put the process in the kernel's idle scheduling class
(:func:`agent.federated.local.yield_cpu`): the process is one message's, and the agent's
inference engine must get the cores the moment a request arrives.

Handlers:

- train: runs :func:`agent.federated.local.train_round` from the adapter the server sent
  and returns the new adapter. The anchor term is on by default (:data:`DEVICE_DEFAULTS`):
  the model first writes its anchor texts (48 x 128 tokens). Mods on the train handler
  only: SecAgg+ (when the server runs the SecAgg+ workflow; it masks the update) around
  client-side fixed clipping (``_clip_update``: the update ``new - sent`` is clipped to the
  run's L2 norm before it is masked; an update of zero passes), all inside a mod that
  sends the masked arrays in the narrowest unsigned dtype the run's SecAgg+ modulus divides
  (:mod:`agent.federated.upload`: 2 bytes per value at a modulus of 2**16 instead of
  Flower's int64).
- evaluate: held-out perplexity on the device's held-out split, base and with the adapter.

What leaves the device: the adapter arrays (clipped, masked), example counts, and the
numbers listed in :class:`~agent.federated.local.RoundReport` metrics. Never text or ids.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import numpy as np
from flwr.app import Context, Message
from flwr.client import NumPyClient
from flwr.client.message_handler.message_handler import handle_legacy_message_from_msgtype
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import (
    bytes_to_ndarray,
    ndarray_to_bytes,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    RECORD_KEY_STATE,
    Key,
)
from flwr.compat.common import recorddict_compat as compat
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from agent.errors import TrainingInputError
from agent.federated.cache import FeatureCache
from agent.federated.local import (
    FeatureConfig,
    LocalModel,
    evaluate_round,
    serving_checkpoint,
    train_round,
    yield_cpu,
)
from agent.federated.trainer import Adapter, TrainConfig
from agent.federated.upload import clip_update, narrow_masked

__all__ = ["DEVICE_DEFAULTS", "app", "feature_config_from", "train_config_from"]

Array = np.ndarray[Any, Any]
Scalar = bool | bytes | float | int | str


#: Training settings a device applies unless the round's config names them: the anchor
#: term that keeps the adapter off text of other kinds (general text got 10-40 % worse
#: without it when the domain perplexity fell by 15-25 %), and a serving check every 32 rows
#: of a minibatch, and between slices of the LM head product within them
#: (:data:`agent.federated.trainer.W_SLICE_ROWS`): first-token latency during training
#: 1.03x idle; a check every 8 rows without slices gave 1.11x and took twice the time per
#: step (docs/federated.md).
DEVICE_DEFAULTS: dict[str, Scalar] = {"anchor_weight": 100.0, "anchor_rows": 64, "check_rows": 32}


def train_config_from(config: dict[str, Scalar]) -> TrainConfig:
    """The local training settings the server sent over :data:`DEVICE_DEFAULTS` (unknown
    keys are ignored).

    Raises:
        pydantic.ValidationError: a value is out of range; the message names the field.
    """
    fields = {
        "epochs": "epochs",
        "learning-rate": "learning_rate",
        "batch-rows": "batch_rows",
        "check-rows": "check_rows",
        "l2": "l2",
        "anchor-weight": "anchor_weight",
        "anchor-rows": "anchor_rows",
        "max-steps": "max_steps",
        "max-compute-s": "max_compute_s",
        "seed": "seed",
    }
    sent = {fields[k]: v for k, v in config.items() if k in fields}
    return TrainConfig.model_validate({**DEVICE_DEFAULTS, **sent})


def feature_config_from(config: dict[str, Scalar]) -> FeatureConfig:
    return FeatureConfig(
        window=int(config.get("window", FeatureConfig.window)),
        max_rows=int(config.get("max-rows", FeatureConfig.max_rows)),
    )


def _adapter(parameters: list[Array]) -> Adapter:
    if len(parameters) != 2:
        raise TrainingInputError(f"a round sends 2 arrays (A, B), got {len(parameters)}")
    return Adapter(a=np.asarray(parameters[0], np.float32), b=np.asarray(parameters[1], np.float32))


class _DeviceClient(NumPyClient):
    def __init__(self, node_config: dict[str, Scalar]) -> None:
        self._data = Path(str(node_config["data-path"]))
        self._cache = FeatureCache.beside(self._data)
        self._model_dir = Path(str(node_config["model-dir"]))
        marker = node_config.get("serving-marker")
        self._marker = Path(str(marker)) if marker else None

    def fit(
        self, parameters: list[Array], config: dict[str, Scalar]
    ) -> tuple[list[Array], int, dict[str, Scalar]]:
        yield_cpu()
        model = LocalModel(self._model_dir)
        report = train_round(
            model,
            self._data,
            _adapter(parameters),
            train_config_from(config),
            feature_config_from(config),
            checkpoint=serving_checkpoint(self._marker),
            cache=self._cache,
        )
        # One "example" per device: the server's mean is unweighted, which client-level DP
        # assumes, and the count of local positions does not leave the device.
        return [report.adapter.a, report.adapter.b], 1, dict(report.metrics)

    def evaluate(
        self, parameters: list[Array], config: dict[str, Scalar]
    ) -> tuple[float, int, dict[str, Scalar]]:
        yield_cpu()
        model = LocalModel(self._model_dir)
        nll, n, metrics = evaluate_round(
            model, self._data, _adapter(parameters), feature_config_from(config), cache=self._cache
        )
        return nll, n, dict(metrics)


def _client_fn(context: Context) -> Any:
    return _DeviceClient(dict(context.node_config)).to_client()


def _secaggplus_when_asked(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """SecAgg+ for runs whose server runs the SecAgg+ workflow; plain train otherwise."""
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, ctxt, call_next)
    return call_next(msg, ctxt)


def _narrow_secaggplus_upload(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """The reply's SecAgg+ masked arrays re-encoded by :func:`narrow_masked` with the modulus
    the setup stage gave this node (``secaggplus_mod`` keeps it in the context's state);
    every other reply unchanged."""
    reply = call_next(msg, ctxt)
    if reply.has_error() or RECORD_KEY_CONFIGS not in reply.content.config_records:
        return reply
    configs = reply.content.config_records[RECORD_KEY_CONFIGS]
    state = ctxt.state.config_records.get(RECORD_KEY_STATE)
    if Key.MASKED_PARAMETERS not in configs or state is None or "mod_range" not in state:
        return reply
    mod_range = state["mod_range"]
    if not isinstance(mod_range, int):
        raise TrainingInputError(f"the SecAgg+ state's mod_range is {mod_range!r}")
    masked = [bytes_to_ndarray(b) for b in cast(list[bytes], configs[Key.MASKED_PARAMETERS])]
    configs[Key.MASKED_PARAMETERS] = [ndarray_to_bytes(a) for a in narrow_masked(masked, mod_range)]
    return reply


def _clip_update(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Client-side fixed clipping: the update ``new - sent`` scaled onto the L2 ball of the
    clipping norm the server's DP strategy sends (Flower's ``KEY_CLIPPING_NORM``), by
    :func:`clip_update`. Flower's ``fixedclipping_mod`` does the same but divides by the
    update's norm, so a device whose update was exactly zero failed its fit."""
    fit_ins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    if KEY_CLIPPING_NORM not in fit_ins.config:
        raise TrainingInputError(f"the round's config has no {KEY_CLIPPING_NORM!r}")
    norm = float(fit_ins.config[KEY_CLIPPING_NORM])
    sent = parameters_to_ndarrays(fit_ins.parameters)
    reply = call_next(msg, ctxt)
    if reply.has_error():
        return reply
    fit_res = compat.recorddict_to_fitres(reply.content, keep_input=True)
    clipped = clip_update(parameters_to_ndarrays(fit_res.parameters), sent, norm)
    fit_res.parameters = ndarrays_to_parameters(clipped)
    reply.content = compat.fitres_to_recorddict(fit_res, keep_input=True)
    return reply


app = ClientApp()


@app.train(mods=[_narrow_secaggplus_upload, _secaggplus_when_asked, _clip_update])
def _train(msg: Message, context: Context) -> Message:
    return handle_legacy_message_from_msgtype(_client_fn, msg, context)


@app.evaluate()
def _evaluate(msg: Message, context: Context) -> Message:
    return handle_legacy_message_from_msgtype(_client_fn, msg, context)
