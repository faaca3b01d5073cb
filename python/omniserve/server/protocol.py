"""OpenAI wire format: request bodies (decoded and validated by msgspec) and response objects.

Only what the server acts on is declared. A top-level request field not declared here is refused
(OpenAI's "Unrecognized request argument" 400), so that a misspelt option is never silently
replaced by its default; `serve --allow-unknown-fields` drops such fields with a warning instead,
for clients that send newer fields. Value ranges are checked once, by `SamplingParams` and the
engine's intake, so the rules live in one place.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

DEFAULT_MAX_REQUEST_BYTES = 8 << 20
"""Largest request body read by default (8 MiB): a 128K-token prompt is about 0.5 MB of text, or
1 MB as JSON token ids."""

NonNegInt = Annotated[int, Meta(ge=0)]
PositiveInt = Annotated[int, Meta(ge=1)]


# -- requests ---------------------------------------------------------------------------------


class StreamOptions(Struct):
    include_usage: bool = False


class GenerationRequest(Struct, kw_only=True):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str
    max_tokens: PositiveInt | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # Extensions (vLLM's names), sent by the openai client through `extra_body`.
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: NonNegInt | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[NonNegInt] | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None


class CompletionRequest(GenerationRequest, kw_only=True):
    prompt: str | list[Any]
    """A string or token ids; one-element lists of either are accepted too."""
    logprobs: NonNegInt | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


class ContentPart(Struct):
    type: str
    text: str | None = None


class ChatMessage(Struct):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ResponseFormat(Struct):
    type: str


class ChatRequest(GenerationRequest, kw_only=True):
    messages: list[ChatMessage]
    max_completion_tokens: PositiveInt | None = None
    logprobs: bool = False
    top_logprobs: NonNegInt | None = None
    tools: list[Any] | None = None
    response_format: ResponseFormat | None = None


# -- responses --------------------------------------------------------------------------------


class ErrorInfo(Struct):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(Struct):
    error: ErrorInfo


class Usage(Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ModelCard(Struct):
    id: str
    created: int
    object: str = "model"
    owned_by: str = "omniserve"


class ModelList(Struct):
    data: list[ModelCard]
    object: str = "list"


class CompletionLogprobs(Struct):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class CompletionChoice(Struct):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None


class Completion(Struct):
    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None
    object: Literal["text_completion"] = "text_completion"
    system_fingerprint: str | None = None


class TopLogprob(Struct):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(Struct):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]


class ChatLogprobs(Struct):
    content: list[ChatTokenLogprob]


class AssistantMessage(Struct):
    content: str
    role: str = "assistant"


class ChatChoice(Struct):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class ChatCompletion(Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    object: Literal["chat.completion"] = "chat.completion"
    system_fingerprint: str | None = None


class ChatDelta(Struct, omit_defaults=True):
    """OpenAI leaves unset delta fields out (the final chunk's delta is `{}`)."""

    role: str | None = None
    content: str | None = None


class ChatChunkChoice(Struct):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class ChatCompletionChunk(Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    system_fingerprint: str | None = None


ENCODER = msgspec.json.Encoder()
