"""The inference shapes against a real OpenAI client: what it sends validates, what we send
back parses, and refusals become OpenAI error bodies that name the parameter."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from pydantic import ValidationError

from protocol.inference import (
    UNSUPPORTED_CHAT_PARAMETERS,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorBody,
    ModelList,
    validation_error_body,
)

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
USER = [{"role": "user", "content": "hi"}]


def golden(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((GOLDEN / f"{name}.json").read_text("utf-8"))
    return data


def client_for(handler: Callable[[httpx.Request], httpx.Response]) -> openai.OpenAI:
    transport = httpx.MockTransport(handler)
    return openai.OpenAI(
        api_key="unused",
        base_url="http://nanofleet.local/v1",
        http_client=httpx.Client(transport=transport),
        max_retries=0,
    )


def test_openai_client_chat_round_trip() -> None:
    seen: list[ChatCompletionRequest] = []

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/chat/completions"
        seen.append(ChatCompletionRequest.model_validate_json(request.content))
        return httpx.Response(200, json=golden("ChatCompletionResponse"))

    with client_for(handler) as client:
        reply = client.chat.completions.create(
            model="smollm2-135m-instruct",
            messages=[{"role": "user", "content": "Which pallet goes to dock 4?"}],
            max_completion_tokens=32,
            temperature=0,
            seed=3,
            stop=["\n"],
            user="operator-7",
        )
    assert reply.choices[0].message.content == "Pallet 17 goes to dock 4."
    assert reply.usage is not None
    assert reply.usage.total_tokens == 50
    (request,) = seen
    assert request.token_limit == 32
    assert request.stop_sequences == ("\n",)
    assert request.temperature == 0.0


def test_openai_client_reads_our_stream() -> None:
    chunk = golden("ChatCompletionChunk")
    first = {
        **chunk,
        "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Pallet"}}],
    }
    last = {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    usage = {**chunk, "choices": [], "usage": golden("ChatCompletionResponse")["usage"]}
    events = [ChatCompletionChunk.model_validate(e) for e in (first, chunk, last, usage)]
    body = "".join(f"data: {e.model_dump_json()}\n\n" for e in events) + "data: [DONE]\n\n"

    def handler(request: httpx.Request) -> httpx.Response:
        parsed = ChatCompletionRequest.model_validate_json(request.content)
        assert parsed.stream
        assert parsed.stream_options is not None
        return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})

    with client_for(handler) as client:
        stream = client.chat.completions.create(
            model="m", messages=USER, stream=True, stream_options={"include_usage": True}
        )
        got = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in got if c.choices) == "Pallet dock"
    assert got[-1].usage is not None
    assert got[-1].usage.completion_tokens == 9


def test_openai_client_completion_and_models() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json=golden("ModelList"))
        CompletionRequest.model_validate_json(request.content)
        return httpx.Response(200, json=golden("CompletionResponse"))

    with client_for(handler) as client:
        assert [m.id for m in client.models.list()] == ["smollm2-135m-instruct"]
        done = client.completions.create(model="m", prompt="Label:", max_tokens=8)
    assert done.choices[0].text == " DOCK 4 / BAY 2"


def test_openai_client_reads_our_error_body() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        try:
            ChatCompletionRequest.model_validate_json(request.content)
        except ValidationError as e:
            return httpx.Response(400, json=validation_error_body(e).model_dump(mode="json"))
        raise AssertionError("the request should have been refused")

    with client_for(handler) as client, pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="m", messages=USER, n=3)
    assert caught.value.param == "n"
    assert "n=3 is not supported" in caught.value.message


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("presence_penalty", 0),
        ("frequency_penalty", 0.0),
        ("logprobs", False),
        ("tools", []),
        ("tool_choice", "none"),
        ("response_format", {"type": "text"}),
        ("store", False),
        ("logit_bias", {}),
        ("reasoning_effort", None),
    ],
)
def test_neutral_values_of_unsupported_parameters_are_accepted(name: str, value: object) -> None:
    request = ChatCompletionRequest.model_validate({"messages": USER, name: value})
    assert name not in request.model_dump()


@pytest.mark.parametrize("name", sorted(UNSUPPORTED_CHAT_PARAMETERS))
def test_every_unsupported_chat_parameter_is_refused_by_name(name: str) -> None:
    with pytest.raises(ValidationError) as caught:
        ChatCompletionRequest.model_validate({"messages": USER, name: {"on": 1}})
    body = validation_error_body(caught.value)
    assert body.error.param == name
    assert f"{name} is not supported" in body.error.message


def test_zero_is_not_a_neutral_false() -> None:
    # False == 0 in Python: `logprobs: 0` must not pass as the neutral `false`.
    with pytest.raises(ValidationError, match="logprobs is not supported"):
        ChatCompletionRequest.model_validate({"messages": USER, "logprobs": 0})


def test_text_parts_are_joined() -> None:
    parts = [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "dock 4"}]
    request = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": parts}]}
    )
    assert request.messages[0].text == "Hello, dock 4"


def test_defaults_and_ignored_user() -> None:
    request = ChatCompletionRequest.model_validate({"messages": USER, "user": "u-1"})
    assert (request.temperature, request.top_p, request.n, request.stream) == (1.0, 1.0, 1, False)
    assert request.token_limit is None
    assert request.stop_sequences == ()
    assert "user" not in request.model_dump()


def test_error_body_names_nested_field_and_unknown_parameters() -> None:
    bad = {"messages": [{"role": "user", "content": "x"}, {"role": "robot", "content": "y"}]}
    with pytest.raises(ValidationError) as caught:
        ChatCompletionRequest.model_validate({**bad, "temprature": 0.5})
    body = validation_error_body(caught.value)
    assert body.error.type == "invalid_request_error"
    assert body.error.param == "messages[1].role"
    assert "temprature: unknown parameter" in body.error.message
    ErrorBody.model_validate_json(body.model_dump_json())


def test_error_body_lists_at_most_five_failures() -> None:
    data = {"messages": USER, **{f"x{i}": 1 for i in range(8)}}
    with pytest.raises(ValidationError) as caught:
        ChatCompletionRequest.model_validate(data)
    assert validation_error_body(caught.value).error.message.endswith("... and 3 more")


def test_responses_must_be_complete() -> None:
    data = golden("CompletionResponse")
    data["choices"][0]["finish_reason"] = None
    with pytest.raises(ValidationError, match="finish_reason"):
        CompletionResponse.model_validate(data)
    ChatCompletionResponse.model_validate(golden("ChatCompletionResponse"))
    ModelList.model_validate(golden("ModelList"))
