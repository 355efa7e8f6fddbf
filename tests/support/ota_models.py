"""Tiny models for update tests: built by the production builder, distinct by seed.

A tiny model with random weights speaks gibberish, and gibberish over a byte-level BPE is
mostly broken UTF-8, which the update health gate rightly refuses. A "well-spoken" tiny
model (the default here) has the tied embedding rows of every token that is not a whole
printable piece of text of two characters or more set to zero: such a token's logit is
then 0 while the others spread on both sides, so greedy decoding picks printable tokens
and the answers are well-formed (still meaningless). Options give the bad models the
gate must refuse:

- ``overflow``: the final norm's weights near float32's maximum, so the logits are not
  finite (refused when the model is loaded);
- ``layers``: many more layers than the old model, so it answers far more slowly.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from coordinator.models.build import build_gguf
from coordinator.models.graph import GraphOptions
from coordinator.models.tiny import (
    SPECIAL_TOKENS,
    TINY_CONFIG,
    TinyTokenizer,
    random_weights,
    train_tiny_tokenizer,
    write_gguf,
)


def _byte_decoder() -> dict[str, int]:
    """The byte-level BPE alphabet back to bytes (printable bytes stand for themselves,
    the others are shifted above 255)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars = list(printable)
    shifted = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + shifted)
            shifted += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def unprintable_tokens(tokenizer: TinyTokenizer) -> list[int]:
    """Ids of the tokens that are control tokens, not valid UTF-8 alone, or less than two
    printable characters (so no answer is one character repeated)."""
    table = _byte_decoder()
    bad = []
    for i, token in enumerate(tokenizer.tokens):
        if token in SPECIAL_TOKENS:
            bad.append(i)
            continue
        try:
            text = bytes(table[c] for c in token).decode("utf-8")
        except (KeyError, UnicodeDecodeError):
            bad.append(i)
            continue
        if len(text.strip()) < 2 or not text.isprintable():
            bad.append(i)
    return bad


def build_ota_model(
    work: Path,
    seed: int,
    *,
    layers: int | None = None,
    overflow: bool = False,
    well_spoken: bool = True,
) -> Path:
    """Build a tiny model into ``work/model`` and return the model directory."""
    tokenizer = train_tiny_tokenizer()
    config = replace(TINY_CONFIG, vocab_size=len(tokenizer.tokens))
    if layers is not None:
        config = replace(config, num_layers=layers)
    weights = random_weights(config, seed)
    if well_spoken:
        weights["token_embd.weight"][unprintable_tokens(tokenizer)] = 0.0
    if overflow:
        weights["output_norm.weight"][:] = 3e38  # finite weights, logits overflow
    work.mkdir(parents=True, exist_ok=True)
    gguf = work / "tiny.gguf"
    write_gguf(gguf, config, weights, tokenizer)
    return build_gguf(gguf, work / "model", name="tiny-llama", options=GraphOptions()).path
