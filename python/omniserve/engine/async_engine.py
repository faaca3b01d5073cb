"""`AsyncEngine`: the engine for asyncio programs (FastAPI, aiohttp, Starlette, plain asyncio).

One engine thread owns the synchronous `Engine` (scheduler + model runner) and steps it while any
request is unfinished; it sleeps on a condition variable otherwise, so an idle engine costs nothing.
The event loop and the engine thread meet at two points only:

- **intake**: `generate()` and `abort()` append operations to a locked deque and notify the
  condition; the engine thread drains the deque at each step boundary and calls `add_request` /
  `abort` itself, because `Engine.add_request` belongs to the stepping thread. An error from
  `add_request` goes back to that request's consumer, never to anyone else.
- **delivery**: after each step the thread posts that step's outputs (plus a stats snapshot) to the
  loop with one `loop.call_soon_threadsafe`, so the loop wakes once per step, not once per token or
  per request. A per-request `asyncio.Queue` hands them to the consumer; a consumer that fell behind
  gets its pending deltas merged into one output.

Requests enter the engine under private ids (a counter), so a caller may reuse its own request id as
soon as its generator ended, even while the engine is still tearing the old request down.

Cancellation: leaving the `async for` early (task cancelled, generator closed, client gone) aborts
the request. The abort is a plain synchronous call (lock, append, notify) inside `finally`, so a
second cancellation cannot interrupt it half-way — it is shielded by construction, and idempotent.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
import uuid
from collections import deque
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import msgspec

from omniserve.config import EngineConfig
from omniserve.engine.engine import Engine, EngineStats, Prompt
from omniserve.errors import (
    ConfigError,
    EngineDeadError,
    EngineOverloadedError,
    InvalidRequestError,
    OmniserveError,
)
from omniserve.outputs import OutputKind, RequestOutput
from omniserve.sampling_params import SamplingParams


@dataclass(slots=True)
class _Add:
    engine_id: str
    prompt: Prompt
    params: SamplingParams | None
    output_kind: OutputKind
    priority: int


@dataclass(slots=True)
class _Abort:
    engine_id: str


@dataclass(slots=True)
class _Stream:
    """Loop-side state of one request: where its outputs go."""

    request_id: str
    engine_id: str
    queue: asyncio.Queue[RequestOutput | BaseException] = field(default_factory=asyncio.Queue)


class AsyncEngine:
    """Streams generations from an `Engine` stepped continuously on its own thread.

    Use it as `async with AsyncEngine.from_pretrained(path) as engine:` or call `await start()`
    and `await shutdown()`; `generate()` also starts it on first use. It belongs to the event loop
    it was started in.
    """

    def __init__(self, engine: Engine, *, max_queued_requests: int | None = None) -> None:
        if max_queued_requests is not None and max_queued_requests < 0:
            raise ConfigError(f"max_queued_requests must be >= 0, got {max_queued_requests}")
        self.engine = engine
        self.max_queued_requests = max_queued_requests
        """Requests accepted but not yet running, beyond which `generate` raises
        `EngineOverloadedError`; None: no limit."""
        self._cond = threading.Condition()
        self._intake: deque[_Add | _Abort] = deque()  # guarded by _cond
        self._stopping = False  # guarded by _cond
        self._next_id = itertools.count()
        self._streams: dict[str, _Stream] = {}  # engine id -> stream; loop thread only
        self._by_request_id: dict[str, _Stream] = {}
        self._stats: EngineStats = engine.stats()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        self._failure: BaseException | None = None

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike[str] | None = None,
        *,
        max_queued_requests: int | None = None,
        **options: Any,
    ) -> AsyncEngine:
        """Load the model like `Engine.from_pretrained` (blocking: call it before the loop runs,
        or through `asyncio.to_thread`)."""
        return cls(
            Engine.from_pretrained(model, **options), max_queued_requests=max_queued_requests
        )

    # -- what the engine is ------------------------------------------------------------------

    @property
    def config(self) -> EngineConfig:
        return self.engine.config

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def is_running(self) -> bool:
        """Started, not shut down and not failed."""
        return self._thread is not None and not self._closed and self._failure is None

    def stats(self) -> EngineStats:
        """The engine's counters as of the last step. The snapshot is taken by the engine thread,
        which owns the scheduler; when the engine is idle it is exact."""
        return self._stats

    # -- life cycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the engine thread, bound to the running event loop. Idempotent."""
        self._ensure_started()

    async def shutdown(self, timeout: float = 0.0) -> None:
        """Stop accepting requests, give in-flight ones up to `timeout` seconds to finish, abort the
        rest (their consumers get a final output with finish_reason "abort") and join the engine
        thread. Idempotent."""
        self._closed = True
        thread = self._thread
        if thread is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # Polling only happens while shutting down; it keeps the hot path free of bookkeeping.
        while self._streams and loop.time() < deadline:
            await asyncio.sleep(0.02)
        with self._cond:
            self._stopping = True
            self._cond.notify()
        # The thread aborts every request it holds and posts their last outputs before it exits;
        # those callbacks run before the join's result reaches us (call_soon_threadsafe keeps
        # order), so every consumer has its final output when this returns.
        await asyncio.to_thread(thread.join)
        self.engine.close()  # the worker processes of tensor parallelism, if any

    async def __aenter__(self) -> AsyncEngine:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.shutdown()

    # -- requests ----------------------------------------------------------------------------

    async def generate(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        *,
        output_kind: OutputKind = "delta",
        priority: int = 0,
    ) -> AsyncGenerator[RequestOutput, None]:
        """Stream one request's outputs: "delta" (new tokens and text of each step), "cumulative"
        (everything so far) or "final" (one output when done). The last output has
        `finished=True`. Raises `InvalidRequestError` / `RequestRejectedError` for a request the
        engine refuses, `EngineOverloadedError` when the queue is full and `EngineDeadError` when
        the engine failed or shut down. Ending the iteration early aborts the request."""
        stream = self._submit(prompt, params, request_id, output_kind, priority)
        done = False
        try:
            while not done:
                item = await stream.queue.get()
                # Drain what else arrived meanwhile so a slow consumer catches up in one go.
                while (
                    isinstance(item, RequestOutput)
                    and not item.finished
                    and not stream.queue.empty()
                ):
                    nxt = stream.queue.get_nowait()
                    item = nxt if isinstance(nxt, BaseException) else _merge(item, nxt, output_kind)
                if isinstance(item, BaseException):
                    done = (
                        True  # the engine never took the request, or it is dead: nothing to abort
                    )
                    raise item
                done = item.finished
                yield item
        finally:
            self._release(stream, abort=not done)

    def abort(self, request_id: str) -> None:
        """Abort a request by the id given to `generate`; its consumer receives a final output with
        finish_reason "abort" and its KV pages are freed at the next step. Unknown or finished ids
        are ignored. Call it from the event loop's thread."""
        stream = self._by_request_id.get(request_id)
        if stream is not None:
            self._send(_Abort(stream.engine_id))

    # -- loop side ---------------------------------------------------------------------------

    def _ensure_started(self) -> None:
        loop = asyncio.get_running_loop()
        if self._thread is not None:
            if loop is not self._loop:
                raise RuntimeError("this AsyncEngine is bound to another event loop")
            return
        if self._closed:
            raise EngineDeadError("the engine was shut down")
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="omniserve-engine", daemon=True)
        self._thread.start()

    def _submit(
        self,
        prompt: Prompt,
        params: SamplingParams | None,
        request_id: str | None,
        output_kind: OutputKind,
        priority: int,
    ) -> _Stream:
        if output_kind not in ("delta", "cumulative", "final"):
            raise InvalidRequestError(
                f"output_kind must be 'delta', 'cumulative' or 'final', got {output_kind!r}"
            )
        self._ensure_started()
        if self._failure is not None:
            raise self._dead_error()
        if self._closed:
            raise EngineDeadError("the engine was shut down")
        if request_id is None:
            request_id = uuid.uuid4().hex
        elif request_id in self._by_request_id:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        limit = self.max_queued_requests
        # Requests not yet running: still in intake or waiting in the scheduler. The running count
        # is as of the last step, which is as fresh as admission itself.
        if limit is not None and len(self._streams) - self._stats.running >= limit:
            raise EngineOverloadedError(
                f"the engine is overloaded: {limit} requests are already queued; retry later"
            )
        stream = _Stream(request_id, str(next(self._next_id)))
        self._streams[stream.engine_id] = stream
        self._by_request_id[request_id] = stream
        self._send(_Add(stream.engine_id, prompt, params, output_kind, priority))
        return stream

    def _release(self, stream: _Stream, *, abort: bool) -> None:
        """Forget a stream whose consumer is gone; abort its request if it had not finished.
        Synchronous and exception-free so that it completes even during cancellation."""
        self._streams.pop(stream.engine_id, None)
        if self._by_request_id.get(stream.request_id) is stream:
            del self._by_request_id[stream.request_id]
        if abort:
            self._send(_Abort(stream.engine_id))

    def _send(self, op: _Add | _Abort) -> None:
        with self._cond:
            self._intake.append(op)
            self._cond.notify()

    def _deliver(
        self,
        outputs: list[RequestOutput],
        errors: list[tuple[str, Exception]],
        stats: EngineStats,
    ) -> None:
        """Runs on the loop, once per engine step."""
        self._stats = stats
        streams = self._streams
        for out in outputs:
            stream = streams.get(out.request_id)
            # None: the consumer left and the abort is on its way; drop the output.
            if stream is not None:
                out.request_id = stream.request_id
                stream.queue.put_nowait(out)
        for engine_id, exc in errors:
            stream = streams.get(engine_id)
            if stream is not None:
                stream.queue.put_nowait(exc)

    def _on_engine_failure(self, exc: BaseException) -> None:
        """Runs on the loop when the engine thread died: every consumer gets the error."""
        self._failure = exc
        for stream in self._streams.values():
            stream.queue.put_nowait(self._dead_error())

    def _dead_error(self) -> EngineDeadError:
        # A fresh exception per consumer: one instance raised in many tasks would pile up their
        # tracebacks on each other.
        failure = self._failure
        reason = str(failure) if isinstance(failure, OmniserveError) else repr(failure)
        error = EngineDeadError(f"the engine failed: {reason}")
        error.__cause__ = self._failure
        return error

    # -- engine thread -----------------------------------------------------------------------

    def _run(self) -> None:
        engine = self.engine
        live: set[str] = set()  # engine ids added and not finished; shutdown aborts these
        try:
            while True:
                with self._cond:
                    while not (self._intake or self._stopping or engine.has_unfinished_requests()):
                        self._cond.wait()
                    ops = list(self._intake)
                    self._intake.clear()
                    stopping = self._stopping
                errors: list[tuple[str, Exception]] = []
                for op in ops:
                    if isinstance(op, _Abort):
                        engine.abort(op.engine_id)
                        continue
                    try:
                        engine.add_request(
                            op.engine_id,
                            op.prompt,
                            op.params,
                            output_kind=op.output_kind,
                            priority=op.priority,
                        )
                    except Exception as exc:  # bad request: its consumer's problem only
                        errors.append((op.engine_id, exc))
                    else:
                        live.add(op.engine_id)
                if stopping:
                    for engine_id in live:
                        engine.abort(engine_id)
                outputs = engine.step() if engine.has_unfinished_requests() else []
                for out in outputs:
                    if out.finished:
                        live.discard(out.request_id)
                if not self._post(self._deliver, outputs, errors, engine.stats()):
                    with self._cond:
                        self._stopping = True  # nobody left to deliver to
                if stopping and not engine.has_unfinished_requests():
                    return
        except BaseException as exc:
            self._post(self._on_engine_failure, exc)

    def _post(self, callback: Callable[..., None], *args: Any) -> bool:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the event loop was closed without shutdown()
            return False
        return True


def _merge(a: RequestOutput, b: RequestOutput, kind: OutputKind) -> RequestOutput:
    """Fold output `b` into the earlier `a` of the same request."""
    if kind != "delta":
        return b
    logprobs = None if b.logprobs is None else (a.logprobs or []) + b.logprobs
    return msgspec.structs.replace(
        b, token_ids=a.token_ids + b.token_ids, text=a.text + b.text, logprobs=logprobs
    )
