"""The model engine: one ONNX Runtime session, many concurrent generations.

This is the only module of the agent that imports ``onnxruntime``.

Invariants:

- :meth:`Engine.load` returns an engine only for a directory whose manifest verifies (with
  ``verify=True``: every file's size and SHA-256) and whose graph has the input/output
  contract of ``coordinator.models.graph``; anything else is a
  :class:`agent.errors.ModelError` naming the file or the mismatch.
- The session is shared; everything a generation writes (KV cache, attention mask, token
  and logits buffers, I/O bindings, random generator) belongs to that generation, so
  ``generate`` may run concurrently from several threads.
- The KV cache of a generation is preallocated for ``prompt + max_tokens`` positions,
  zero-filled, and bound as both the past and the present of every layer, so
  ``GroupQueryAttention`` appends in place and nothing is copied between steps.
- Prompts are prefilled in chunks of :data:`PREFILL_CHUNK` tokens, which bounds the logits
  buffer of a long prompt.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from agent.errors import ContextLengthError, ModelError
from agent.runtime.adapter import Adapter, load_adapter, make_adapter
from agent.runtime.chat import ChatTemplate
from agent.runtime.modeldir import MODEL_FILE, read_model_dir
from agent.runtime.sampling import FinishReason, Sampler, SamplingParams
from agent.runtime.textstream import TextStream, byte_level_table
from protocol.bundle import TOKENIZER_NAME, BundleManifest, ModelInfo, bundle_hash

Array = np.ndarray[Any, Any]

#: Prompt tokens per prefill run (bounds the logits buffer to chunk x vocab floats).
PREFILL_CHUNK = 128
#: Longest text :meth:`Engine.encode` accepts (characters); longer prompts cannot fit anyway.
MAX_TEXT_CHARS = 4 * 1024 * 1024


@dataclass(frozen=True)
class Forward:
    """Outputs of one full-sequence forward pass (no sampling)."""

    logits: Array  # float32 [seq, vocab]
    hidden_states: Array  # float32 [seq, hidden]: after the final norm, the LM head's input


class Generation:
    """A generation in progress: iterate it (once) for text deltas.

    ``prompt_tokens`` is known at once; ``completion_tokens`` grows as tokens are sampled;
    ``finish_reason`` is set when the iteration ends (``CANCELLED`` when the cancel event
    was set or the consumer stopped iterating early). ``token_ids`` lists the sampled ids.
    """

    def __init__(self, run: _Run, prompt_tokens: int) -> None:
        self._run: _Run | None = run
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.finish_reason: FinishReason | None = None
        self.token_ids: list[int] = []

    def __iter__(self) -> Iterator[str]:
        run, self._run = self._run, None
        if run is None:
            raise RuntimeError("a Generation can be iterated only once")
        return run.deltas(self)


#: ``logits_start`` for a prefill: only the last position's logits pick the next token.
#: (The OrtValue borrows the array's memory, so the array lives as long as the module.)
_LAST_POSITION_ARRAY = np.array([-1], dtype=np.int64)
_LAST_POSITION = ort.OrtValue.ortvalue_from_numpy(_LAST_POSITION_ARRAY)


class _Run:
    """The per-generation state and loop (owns buffers; never shared between threads)."""

    def __init__(
        self,
        engine: Engine,
        prompt: Array,
        params: SamplingParams,
        cancel: threading.Event | None,
        adapter: Adapter | None,
    ) -> None:
        self.engine = engine
        self.prompt = prompt
        self.params = params
        self.cancel = cancel
        self.adapter = adapter

    def _bind_common(self, binding: ort.IOBinding, kv: list[ort.OrtValue]) -> None:
        eng = self.engine
        for name, value in zip(eng._past_names, kv, strict=True):
            binding.bind_ortvalue_input(name, value)
        for name, value in zip(eng._present_names, kv, strict=True):
            binding.bind_ortvalue_output(name, value)
        if self.adapter is not None:
            a, b = self.adapter.padded(eng.adapter_rank)
            binding.bind_ortvalue_input("lora_a", ort.OrtValue.ortvalue_from_numpy(a))
            binding.bind_ortvalue_input("lora_b", ort.OrtValue.ortvalue_from_numpy(b))

    def deltas(self, gen: Generation) -> Iterator[str]:
        eng, params = self.engine, self.params
        n_prompt = int(self.prompt.size)
        capacity = n_prompt + params.max_tokens
        kv_arrays = [
            np.zeros((1, eng.kv_heads, capacity, eng.head_dim), dtype=np.float32)
            for _ in eng._past_names
        ]
        kv = [ort.OrtValue.ortvalue_from_numpy(a) for a in kv_arrays]
        mask = np.ones((1, capacity), dtype=np.int64)
        sampler = Sampler(params)
        stream = TextStream(eng._token_bytes, params.stop)
        finish = FinishReason.LENGTH
        try:
            # Prefill, chunk by chunk; only the last chunk's last logits matter.
            logits: Array | None = None
            for start in range(0, n_prompt, PREFILL_CHUNK):
                end = min(start + PREFILL_CHUNK, n_prompt)
                binding = eng._session.io_binding()
                chunk = np.ascontiguousarray(self.prompt[start:end].reshape(1, -1))
                binding.bind_ortvalue_input("input_ids", ort.OrtValue.ortvalue_from_numpy(chunk))
                binding.bind_ortvalue_input(
                    "attention_mask", ort.OrtValue.ortvalue_from_numpy(mask[:, :end])
                )
                if eng._logits_start:
                    binding.bind_ortvalue_input("logits_start", _LAST_POSITION)
                self._bind_common(binding, kv)
                binding.bind_output("logits")
                eng._session.run_with_iobinding(binding)
                if end == n_prompt:
                    logits = binding.get_outputs()[-1].numpy()[0, -1]
            if logits is None:
                raise RuntimeError("prefill produced no logits")

            # Decode: one binding reused; token and logits live in fixed buffers.
            token_buf = np.zeros((1, 1), dtype=np.int64)
            logits_buf = np.zeros((1, 1, eng.vocab_size), dtype=np.float32)
            binding = eng._session.io_binding()
            binding.bind_ortvalue_input("input_ids", ort.OrtValue.ortvalue_from_numpy(token_buf))
            self._bind_common(binding, kv)
            binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits_buf))
            total = n_prompt
            while True:
                if self.cancel is not None and self.cancel.is_set():
                    finish = FinishReason.CANCELLED
                    break
                token = sampler(logits)
                gen.token_ids.append(token)
                gen.completion_tokens += 1
                if token in eng._eos_ids:
                    finish = FinishReason.STOP
                    break
                delta = stream.push(token)
                if delta:
                    yield delta
                if stream.stopped:
                    finish = FinishReason.STOP
                    break
                if gen.completion_tokens >= params.max_tokens:
                    break
                token_buf[0, 0] = token
                total += 1
                binding.bind_ortvalue_input(
                    "attention_mask", ort.OrtValue.ortvalue_from_numpy(mask[:, :total])
                )
                eng._session.run_with_iobinding(binding)
                logits = logits_buf[0, 0]
            tail = stream.flush()
            if tail:
                yield tail
            gen.finish_reason = finish
        except GeneratorExit:
            gen.finish_reason = FinishReason.CANCELLED
            raise
        finally:
            if gen.finish_reason is None:
                gen.finish_reason = FinishReason.CANCELLED
            del kv, kv_arrays


def _session_options(threads: int) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # The adapter inputs are initializers listed as inputs on purpose; ORT warns about that.
    so.log_severity_level = 3
    return so


def _token_bytes(tokenizer: Tokenizer, vocab_size: int, model_dir: Path) -> list[bytes]:
    """Bytes of every token id (control tokens: empty) for a byte-level BPE tokenizer."""
    table = byte_level_table()
    special = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
    out: list[bytes] = []
    for i in range(vocab_size):
        piece = tokenizer.id_to_token(i)
        if piece is None:
            raise ModelError(f"{model_dir}: {TOKENIZER_NAME} has no token {i}")
        if piece in special:
            out.append(b"")
            continue
        try:
            out.append(bytes(table[c] for c in piece))
        except KeyError as e:
            raise ModelError(
                f"{model_dir}: {TOKENIZER_NAME} token {i} is not byte-level BPE text"
            ) from e
    return out


class Engine:
    """A loaded model: tokenizer, chat template and one ONNX Runtime session.

    Build it with :meth:`load`. Attributes: ``manifest``, ``bundle_hash``,
    ``context_length``, ``vocab_size``, ``hidden_size``, ``adapter_rank``.
    """

    def __init__(
        self,
        *,
        model_dir: Path,
        manifest: BundleManifest,
        session: ort.InferenceSession,
        tokenizer: Tokenizer,
    ) -> None:
        info = manifest.model
        if info is None:
            raise ModelError(f"{model_dir}: the manifest has no model section")
        self.model_dir = model_dir
        self.manifest = manifest
        self.bundle_hash = bundle_hash(manifest)
        self.info: ModelInfo = info
        self.context_length = info.context_length
        self.vocab_size = info.vocab_size
        self.hidden_size = info.hidden_size
        self.adapter_rank = info.max_adapter_rank
        self._session = session
        self._tokenizer = tokenizer
        self._chat = ChatTemplate.parse(info.chat_template)
        self._eos_ids = frozenset(info.eos_token_ids)
        self._past_names = [
            f"past_key_values.{i}.{kind}"
            for i in range(info.num_layers)
            for kind in ("key", "value")
        ]
        self._present_names = [
            f"present.{i}.{kind}" for i in range(info.num_layers) for kind in ("key", "value")
        ]
        self.kv_heads, self.head_dim = self._check_graph(model_dir)
        if tokenizer.get_vocab_size(with_added_tokens=True) > self.vocab_size:
            raise ModelError(f"{model_dir}: {TOKENIZER_NAME} has more tokens than the model")
        self._token_bytes = _token_bytes(tokenizer, self.vocab_size, model_dir)

    def _check_graph(self, model_dir: Path) -> tuple[int, int]:
        inputs = {i.name: i for i in self._session.get_inputs()}
        # Inputs with defaults (the adapter) are listed apart from the required ones.
        inputs.update({i.name: i for i in self._session.get_overridable_initializers()})
        outputs = {o.name: o for o in self._session.get_outputs()}
        want_in = ["input_ids", "attention_mask", *self._past_names]
        want_out = ["logits", "hidden_states", *self._present_names]
        if self.adapter_rank:
            want_in += ["lora_a", "lora_b"]
        missing = [n for n in want_in if n not in inputs] + [
            n for n in want_out if n not in outputs
        ]
        if missing:
            raise ModelError(f"{model_dir}: {MODEL_FILE} lacks graph inputs/outputs {missing[:4]}")
        # Graphs built before builder version 4 compute logits at every prefill position.
        self._logits_start = "logits_start" in inputs
        kv_shape = inputs["past_key_values.0.key"].shape
        logits_shape = outputs["logits"].shape
        hidden_shape = outputs["hidden_states"].shape
        if (
            len(kv_shape) != 4
            or not isinstance(kv_shape[1], int)
            or not isinstance(kv_shape[3], int)
            or logits_shape[-1] != self.vocab_size
            or hidden_shape[-1] != self.hidden_size
        ):
            raise ModelError(
                f"{model_dir}: {MODEL_FILE} shapes (kv {kv_shape}, logits {logits_shape}, "
                f"hidden {hidden_shape}) disagree with the manifest "
                f"(vocab {self.vocab_size}, hidden {self.hidden_size})"
            )
        if self.adapter_rank and inputs["lora_a"].shape != [self.hidden_size, self.adapter_rank]:
            raise ModelError(
                f"{model_dir}: lora_a is {inputs['lora_a'].shape}, the manifest says rank "
                f"{self.adapter_rank}"
            )
        return kv_shape[1], kv_shape[3]

    @classmethod
    def load(cls, model_dir: Path, *, threads: int | None = None, verify: bool = True) -> Engine:
        """Load the model directory ``model_dir``.

        ``threads``: ONNX Runtime intra-op threads (default: the number of CPUs).
        ``verify``: check every file's size and SHA-256 against the manifest first.

        Raises:
            ModelError: the directory, its manifest, a file, the tokenizer or the graph is
                missing, altered or does not match the manifest; the message names which.
            ValueError: ``threads`` is below 1.
        """
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        manifest = read_model_dir(model_dir, verify=verify)
        try:
            tokenizer = Tokenizer.from_file(str(model_dir / TOKENIZER_NAME))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise ModelError(f"{model_dir}: {TOKENIZER_NAME} is not a valid tokenizer: {e}") from e
        options = _session_options(threads or os.cpu_count() or 1)
        try:
            session = ort.InferenceSession(
                str(model_dir / MODEL_FILE), options, providers=["CPUExecutionProvider"]
            )
        except Exception as e:  # ORT raises its own exception types, all Exception subclasses
            raise ModelError(f"{model_dir}: {MODEL_FILE} does not load: {e}") from e
        return cls(model_dir=model_dir, manifest=manifest, session=session, tokenizer=tokenizer)

    # -- text ---------------------------------------------------------------------------

    def render_chat(self, messages: Sequence[tuple[str, str]]) -> str:
        """Render ``(role, content)`` messages as a prompt ending with the assistant header.

        Raises:
            ValueError: no messages, or a role that is not a lowercase word.
        """
        return self._chat.render(messages)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (control-token text such as ``<|im_start|>`` is one id).

        Raises:
            ValueError: ``text`` is longer than :data:`MAX_TEXT_CHARS`.
        """
        if len(text) > MAX_TEXT_CHARS:
            raise ValueError(f"text has {len(text)} characters (limit {MAX_TEXT_CHARS})")
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` without control tokens (invalid UTF-8 becomes U+FFFD)."""
        return b"".join(self._token_bytes[i] for i in ids).decode("utf-8", errors="replace")

    # -- adapters -----------------------------------------------------------------------

    def load_adapter(self, path: Path) -> Adapter:
        """Read and validate an ``adapter.npz`` for this model (see :mod:`.adapter`).

        Raises:
            ModelError: the file is invalid or does not fit this model.
        """
        return load_adapter(
            path, hidden=self.hidden_size, vocab=self.vocab_size, max_rank=self.adapter_rank
        )

    def make_adapter(self, lora_a: Array, lora_b: Array) -> Adapter:
        """Validate in-memory adapter matrices for this model.

        Raises:
            ModelError: a wrong dtype, shape or rank, or a non-finite value.
        """
        return make_adapter(
            lora_a,
            lora_b,
            hidden=self.hidden_size,
            vocab=self.vocab_size,
            max_rank=self.adapter_rank,
        )

    # -- inference ----------------------------------------------------------------------

    def _prompt_array(self, ids: Sequence[int], extra: int) -> Array:
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        if arr.size == 0:
            raise ValueError("the prompt has no tokens")
        if arr.min() < 0 or arr.max() >= self.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.vocab_size})")
        if arr.size + extra > self.context_length:
            raise ContextLengthError(
                f"the prompt has {arr.size} tokens and max_tokens is {extra}: "
                f"{arr.size + extra} exceeds the context length of {self.context_length}"
            )
        return arr

    def generate(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        *,
        cancel: threading.Event | None = None,
        adapter: Adapter | None = None,
    ) -> Generation:
        """Start a generation after ``prompt_ids``; iterate the result for text deltas.

        The work happens while iterating, in the iterating thread. ``cancel`` is checked
        before every token; once set, the generation ends within one token with
        ``finish_reason`` ``CANCELLED``. ``adapter`` applies to this generation only.

        Raises:
            ContextLengthError: prompt tokens + ``max_tokens`` exceed the context length.
            ValueError: an empty prompt or a token id outside the vocabulary.
            ModelError: ``adapter`` has a rank this model cannot take.
        """
        prompt = self._prompt_array(prompt_ids, params.max_tokens)
        if adapter is not None and adapter.rank > self.adapter_rank:
            raise ModelError(f"adapter rank {adapter.rank} exceeds {self.adapter_rank}")
        return Generation(_Run(self, prompt, params, cancel, adapter), int(prompt.size))

    def forward(self, ids: Sequence[int], *, adapter: Adapter | None = None) -> Forward:
        """Logits and final hidden states at every position of ``ids`` (one fresh pass).

        The hidden states are what the LM head (and an adapter) reads: the input a
        trainer of an LM-head adapter learns from.

        Raises:
            ContextLengthError: ``ids`` is longer than the context length.
            ValueError: an empty sequence or a token id outside the vocabulary.
        """
        prompt = self._prompt_array(ids, 0)
        n = int(prompt.size)
        kv = [
            ort.OrtValue.ortvalue_from_numpy(
                np.zeros((1, self.kv_heads, n, self.head_dim), dtype=np.float32)
            )
            for _ in self._past_names
        ]
        mask = np.ones((1, n), dtype=np.int64)
        run = _Run(self, prompt, SamplingParams(), None, adapter)
        logits, hidden = [], []
        for start in range(0, n, PREFILL_CHUNK):
            end = min(start + PREFILL_CHUNK, n)
            binding = self._session.io_binding()
            chunk = np.ascontiguousarray(prompt[start:end].reshape(1, -1))
            binding.bind_ortvalue_input("input_ids", ort.OrtValue.ortvalue_from_numpy(chunk))
            binding.bind_ortvalue_input(
                "attention_mask", ort.OrtValue.ortvalue_from_numpy(mask[:, :end])
            )
            run._bind_common(binding, kv)
            binding.bind_output("logits")
            binding.bind_output("hidden_states")
            self._session.run_with_iobinding(binding)
            out = binding.get_outputs()
            logits.append(out[-2].numpy()[0])
            hidden.append(out[-1].numpy()[0])
        return Forward(logits=np.concatenate(logits), hidden_states=np.concatenate(hidden))

    def forward_hidden(self, ids: Sequence[int]) -> Array:
        """Final hidden states ``[len(ids), hidden]`` (see :meth:`forward`)."""
        return self.forward(ids).hidden_states
