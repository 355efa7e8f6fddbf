"""Pure parts of the runtime: sampling, UTF-8-safe streaming with stop sequences, ChatML."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from agent.errors import ModelError
from agent.runtime.chat import ChatTemplate
from agent.runtime.sampling import Sampler, SamplingParams
from agent.runtime.textstream import TextStream, byte_level_table

SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_greedy_takes_the_argmax() -> None:
    logits = np.array([0.1, 3.0, 2.9, -1.0], np.float32)
    assert Sampler(SamplingParams())(logits) == 1


def test_top_k_and_top_p_limit_the_candidates() -> None:
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float32))
    top2 = Sampler(SamplingParams(temperature=1.0, top_k=2, seed=0))
    assert set(Counter(top2(logits) for _ in range(400))) == {0, 1}
    nucleus = Sampler(SamplingParams(temperature=1.0, top_p=0.8, seed=0))
    assert set(Counter(nucleus(logits) for _ in range(400))) == {0, 1}
    everything = Sampler(SamplingParams(temperature=1.0, seed=0))
    counts = Counter(everything(logits) for _ in range(4000))
    assert set(counts) == {0, 1, 2, 3}
    assert abs(counts[0] / 4000 - 0.5) < 0.04


def test_sampling_params_name_the_bad_field() -> None:
    for kwargs, field in (
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"seed": -1}, "seed"),
        ({"stop": ("",)}, "stop"),
        ({"stop": tuple("abcdefghi")}, "stop"),
    ):
        with pytest.raises(ValueError, match=field):
            SamplingParams(**kwargs)  # type: ignore[arg-type]


def _token_bytes() -> list[bytes]:
    """Tokens that split characters: 'é' = c3 a9, '🙂' = f0 9f 99 82."""
    return [b"", b"caf", b"\xc3", b"\xa9", b" ok", b"\xf0\x9f", b"\x99", b"\x82", b"!", b"EN", b"D"]


def test_stream_never_splits_a_utf8_character() -> None:
    stream = TextStream(_token_bytes())
    deltas = [stream.push(t) for t in (1, 2, 3, 4, 5, 6, 7, 8)]
    assert deltas == ["caf", "", "é", " ok", "", "", "🙂", "!"]
    assert stream.flush() == ""
    assert all("\ufffd" not in d for d in deltas)


def test_stream_flushes_an_incomplete_character_as_replacement() -> None:
    stream = TextStream(_token_bytes())
    assert stream.push(5) == ""
    assert stream.flush() == "\ufffd"


def test_stop_sequence_across_tokens_is_held_back_and_cut() -> None:
    stream = TextStream(_token_bytes(), stop=("END",))
    out = [stream.push(t) for t in (1, 8, 9)]
    assert out == ["caf", "!", ""]  # "EN" might start "END": held back
    assert not stream.stopped
    assert stream.push(10) == ""
    assert stream.stopped
    assert stream.push(1) == ""
    assert stream.flush() == ""


def test_held_back_prefix_is_released_when_it_cannot_be_a_stop() -> None:
    stream = TextStream(_token_bytes(), stop=("END",))
    assert stream.push(9) == ""
    assert stream.push(8) == "EN!"
    stream2 = TextStream(_token_bytes(), stop=("END",))
    assert stream2.push(9) == ""
    assert stream2.flush() == "EN"


def test_byte_level_table_covers_every_byte_once() -> None:
    table = byte_level_table()
    assert sorted(table.values()) == list(range(256))
    assert table["Ġ"] == ord(" ")
    assert table["Ċ"] == ord("\n")


def test_smollm2_template_renders_like_its_jinja() -> None:
    chat = ChatTemplate.parse(SMOLLM2_TEMPLATE)
    assert chat.render([("user", "Hi")]) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert chat.render([("system", "S"), ("user", "Hi"), ("assistant", "Yo"), ("user", "?")]) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nYo<|im_end|>\n<|im_start|>user\n?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    with pytest.raises(ValueError, match="must not be empty"):
        chat.render([])


def test_plain_chatml_template_has_no_default_system() -> None:
    template = (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
        "message['content'] + '<|im_end|>\n'}}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    assert ChatTemplate.parse(template).render([("user", "x")]) == (
        "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n"
    )


def test_other_template_families_are_refused() -> None:
    with pytest.raises(ModelError, match="not a ChatML template"):
        ChatTemplate.parse("{{ bos_token }}[INST] {{ message }} [/INST]")
