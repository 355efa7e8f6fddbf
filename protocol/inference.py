"""Shapes of the local OpenAI-compatible inference API (``/v1/chat/completions``,
``/v1/completions``, ``/v1/models``) and of its error body.

These shapes follow OpenAI's wire format, so they carry no ``schema_version``: the API
version is the ``/v1`` in the path, and any OpenAI client must work unchanged.

Which request fields are accepted:

- **honoured**: ``model``, ``messages`` / ``prompt``, ``max_tokens`` (or its newer name
  ``max_completion_tokens``), ``temperature``, ``top_p``, ``top_k`` (an extension), ``seed``,
  ``stop``, ``stream``, ``stream_options.include_usage``, and ``n`` when it is 1;
- **accepted and ignored**: ``user`` and ``safety_identifier``, opaque end-user labels that
  by OpenAI's definition never change the generated text;
- **refused, by name**: every other OpenAI parameter (``tools``, ``logprobs``,
  ``response_format``, ``presence_penalty``, ``echo``, ... see
  :data:`UNSUPPORTED_CHAT_PARAMETERS` and :data:`UNSUPPORTED_COMPLETION_PARAMETERS`), because
  a client that asks for one would silently get something other than it asked for. Null, or
  the value that means "off" (``presence_penalty: 0``, ``logprobs: false``, ``tools: []``,
  ...), is accepted and changes nothing, since some clients always send those;
- **refused as unknown**: anything else (``extra="forbid"``).

Every limit is a named constant below; a refusal names the field and the limit.
:func:`validation_error_body` turns a ``ValidationError`` into OpenAI's error body.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Final, Literal, Self

from pydantic import (
    Field,
    Strict,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from protocol._types import StrictModel

MAX_MESSAGES: Final = 256
MAX_CONTENT_CHARS: Final = 32768  # one message or one prompt
MAX_PROMPT_CHARS: Final = 131072  # all messages of a request together
MAX_TOKENS_LIMIT: Final = 8192  # tokens to generate
MAX_TOP_K: Final = 1 << 20
MAX_STOP: Final = 4
MAX_STOP_CHARS: Final = 256
MAX_MODEL_NAME: Final = 128
MAX_ERRORS_IN_BODY: Final = 5
_MAX_SAFE_INT: Final = 2**53 - 1

#: OpenAI chat parameters this server refuses, each with the values that mean "off".
UNSUPPORTED_CHAT_PARAMETERS: Final[dict[str, tuple[object, ...]]] = {
    "audio": (),
    "frequency_penalty": (0,),
    "function_call": ("none",),
    "functions": ([],),
    "logit_bias": ({},),
    "logprobs": (False,),
    "metadata": ({},),
    "modalities": (["text"],),
    "moderation": (),
    "parallel_tool_calls": (True, False),
    "prediction": (),
    "presence_penalty": (0,),
    "prompt_cache_key": (),
    "prompt_cache_options": (),
    "prompt_cache_retention": (),
    "reasoning_effort": (),
    "response_format": ({"type": "text"},),
    "service_tier": (),
    "store": (False,),
    "tool_choice": ("none",),
    "tools": ([],),
    "top_logprobs": (0,),
    "verbosity": (),
    "web_search_options": (),
}

#: OpenAI completion parameters this server refuses, each with the values that mean "off".
UNSUPPORTED_COMPLETION_PARAMETERS: Final[dict[str, tuple[object, ...]]] = {
    "best_of": (1,),
    "echo": (False,),
    "frequency_penalty": (0,),
    "logit_bias": ({},),
    "logprobs": (),
    "presence_penalty": (0,),
    "suffix": ("",),
}

_UNSUPPORTED = Field(default=None, exclude=True, description="Not supported: omit it or send null.")


def _same_value(a: object, b: object) -> bool:
    # False == 0 in Python; a neutral value must also match in kind (bool vs number).
    return isinstance(a, bool) == isinstance(b, bool) and a == b


def _refuse_unsupported(
    table: dict[str, tuple[object, ...]], value: object, info: ValidationInfo
) -> None:
    name = info.field_name or "parameter"
    if value is None or any(_same_value(value, off) for off in table[name]):
        return None
    raise ValueError(f"{name} is not supported by this server; omit it or send null")


def _only_one_choice(value: object) -> object:
    if isinstance(value, int) and not isinstance(value, bool) and value != 1:
        raise ValueError(
            f"n={value} is not supported: this server returns exactly one choice; omit n or send 1"
        )
    return value


ModelName = Annotated[str, StringConstraints(min_length=1, max_length=MAX_MODEL_NAME)]
Content = Annotated[str, StringConstraints(max_length=MAX_CONTENT_CHARS)]
StopText = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_CHARS)]
EndUser = Annotated[str, StringConstraints(max_length=256)]
TokenCount = Annotated[int, Field(ge=0, le=_MAX_SAFE_INT)]
UnixTime = Annotated[int, Field(ge=0, le=_MAX_SAFE_INT, description="Seconds since the epoch.")]


class Role(StrEnum):
    """Who wrote a chat message."""

    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"


class FinishReason(StrEnum):
    """Why generation stopped: a stop token or sequence, or the token limit."""

    STOP = "stop"
    LENGTH = "length"


class TextPart(StrictModel):
    """A text content part (OpenAI's list form of ``content``)."""

    type: Literal["text"]
    text: Content


class ChatMessage(StrictModel):
    """One message of a conversation."""

    role: Annotated[Role, Strict(False)]
    content: Content | list[TextPart] = Field(
        description="Text, or a list of text parts that are joined without separator."
    )

    @field_validator("content")
    @classmethod
    def _parts_bounded(cls, value: str | list[TextPart]) -> str | list[TextPart]:
        if isinstance(value, list) and sum(len(p.text) for p in value) > MAX_CONTENT_CHARS:
            raise ValueError(f"content parts together exceed {MAX_CONTENT_CHARS} characters")
        return value

    @property
    def text(self) -> str:
        """The message's text, with list content joined."""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(StrictModel):
    """Options of a streamed response."""

    include_usage: bool = False
    """Send a last chunk with ``usage`` and no choices."""


class _GenerationRequest(StrictModel):
    """What chat and completion requests share: the model and the sampling controls."""

    model: ModelName | None = None
    """Which model; ``None`` means the active one. Any other name must match it."""
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float = Field(default=1.0, ge=0, le=2)
    """0 means greedy decoding."""
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=1, le=MAX_TOP_K)
    """Sample only from the k most likely tokens (not an OpenAI parameter)."""
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stop: StopText | list[StopText] | None = Field(default=None)
    """A stop sequence or up to four; the output ends before the first one found."""
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[Literal[1], Field(description="Only 1 is accepted.")] = 1
    user: EndUser | None = Field(default=None, exclude=True)
    """Accepted and ignored."""

    @field_validator("n", mode="before")
    @classmethod
    def _n(cls, value: object) -> object:
        return _only_one_choice(value)

    @field_validator("stop")
    @classmethod
    def _stop_count(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and not 1 <= len(value) <= MAX_STOP:
            raise ValueError(f"stop has {len(value)} sequences; send 1 to {MAX_STOP}")
        return value

    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_stream(
        cls, value: StreamOptions | None, info: ValidationInfo
    ) -> StreamOptions | None:
        # ``stream`` is declared first, so it is validated (or missing) by now.
        if value is not None and not info.data.get("stream", False):
            raise ValueError("stream_options is only allowed when stream is true")
        return value

    @property
    def stop_sequences(self) -> tuple[str, ...]:
        """``stop`` as a tuple (empty when not given)."""
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class ChatCompletionRequest(_GenerationRequest):
    """Body of ``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    """OpenAI's newer name for ``max_tokens``; if both are given they must be equal."""
    safety_identifier: EndUser | None = Field(default=None, exclude=True)
    """Accepted and ignored."""

    audio: None = _UNSUPPORTED
    frequency_penalty: None = _UNSUPPORTED
    function_call: None = _UNSUPPORTED
    functions: None = _UNSUPPORTED
    logit_bias: None = _UNSUPPORTED
    logprobs: None = _UNSUPPORTED
    metadata: None = _UNSUPPORTED
    modalities: None = _UNSUPPORTED
    moderation: None = _UNSUPPORTED
    parallel_tool_calls: None = _UNSUPPORTED
    prediction: None = _UNSUPPORTED
    presence_penalty: None = _UNSUPPORTED
    prompt_cache_key: None = _UNSUPPORTED
    prompt_cache_options: None = _UNSUPPORTED
    prompt_cache_retention: None = _UNSUPPORTED
    reasoning_effort: None = _UNSUPPORTED
    response_format: None = _UNSUPPORTED
    service_tier: None = _UNSUPPORTED
    store: None = _UNSUPPORTED
    tool_choice: None = _UNSUPPORTED
    tools: None = _UNSUPPORTED
    top_logprobs: None = _UNSUPPORTED
    verbosity: None = _UNSUPPORTED
    web_search_options: None = _UNSUPPORTED

    @field_validator(*UNSUPPORTED_CHAT_PARAMETERS, mode="before")
    @classmethod
    def _unsupported(cls, value: object, info: ValidationInfo) -> None:
        return _refuse_unsupported(UNSUPPORTED_CHAT_PARAMETERS, value, info)

    @field_validator("messages")
    @classmethod
    def _prompt_bounded(cls, value: list[ChatMessage]) -> list[ChatMessage]:
        total = sum(len(m.text) for m in value)
        if total > MAX_PROMPT_CHARS:
            raise ValueError(
                f"messages total {total} characters, over the limit of {MAX_PROMPT_CHARS}"
            )
        return value

    @model_validator(mode="after")
    def _one_token_limit(self) -> Self:
        if (
            self.max_tokens is not None
            and self.max_completion_tokens is not None
            and self.max_tokens != self.max_completion_tokens
        ):
            raise ValueError("max_tokens and max_completion_tokens differ; send one of them")
        return self

    @property
    def token_limit(self) -> int | None:
        """The requested output limit in tokens, from either name; ``None`` if not given."""
        return self.max_tokens if self.max_tokens is not None else self.max_completion_tokens


class CompletionRequest(_GenerationRequest):
    """Body of ``POST /v1/completions``: a raw prompt, no chat template."""

    prompt: str = Field(max_length=MAX_CONTENT_CHARS)
    """One prompt string (OpenAI's list and token-array forms are not accepted)."""

    best_of: None = _UNSUPPORTED
    echo: None = _UNSUPPORTED
    frequency_penalty: None = _UNSUPPORTED
    logit_bias: None = _UNSUPPORTED
    logprobs: None = _UNSUPPORTED
    presence_penalty: None = _UNSUPPORTED
    suffix: None = _UNSUPPORTED

    @field_validator(*UNSUPPORTED_COMPLETION_PARAMETERS, mode="before")
    @classmethod
    def _unsupported(cls, value: object, info: ValidationInfo) -> None:
        return _refuse_unsupported(UNSUPPORTED_COMPLETION_PARAMETERS, value, info)


class Usage(StrictModel):
    """Token counts of one request."""

    prompt_tokens: TokenCount
    completion_tokens: TokenCount
    total_tokens: TokenCount

    @model_validator(mode="after")
    def _total(self) -> Self:
        if self.total_tokens != self.prompt_tokens + self.completion_tokens:
            raise ValueError("total_tokens must equal prompt_tokens + completion_tokens")
        return self


class AssistantMessage(StrictModel):
    """The generated message of a chat choice."""

    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(StrictModel):
    """The single choice of a chat completion."""

    index: int = Field(ge=0, le=0)
    message: AssistantMessage
    finish_reason: Annotated[FinishReason, Strict(False)]


class ChatCompletionResponse(StrictModel):
    """Response of a non-streamed chat completion."""

    id: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    object: Literal["chat.completion"] = "chat.completion"
    created: UnixTime
    model: ModelName
    choices: list[ChatChoice] = Field(min_length=1, max_length=1)
    usage: Usage


class ChatDelta(StrictModel):
    """The new part of a streamed assistant message."""

    role: Literal["assistant"] | None = None
    """Sent in the first chunk only."""
    content: str | None = None


class ChatChunkChoice(StrictModel):
    """The single choice of a stream chunk."""

    index: int = Field(ge=0, le=0)
    delta: ChatDelta
    finish_reason: Annotated[FinishReason, Strict(False)] | None = None
    """Set in the last chunk with a choice."""


class ChatCompletionChunk(StrictModel):
    """One server-sent event of a streamed chat completion (``data: {...}``).

    The stream ends with ``data: [DONE]``. With ``stream_options.include_usage`` the event
    before it has no choices and carries ``usage``.
    """

    id: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: UnixTime
    model: ModelName
    choices: list[ChatChunkChoice] = Field(max_length=1)
    usage: Usage | None = None


class CompletionChoice(StrictModel):
    """The single choice of a text completion (or of one of its stream chunks)."""

    index: int = Field(ge=0, le=0)
    text: str
    finish_reason: Annotated[FinishReason, Strict(False)] | None
    """Always set in a response; set only in the last chunk of a stream."""


class CompletionResponse(StrictModel):
    """Response of a non-streamed text completion."""

    id: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    object: Literal["text_completion"] = "text_completion"
    created: UnixTime
    model: ModelName
    choices: list[CompletionChoice] = Field(min_length=1, max_length=1)
    usage: Usage

    @model_validator(mode="after")
    def _finished(self) -> Self:
        if self.choices[0].finish_reason is None:
            raise ValueError("a completed response needs choices[0].finish_reason")
        return self


class CompletionChunk(StrictModel):
    """One server-sent event of a streamed text completion; same ``object`` as OpenAI's."""

    id: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    object: Literal["text_completion"] = "text_completion"
    created: UnixTime
    model: ModelName
    choices: list[CompletionChoice] = Field(max_length=1)
    usage: Usage | None = None


class ModelCard(StrictModel):
    """One entry of the model list."""

    id: ModelName
    object: Literal["model"] = "model"
    created: UnixTime
    owned_by: Annotated[str, StringConstraints(min_length=1, max_length=128)]


class ModelList(StrictModel):
    """Response of ``GET /v1/models``."""

    object: Literal["list"] = "list"
    data: list[ModelCard] = Field(max_length=64)


class ErrorDetail(StrictModel):
    """OpenAI's error object."""

    message: Annotated[str, StringConstraints(min_length=1, max_length=4096)]
    type: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    """E.g. ``invalid_request_error``, ``server_error``, ``overloaded_error``."""
    param: Annotated[str, StringConstraints(max_length=256)] | None = None
    """The request field at fault, as a dotted path (``messages[0].content``)."""
    code: Annotated[str, StringConstraints(max_length=64)] | None = None


class ErrorBody(StrictModel):
    """Body of every error response: ``{"error": {...}}``."""

    error: ErrorDetail


def _dotted(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def validation_error_body(exc: ValidationError) -> ErrorBody:
    """Turn a request's ``ValidationError`` into OpenAI's error body.

    ``param`` is the first failing field; ``message`` lists up to five failures as
    ``field: reason`` (an unknown field reads "unknown parameter"); ``code`` is pydantic's
    error type of the first failure.
    """
    errors = exc.errors(include_url=False, include_input=False)
    lines = []
    for err in errors[:MAX_ERRORS_IN_BODY]:
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown parameter, not part of this API"
        where = _dotted(tuple(err["loc"]))
        lines.append(f"{where}: {msg}" if where else msg)
    if len(errors) > MAX_ERRORS_IN_BODY:
        lines.append(f"... and {len(errors) - MAX_ERRORS_IN_BODY} more")
    param = _dotted(tuple(errors[0]["loc"]))[:256] if errors else ""
    return ErrorBody(
        error=ErrorDetail(
            message="; ".join(lines)[:4096] or "invalid request",
            type="invalid_request_error",
            param=param or None,
            code=errors[0]["type"][:64] if errors else None,
        )
    )
