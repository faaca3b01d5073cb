"""OpenAI-compatible HTTP API over `AsyncEngine`.

Stack: **Starlette used directly, served by uvicorn.**
- Starlette is the ASGI toolkit FastAPI is built on, without FastAPI's pydantic layer. We decode and
  validate bodies with msgspec (already a core dependency, fast, and strict about types), so
  FastAPI would add a second validation system, an OpenAPI generator we do not need, and
  per-request overhead on the hot path, for nothing in return.
- Starlette gives routing, a streaming response that watches for `http.disconnect` while it streams
  (that is how a vanished client aborts its request), and lifespan events (start the engine thread,
  drain and stop it), which is all this server needs. aiohttp would work too, but it is its own
  server rather than an ASGI app, so it could not be mounted into users' ASGI services.
- uvicorn is the reference ASGI server: binding to a pre-made socket (tests use an ephemeral
  port), uvloop/httptools when installed; `server/serving.py` orders its shutdown after the
  engine's drain, so that aborted requests are still answered.

Streaming uses OpenAI's server-sent-events framing exactly: `data: {json}\\n\\n` per chunk and
`data: [DONE]\\n\\n` at the end. Errors use OpenAI's shape, `{"error": {"message", "type", "param",
"code"}}`, with 400 for bad input (including prompts that cannot fit: code
`context_length_exceeded`, as OpenAI does), 401 for a bad API key, 404 for an unknown model or
route, 503 when more requests are queued than the configured limit.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import re
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import msgspec
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from omniserve.engine.async_engine import AsyncEngine
from omniserve.errors import (
    EngineOverloadedError,
    InvalidRequestError,
    OmniserveError,
    RequestRejectedError,
)
from omniserve.outputs import RequestOutput, TokenLogprob
from omniserve.sampling_params import SamplingParams
from omniserve.server import protocol as p
from omniserve.server.metrics import RequestTimer, ServerMetrics

logger = logging.getLogger(__name__)

T = TypeVar("T")
Handler = Callable[[Request], Awaitable[Response]]

_SHUTTING_DOWN = "the request was aborted: the server is shutting down"
_CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
# The top-level field a msgspec validation error is about: "... - at `$.field...`", or a
# missing top-level field (reported without a path).
_PARAM_RE = re.compile(r"at `\$\.(\w+)|^Object missing required field `(\w+)`$")
# Request fields handed to SamplingParams unchanged when the client set them.
_PASSTHROUGH = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "min_tokens",
    "ignore_eos",
    "stop_token_ids",
    "skip_special_tokens",
    "include_stop_str_in_output",
    "seed",
)


_ERROR_HEADERS = {
    401: {"WWW-Authenticate": "Bearer"},
    503: {"Retry-After": "1"},  # the openai client waits this long before its retry
}


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def response(self) -> Response:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        body = p.ErrorResponse(p.ErrorInfo(self.message, kind, self.param, self.code))
        headers = _ERROR_HEADERS.get(self.status)
        return Response(p.ENCODER.encode(body), self.status, headers, "application/json")


def _engine_error(exc: Exception) -> APIError:
    """Map what `AsyncEngine.generate` raises to an HTTP error."""
    if isinstance(exc, EngineOverloadedError):
        return APIError(503, str(exc))
    if isinstance(exc, RequestRejectedError):
        return APIError(400, str(exc), param="prompt", code="context_length_exceeded")
    if isinstance(exc, InvalidRequestError):
        return APIError(400, str(exc))
    return APIError(500, str(exc))  # EngineDeadError: its message says what failed


class _ClientGone(Exception):
    """The client closed the connection before the response was ready."""


class _EventStream(StreamingResponse):
    """Server-sent events. Closes its body iterator whatever happens, so that a client that
    disconnects aborts its request at once rather than whenever the garbage collector gets to
    the suspended generator."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncGenerator[bytes, None]) -> None:
        super().__init__(events, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._events.aclose()


def _sse(payload: msgspec.Struct) -> bytes:
    return b"data: " + p.ENCODER.encode(payload) + b"\n\n"


_DONE = b"data: [DONE]\n\n"


class _Renderer(ABC):
    """Turns engine outputs into one endpoint's response objects."""

    def __init__(self, prefix: str, model: str, token_text: Callable[[int], str]) -> None:
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.token_text = token_text

    @abstractmethod
    def response(self, out: RequestOutput) -> msgspec.Struct:
        """The whole answer, from a finished request's final output."""

    @abstractmethod
    def chunks(self, out: RequestOutput) -> list[msgspec.Struct]:
        """Stream chunks for one delta output."""

    @abstractmethod
    def usage_chunk(self, usage: p.Usage) -> msgspec.Struct:
        """The extra last chunk of `stream_options.include_usage`."""


class _CompletionRenderer(_Renderer):
    def __init__(self, model: str, token_text: Callable[[int], str]) -> None:
        super().__init__("cmpl", model, token_text)
        self._offset = 0  # text offset of the next token, for logprobs.text_offset

    def _logprobs(self, logprobs: list[TokenLogprob] | None) -> p.CompletionLogprobs | None:
        if logprobs is None:
            return None
        tokens, offsets, tops = [], [], []
        for lp in logprobs:
            text = self.token_text(lp.token_id)
            tokens.append(text)
            offsets.append(self._offset)
            self._offset += len(text)
            # Distinct ids may decode alike (partial UTF-8 bytes); the likeliest keeps the key.
            top: dict[str, float] = {}
            for i, v in lp.top:
                top.setdefault(self.token_text(i), v)
            # OpenAI always includes the sampled token: up to logprobs + 1 entries.
            top.setdefault(text, lp.logprob)
            tops.append(top)
        return p.CompletionLogprobs(tokens, [lp.logprob for lp in logprobs], tops, offsets)

    def _completion(self, choices: list[p.CompletionChoice], usage: p.Usage | None) -> p.Completion:
        return p.Completion(self.id, self.created, self.model, choices, usage)

    def response(self, out: RequestOutput) -> p.Completion:
        choice = p.CompletionChoice(0, out.text, self._logprobs(out.logprobs), out.finish_reason)
        return self._completion([choice], _usage(out))

    def chunks(self, out: RequestOutput) -> list[msgspec.Struct]:
        chunks: list[msgspec.Struct] = []
        # A chunk per output with new tokens, even when their text is held back (partial UTF-8,
        # a possible stop string) or absent (no tokenizer): clients see progress every step.
        if out.token_ids or out.text:
            choice = p.CompletionChoice(0, out.text, self._logprobs(out.logprobs), None)
            chunks.append(self._completion([choice], None))
        if out.finished:
            chunks.append(
                self._completion([p.CompletionChoice(0, "", None, out.finish_reason)], None)
            )
        return chunks

    def usage_chunk(self, usage: p.Usage) -> p.Completion:
        return self._completion([], usage)


class _ChatRenderer(_Renderer):
    def __init__(self, model: str, token_text: Callable[[int], str]) -> None:
        super().__init__("chatcmpl", model, token_text)
        self._sent_role = False

    def _logprobs(self, logprobs: list[TokenLogprob] | None) -> p.ChatLogprobs | None:
        if logprobs is None:
            return None
        content = []
        for lp in logprobs:
            text = self.token_text(lp.token_id)
            top = [
                p.TopLogprob(t, v, list(t.encode()))
                for t, v in ((self.token_text(i), v) for i, v in lp.top)
            ]
            content.append(p.ChatTokenLogprob(text, lp.logprob, list(text.encode()), top))
        return p.ChatLogprobs(content)

    def _chunk(
        self, delta: p.ChatDelta, logprobs: p.ChatLogprobs | None, finish: str | None
    ) -> p.ChatCompletionChunk:
        choice = p.ChatChunkChoice(0, delta, logprobs, finish)
        return p.ChatCompletionChunk(self.id, self.created, self.model, [choice])

    def response(self, out: RequestOutput) -> p.ChatCompletion:
        choice = p.ChatChoice(
            0, p.AssistantMessage(out.text), self._logprobs(out.logprobs), out.finish_reason
        )
        return p.ChatCompletion(self.id, self.created, self.model, [choice], _usage(out))

    def chunks(self, out: RequestOutput) -> list[msgspec.Struct]:
        chunks: list[msgspec.Struct] = []
        if not self._sent_role:  # OpenAI opens every stream with the role
            chunks.append(self._chunk(p.ChatDelta(role="assistant", content=""), None, None))
            self._sent_role = True
        if out.token_ids or out.text:  # as for completions
            chunks.append(
                self._chunk(p.ChatDelta(content=out.text), self._logprobs(out.logprobs), None)
            )
        if out.finished:
            chunks.append(self._chunk(p.ChatDelta(), None, out.finish_reason))
        return chunks

    def usage_chunk(self, usage: p.Usage) -> p.ChatCompletionChunk:
        return p.ChatCompletionChunk(self.id, self.created, self.model, [], usage)


def _usage(out: RequestOutput) -> p.Usage:
    return p.Usage(
        out.num_prompt_tokens,
        out.num_generated_tokens,
        out.num_prompt_tokens + out.num_generated_tokens,
    )


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, or 413 once it passes `limit` bytes (by its Content-Length, before reading it,
    or while reading a chunked one): nothing larger is held or parsed."""
    declared = request.headers.get("content-length")
    too_large = APIError(
        413, f"the request body is larger than {limit:,} bytes (--max-request-bytes)"
    )
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


async def _decode(request: Request, kind: type[T], allow_unknown_fields: bool, max_bytes: int) -> T:
    """The body as `kind`. A top-level field `kind` does not declare (a misspelt `max_token`
    would otherwise be dropped and its default used) is a 400 naming it, as OpenAI answers, or,
    with `allow_unknown_fields`, dropped with a warning."""
    body = await _read_body(request, max_bytes)
    try:
        data = msgspec.json.decode(body)
        if isinstance(data, dict):
            unknown = sorted(data.keys() - set(kind.__struct_fields__))  # type: ignore[attr-defined]
            if unknown and not allow_unknown_fields:
                raise APIError(
                    400,
                    f"Unrecognized request argument supplied: {', '.join(unknown)}",
                    param=unknown[0],
                )
            if unknown:
                logger.warning("dropping unknown request fields %s", ", ".join(unknown))
                data = {k: v for k, v in data.items() if k not in unknown}
        return msgspec.convert(data, kind)
    except msgspec.ValidationError as exc:
        match = _PARAM_RE.search(str(exc))
        param = match and (match.group(1) or match.group(2))
        raise APIError(400, f"invalid request: {exc}", param=param) from None
    except msgspec.DecodeError as exc:
        raise APIError(400, f"the body is not valid JSON: {exc}") from None


def _sampling_params(
    req: p.GenerationRequest, *, max_tokens: int | None, logprobs: int | None
) -> SamplingParams:
    if req.n != 1:
        raise APIError(
            400,
            f"n={req.n} is not supported: this server returns one choice per request; "
            "send n requests (with different seeds) instead",
            param="n",
        )
    if req.logit_bias:
        raise APIError(400, "logit_bias is not supported", param="logit_bias")
    fields: dict[str, Any] = {
        name: value for name in _PASSTHROUGH if (value := getattr(req, name)) is not None
    }
    if max_tokens is not None:
        fields["max_tokens"] = max_tokens
    if req.stop is not None:
        fields["stop"] = req.stop
    fields["logprobs"] = logprobs
    try:
        return SamplingParams(**fields)
    except InvalidRequestError as exc:
        raise APIError(400, str(exc)) from None


def _completion_prompt(prompt: str | list[Any]) -> str | list[int]:
    """A string or token ids; OpenAI's batch forms are accepted when they hold one prompt."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt
    raise APIError(
        400,
        "prompt must be a string or a list of token ids; batches of prompts are not supported, "
        "send one request per prompt",
        param="prompt",
    )


def _failed(out: RequestOutput) -> str:
    return f"generation failed: {out.error}"


def _max_token_chars(tokenizer: Any) -> int:
    """The most characters one token's text can have: a vocabulary entry's length bounds it
    (byte-level entries spell one character per byte, and a character takes at least one), so a
    text of n characters needs at least n / this many tokens."""
    return max(1, max((len(t) for t in tokenizer.get_vocab()), default=1))


def _message_text(message: p.ChatMessage) -> str:
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    texts = []
    for part in message.content:
        if part.type != "text" or part.text is None:
            raise APIError(
                400, f"content parts of type {part.type!r} are not supported", param="messages"
            )
        texts.append(part.text)
    return "".join(texts)


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, awaitable: Awaitable[T]) -> T:
    """Await `awaitable` but give up (cancelling it) if the client disconnects first. The body
    has been read, so the next ASGI message can only be `http.disconnect`."""
    work = asyncio.ensure_future(awaitable)
    watch = asyncio.ensure_future(_wait_disconnect(request.receive))
    try:
        await asyncio.wait((work, watch), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()  # client gone, or this handler itself was cancelled
    if not work.done():  # its cancellation is under way: the client is gone
        raise _ClientGone
    return work.result()


class OpenAIServer:
    """The endpoints, bound to one engine and one served model name."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        model_name: str,
        api_key: str | None,
        allow_unknown_fields: bool = False,
        chat_template: str | None = None,
        max_request_bytes: int = p.DEFAULT_MAX_REQUEST_BYTES,
    ) -> None:
        self.engine = engine
        self.model_name = model_name
        self.api_key = api_key
        self.allow_unknown_fields = allow_unknown_fields
        self.chat_template = chat_template
        self.max_request_bytes = max_request_bytes
        self._max_prompt_chars = (
            None
            if engine.tokenizer is None
            else engine.max_model_len * _max_token_chars(engine.tokenizer)
        )
        self.metrics = ServerMetrics(engine.stats)
        self.created = int(time.time())
        tokenizer = engine.tokenizer
        self._token_text: Callable[[int], str] = functools.lru_cache(maxsize=1 << 16)(
            (lambda i: tokenizer.decode([i])) if tokenizer is not None else str
        )

    def routes(self) -> list[Route]:
        guard = self._guarded
        return [
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", guard(self.metrics_endpoint), methods=["GET"]),
            Route("/v1/models", guard(self.list_models), methods=["GET"]),
            Route("/v1/models/{model:path}", guard(self.get_model), methods=["GET"]),
            Route("/v1/completions", guard(self.completions), methods=["POST"]),
            Route("/v1/chat/completions", guard(self.chat_completions), methods=["POST"]),
        ]

    # -- plumbing ----------------------------------------------------------------------------

    def _guarded(self, handler: Handler) -> Handler:
        """Check the API key (when one is configured) and answer errors in OpenAI's shape."""

        @functools.wraps(handler)
        async def wrapper(request: Request) -> Response:
            try:
                if self.api_key is not None:
                    scheme, _, token = request.headers.get("authorization", "").partition(" ")
                    # compare_digest: the time taken must not reveal how much of the key matched.
                    if scheme.lower() != "bearer" or not hmac.compare_digest(
                        token.strip().encode(), self.api_key.encode()
                    ):
                        raise APIError(401, "invalid or missing API key", code="invalid_api_key")
                return await handler(request)
            except APIError as exc:
                self.metrics.rejected.labels(status=str(exc.status)).inc()
                return exc.response()

        return wrapper

    def _check_model(self, model: str) -> None:
        if model != self.model_name:
            raise APIError(
                404,
                f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                param="model",
                code="model_not_found",
            )

    async def _respond(
        self,
        request: Request,
        req: p.GenerationRequest,
        prompt: str | Sequence[int],
        params: SamplingParams,
        renderer: _Renderer,
    ) -> Response:
        """Run one request: a JSON body when done, or an event stream. The first output is awaited
        before any header goes out, so a refused request still gets a proper status code."""
        gen = self.engine.generate(
            prompt, params, renderer.id, output_kind="delta" if req.stream else "final"
        )
        timer = RequestTimer(self.metrics)
        try:
            first = await _unless_disconnected(request, anext(gen))
        except _ClientGone:
            timer.cancelled()
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        except OmniserveError as exc:
            raise _engine_error(exc) from None
        if req.stream:
            include_usage = req.stream_options is not None and req.stream_options.include_usage
            return _EventStream(self._events(gen, first, renderer, timer, include_usage))
        await gen.aclose()
        timer.observe(first)
        if first.finish_reason == "abort":
            raise APIError(503, _SHUTTING_DOWN)
        if first.finish_reason == "error":
            raise APIError(500, _failed(first))
        return Response(p.ENCODER.encode(renderer.response(first)), media_type="application/json")

    async def _events(
        self,
        gen: AsyncGenerator[RequestOutput, None],
        out: RequestOutput,
        renderer: _Renderer,
        timer: RequestTimer,
        include_usage: bool,
    ) -> AsyncGenerator[bytes, None]:
        try:
            while True:
                timer.observe(out)
                for chunk in renderer.chunks(out):
                    yield _sse(chunk)
                if out.finished:
                    break
                out = await anext(gen)
            if out.finish_reason in ("abort", "error"):  # say why in-band, as the 503 / 500 do
                why = _SHUTTING_DOWN if out.finish_reason == "abort" else _failed(out)
                yield _sse(p.ErrorResponse(p.ErrorInfo(why, "server_error")))
            elif include_usage:
                yield _sse(renderer.usage_chunk(_usage(out)))
        except OmniserveError as exc:  # the engine died mid-stream: say so in-band, as OpenAI does
            error = _engine_error(exc)
            yield _sse(p.ErrorResponse(p.ErrorInfo(error.message, "server_error")))
        finally:
            timer.cancelled()  # a no-op unless the client left before the last output
            await gen.aclose()
        yield _DONE

    # -- endpoints ---------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        if self.engine.is_running:
            return Response(status_code=200)
        return APIError(503, "the engine is not running").response()

    async def metrics_endpoint(self, request: Request) -> Response:
        body, content_type = self.metrics.render(request.headers.get("accept"))
        return Response(body, media_type=content_type)

    async def list_models(self, request: Request) -> Response:
        models = p.ModelList([p.ModelCard(self.model_name, self.created)])
        return Response(p.ENCODER.encode(models), media_type="application/json")

    async def get_model(self, request: Request) -> Response:
        self._check_model(request.path_params["model"])
        card = p.ModelCard(self.model_name, self.created)
        return Response(p.ENCODER.encode(card), media_type="application/json")

    async def completions(self, request: Request) -> Response:
        req = await _decode(
            request, p.CompletionRequest, self.allow_unknown_fields, self.max_request_bytes
        )
        self._check_model(req.model)
        if req.echo:
            raise APIError(400, "echo is not supported", param="echo")
        if req.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        if req.best_of not in (None, 1):
            raise APIError(400, "best_of must be 1", param="best_of")
        prompt = _completion_prompt(req.prompt)
        if isinstance(prompt, str) and self.engine.tokenizer is not None:
            prompt = await self._tokenize(prompt)
        params = _sampling_params(req, max_tokens=req.max_tokens, logprobs=req.logprobs)
        renderer = _CompletionRenderer(self.model_name, self._token_text)
        return await self._respond(request, req, prompt, params, renderer)

    async def chat_completions(self, request: Request) -> Response:
        req = await _decode(
            request, p.ChatRequest, self.allow_unknown_fields, self.max_request_bytes
        )
        self._check_model(req.model)
        if req.tools:
            raise APIError(400, "tools are not supported", param="tools")
        if req.response_format is not None and req.response_format.type != "text":
            raise APIError(
                400, "only the 'text' response format is supported", param="response_format"
            )
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        text = await asyncio.to_thread(self._chat_text, req.messages)
        prompt = await self._tokenize(text, special_tokens=False, param="messages")
        max_tokens = req.max_completion_tokens or req.max_tokens
        if max_tokens is None:  # OpenAI's default for chat: as much as the context allows
            max_tokens = max(1, self.engine.max_model_len - len(prompt))
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = _sampling_params(req, max_tokens=max_tokens, logprobs=logprobs)
        renderer = _ChatRenderer(self.model_name, self._token_text)
        return await self._respond(request, req, prompt, params, renderer)

    async def _tokenize(
        self, text: str, *, special_tokens: bool = True, param: str = "prompt"
    ) -> list[int]:
        """Token ids of `text` as the engine would encode it, in a worker thread: neither the event
        loop nor the engine's step thread waits on a long prompt. A text with more characters
        than max_model_len tokens can hold is refused without tokenizing it."""
        assert self._max_prompt_chars is not None
        if len(text) > self._max_prompt_chars:
            raise APIError(
                400,
                f"the prompt has {len(text):,} characters, more than {self.engine.max_model_len} "
                f"tokens (max_model_len) can hold",
                param=param,
                code="context_length_exceeded",
            )
        encode = self.engine.tokenizer.encode
        # verbose=False: a prompt past the tokenizer's model_max_length is the scheduler's to
        # refuse, not a warning in the server log.
        return await asyncio.to_thread(
            encode, text, add_special_tokens=special_tokens, verbose=False
        )

    def _chat_text(self, messages: list[p.ChatMessage]) -> str:
        """The conversation rendered by the chat template (`--chat-template`, else the
        tokenizer's); it carries its own special tokens, so it is tokenized without adding any."""
        tokenizer = self.engine.tokenizer
        if tokenizer is None:
            raise APIError(
                400, "this model runs without a tokenizer: use /v1/completions with token ids"
            )
        template = self.chat_template or tokenizer.chat_template
        if template is None:
            raise APIError(
                400,
                "this model has no chat template (none in its tokenizer_config.json): start the "
                "server with --chat-template FILE, or use /v1/completions",
                param="messages",
            )
        if not messages:
            raise APIError(400, "messages must not be empty", param="messages")
        conversation = []
        for m in messages:
            if m.role not in _CHAT_ROLES:
                raise APIError(400, f"unknown message role {m.role!r}", param="messages")
            entry = {"role": m.role, "content": _message_text(m)}
            if m.name is not None:
                entry["name"] = m.name
            conversation.append(entry)
        try:
            return str(
                tokenizer.apply_chat_template(
                    conversation, chat_template=template, tokenize=False, add_generation_prompt=True
                )
            )
        except Exception as exc:  # the template rejects the conversation
            raise APIError(
                400, f"cannot apply the model's chat template: {exc}", param="messages"
            ) from None


async def _http_error(request: Request, exc: Exception) -> Response:
    """Unknown routes and wrong methods, in OpenAI's shape too."""
    assert isinstance(exc, HTTPException)
    return APIError(
        exc.status_code, f"{request.method} {request.url.path}: {exc.detail}"
    ).response()


def create_app(
    engine: AsyncEngine,
    *,
    model_name: str,
    api_key: str | None = None,
    allow_unknown_fields: bool = False,
    chat_template: str | None = None,
    max_request_bytes: int = p.DEFAULT_MAX_REQUEST_BYTES,
) -> Starlette:
    """The ASGI app. Its lifespan starts the engine and, at shutdown, aborts whatever is still
    running and stops the engine thread (`serving.DrainingServer` drains before that).
    `allow_unknown_fields`: drop (and log) request fields the server does not know, instead of
    answering 400; `chat_template`: a Jinja chat template replacing the tokenizer's;
    `max_request_bytes`: larger bodies get 413."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await engine.start()
        yield
        await engine.shutdown()

    server = OpenAIServer(
        engine,
        model_name=model_name,
        api_key=api_key,
        allow_unknown_fields=allow_unknown_fields,
        chat_template=chat_template,
        max_request_bytes=max_request_bytes,
    )
    return Starlette(
        routes=server.routes(), lifespan=lifespan, exception_handlers={HTTPException: _http_error}
    )
