"""Build a ``tokenizer.json`` (Hugging Face ``tokenizers`` format) from GGUF metadata.

The GGUF stores a GPT-2 style byte-level BPE: the vocabulary (id = position), the merges
("left right", split at the first space) and a type per token. Control tokens (type 3) become
special tokens, so ``<|im_start|>`` in a chat prompt is one id and is never split, and
decoding with ``skip_special_tokens`` drops them. No BOS is added (the GGUF says so for
SmolLM2; a model that asks for one is refused, since the runtime adds none).
"""

from __future__ import annotations

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from coordinator.errors import BuildError
from coordinator.models.gguf_source import TokenizerSource

#: GGUF token types (llama.cpp's ``llama_token_type``).
TOKEN_CONTROL = 3
TOKEN_USER_DEFINED = 4


def build_tokenizer(src: TokenizerSource) -> Tokenizer:
    """Return a ``tokenizers.Tokenizer`` equivalent to the GGUF's tokenizer.

    Raises:
        BuildError: the vocabulary has duplicate tokens, or the model asks for a BOS token.
    """
    if src.add_bos:
        raise BuildError("the GGUF asks for a BOS token before every prompt; not supported")
    vocab = {tok: i for i, tok in enumerate(src.tokens)}
    if len(vocab) != len(src.tokens):
        raise BuildError("the GGUF vocabulary has duplicate tokens")
    merges: list[tuple[str, str]] = []
    for m in src.merges:
        left, right = m.split(" ", 1)
        merges.append((left, right))
    bpe = models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False)
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    special = [
        AddedToken(src.tokens[i], special=True, normalized=False)
        for i, kind in enumerate(src.token_types)
        if kind == TOKEN_CONTROL
    ]
    user = [
        AddedToken(src.tokens[i], special=False, normalized=False)
        for i, kind in enumerate(src.token_types)
        if kind == TOKEN_USER_DEFINED
    ]
    tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)
    return tok
