"""The device's model runtime: ONNX Runtime session, tokenizer, sampling, adapters.

Imports only onnxruntime, numpy and tokenizers (plus the standard library, pydantic and
:mod:`protocol`). :mod:`agent.runtime.engine` is the only onnxruntime importer of the agent.
"""

from agent.runtime.adapter import ADAPTER_FILE, Adapter, load_adapter, make_adapter, save_adapter
from agent.runtime.engine import Engine, Forward, Generation
from agent.runtime.sampling import FinishReason, SamplingParams

__all__ = [
    "ADAPTER_FILE",
    "Adapter",
    "Engine",
    "FinishReason",
    "Forward",
    "Generation",
    "SamplingParams",
    "load_adapter",
    "make_adapter",
    "save_adapter",
]
