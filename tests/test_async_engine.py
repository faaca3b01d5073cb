"""AsyncEngine over the real engine and a tiny random Llama: streaming modes, cancellation and
aborts (also in the middle of a step), many concurrent generators, per-request and engine-wide
errors, overload, shutdown with requests in flight, and that an idle engine thread sleeps."""

from __future__ import annotations

import asyncio
import gc
import itertools
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from omniserve.engine.async_engine import AsyncEngine
from omniserve.errors import (
    EngineDeadError,
    EngineOverloadedError,
    InvalidRequestError,
    RequestRejectedError,
)
from omniserve.outputs import RequestOutput
from omniserve.sampling_params import SamplingParams
from tiny_models import save_servable

GREEDY = SamplingParams(temperature=0.0, max_tokens=8)
LONG = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
"""Runs far longer than any test waits for it."""
ENGINE_OPTIONS: dict[str, Any] = dict(dtype="float32", device="cpu", page_size=16, num_kv_pages=64)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-llama")
    save_servable("llama3", directory, max_position_embeddings=512)
    return directory


@pytest.fixture
async def engine(model_dir: Path) -> AsyncIterator[AsyncEngine]:
    async with AsyncEngine.from_pretrained(model_dir, **ENGINE_OPTIONS) as eng:
        yield eng


async def collect(
    engine: AsyncEngine, prompt: Any, params: SamplingParams = GREEDY, **kw: Any
) -> list[RequestOutput]:
    return [out async for out in engine.generate(prompt, params, **kw)]


async def wait_idle(engine: AsyncEngine, timeout: float = 10.0) -> None:
    """Until no request holds a slot or a page (the stats snapshot is exact once idle)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        s = engine.stats()
        if s.idle:
            return
        assert asyncio.get_running_loop().time() < deadline, f"engine not idle: {s}"
        await asyncio.sleep(0.01)


class StepGate:
    """Blocks the engine thread inside `Engine.step` while closed: to act in mid-step."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.inside = threading.Event()
        self._open = threading.Event()
        self._open.set()
        real: Callable[[], list[RequestOutput]] = engine.engine.step

        def step() -> list[RequestOutput]:
            if not self._open.is_set():
                self.inside.set()
                self._open.wait(10)
            return real()

        engine.engine.step = step  # type: ignore[method-assign]

    def close(self) -> None:
        self.inside.clear()
        self._open.clear()

    def open(self) -> None:
        self._open.set()

    async def wait_inside(self) -> None:
        assert await asyncio.to_thread(self.inside.wait, 10), "the engine never stepped"


def joined(outputs: list[RequestOutput]) -> tuple[list[int], str]:
    return [t for o in outputs for t in o.token_ids], "".join(o.text for o in outputs)


async def test_delta_and_cumulative_streams_match_the_sync_engine(
    engine: AsyncEngine, model_dir: Path
) -> None:
    prompt = "def add(a, b):"
    deltas = await collect(engine, prompt, output_kind="delta")
    cumulative = await collect(engine, prompt, output_kind="cumulative")
    final = await collect(engine, prompt, output_kind="final")

    assert [o.finished for o in deltas] == [False] * (len(deltas) - 1) + [True]
    ids, text = joined(deltas)
    assert deltas[-1].num_generated_tokens == len(ids) <= GREEDY.max_tokens
    for earlier, later in itertools.pairwise(cumulative):
        assert later.token_ids[: len(earlier.token_ids)] == earlier.token_ids
    assert len(final) == 1
    for last in (cumulative[-1], final[0]):
        assert (last.token_ids, last.text, last.finish_reason) == (
            ids,
            text,
            deltas[-1].finish_reason,
        )

    from omniserve.engine.engine import Engine  # the same weights, stepped by hand

    reference = Engine.from_pretrained(model_dir, **ENGINE_OPTIONS).generate(
        [prompt], GREEDY, use_tqdm=False
    )[0]
    assert (reference.token_ids, reference.text) == (ids, text)
    await wait_idle(engine)


async def test_many_concurrent_generators_match_running_alone(engine: AsyncEngine) -> None:
    prompts = [f"Hello world {i}: " + "x" * (i % 7) for i in range(48)]
    alone = [joined(await collect(engine, p)) for p in prompts[:12]]
    together = await asyncio.gather(
        *(collect(engine, p, request_id=f"r{i}") for i, p in enumerate(prompts))
    )
    for i, outs in enumerate(together):
        assert all(o.request_id == f"r{i}" for o in outs)
        assert outs[-1].finished and outs[-1].finish_reason in ("stop", "length")
        if i < len(alone):
            assert joined(outs) == alone[i], f"request {i} differs when batched"
    await wait_idle(engine)


async def test_outputs_reach_the_loop_once_per_step(engine: AsyncEngine) -> None:
    deliveries: list[int] = []
    real = engine._deliver

    def counting(outputs: list[RequestOutput], *args: Any) -> None:
        deliveries.append(len(outputs))
        real(outputs, *args)

    engine._deliver = counting  # type: ignore[method-assign]
    steps_before = engine.stats().num_steps
    await asyncio.gather(*(collect(engine, f"prompt {i}") for i in range(16)))
    await wait_idle(engine)
    assert len(deliveries) == engine.stats().num_steps - steps_before
    assert max(deliveries) > 1, "outputs of one step should travel together"
    # Idle: the engine thread sleeps on its condition instead of spinning.
    idle_steps, idle_deliveries = engine.stats().num_steps, len(deliveries)
    await asyncio.sleep(0.3)
    assert (engine.stats().num_steps, len(deliveries)) == (idle_steps, idle_deliveries)
    assert engine._thread is not None and engine._thread.is_alive()


async def test_cancelling_the_consumer_task_aborts_and_frees_pages(engine: AsyncEngine) -> None:
    seen = asyncio.Event()

    async def consume() -> None:
        async for out in engine.generate("The quick brown fox", LONG):
            if out.num_generated_tokens >= 3:
                seen.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(seen.wait(), 10)
    assert engine.stats().running == 1 and engine.stats().dense_pages_used > 0
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_idle(engine)


async def test_closing_or_dropping_the_generator_aborts(engine: AsyncEngine) -> None:
    gen = engine.generate("Hello world", LONG, request_id="same")
    await anext(gen)
    await gen.aclose()
    await wait_idle(engine)

    # The id is free again at once, although the engine may still be tearing the old one down.
    gen = engine.generate("Hello world", LONG, request_id="same")
    await anext(gen)
    del gen  # abandoned without aclose(): the loop's async-generator finalizer closes it
    gc.collect()
    await wait_idle(engine)


async def test_abort_by_id_ends_the_stream_with_reason_abort(engine: AsyncEngine) -> None:
    outputs: list[RequestOutput] = []
    async for out in engine.generate("Hello world", LONG, request_id="victim"):
        outputs.append(out)
        if len(outputs) == 2:
            engine.abort("victim")
            engine.abort("victim")  # idempotent
    assert outputs[-1].finished and outputs[-1].finish_reason == "abort"
    assert outputs[-1].num_generated_tokens < LONG.max_tokens
    engine.abort("victim")  # finished: ignored
    engine.abort("never-existed")
    await wait_idle(engine)


async def test_abort_and_cancel_during_a_step(engine: AsyncEngine) -> None:
    gate = StepGate(engine)
    aborted = engine.generate("one", LONG, request_id="aborted")
    cancelled = asyncio.create_task(collect(engine, "two", LONG))
    survivor = asyncio.create_task(collect(engine, "three"))
    await anext(aborted)
    gate.close()
    await gate.wait_inside()  # the engine thread is now inside step()
    engine.abort("aborted")
    cancelled.cancel()
    gate.open()
    rest = [out async for out in aborted]
    assert rest[-1].finish_reason == "abort"
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert (await survivor)[-1].finish_reason in ("stop", "length")
    await wait_idle(engine)


async def test_request_errors_reach_only_their_consumer(engine: AsyncEngine) -> None:
    too_long = [5] * 600  # more tokens than max_model_len (512)
    results = await asyncio.gather(
        collect(engine, "fine"),
        collect(engine, too_long),
        collect(engine, [9999]),  # outside the vocabulary
        collect(engine, "fine too", SamplingParams(max_tokens=4)),
        return_exceptions=True,
    )
    assert isinstance(results[1], RequestRejectedError)
    assert isinstance(results[2], InvalidRequestError)
    for outs in (results[0], results[3]):
        assert isinstance(outs, list) and outs[-1].finished
    with pytest.raises(InvalidRequestError):
        await collect(engine, "x", output_kind="sideways")  # type: ignore[arg-type]
    gen = engine.generate("Hello", LONG, request_id="dup")
    await anext(gen)
    with pytest.raises(InvalidRequestError, match="already in use"):
        await collect(engine, "Hello", request_id="dup")
    await gen.aclose()
    assert engine.is_running
    await wait_idle(engine)


async def test_engine_failure_reaches_every_consumer(engine: AsyncEngine) -> None:
    calls = 0
    real = engine.engine.runner.launch

    def failing(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls > 3:
            raise RuntimeError("device fell off the bus")
        return real(*args, **kwargs)

    engine.engine.runner.launch = failing  # type: ignore[method-assign]
    results = await asyncio.wait_for(
        asyncio.gather(*(collect(engine, f"p{i}", LONG) for i in range(5)), return_exceptions=True),
        10,
    )
    for result in results:
        assert isinstance(result, EngineDeadError), result
        assert "device fell off the bus" in str(result)
    with pytest.raises(EngineDeadError):
        await collect(engine, "after")
    assert not engine.is_running
    assert engine._thread is not None
    await asyncio.to_thread(engine._thread.join, 5)
    assert not engine._thread.is_alive()


async def test_queue_limit_rejects_when_overloaded(model_dir: Path) -> None:
    async with AsyncEngine.from_pretrained(
        model_dir, max_queued_requests=2, **ENGINE_OPTIONS
    ) as engine:
        gate = StepGate(engine)
        gate.close()
        queued = [asyncio.create_task(collect(engine, f"q{i}")) for i in range(2)]
        await gate.wait_inside()  # both were handed to the engine; none runs yet
        with pytest.raises(EngineOverloadedError):
            await collect(engine, "one too many")
        gate.open()
        for task in queued:
            assert (await task)[-1].finished
        assert (await collect(engine, "room again"))[-1].finished


async def test_shutdown_aborts_requests_in_flight(model_dir: Path) -> None:
    engine = AsyncEngine.from_pretrained(model_dir, **ENGINE_OPTIONS)
    await engine.start()
    started = [asyncio.Event() for _ in range(4)]

    async def consume(i: int) -> list[RequestOutput]:
        outs = []
        async for out in engine.generate(f"long {i}", LONG):
            outs.append(out)
            started[i].set()
        return outs

    tasks = [asyncio.create_task(consume(i)) for i in range(4)]
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 10)
    await asyncio.wait_for(engine.shutdown(), 10)
    for task in tasks:
        outs = await asyncio.wait_for(task, 5)
        assert outs[-1].finished and outs[-1].finish_reason == "abort"
    assert engine._thread is not None and not engine._thread.is_alive()
    assert engine.stats().running == 0 and engine.stats().dense_pages_used == 0
    with pytest.raises(EngineDeadError, match="shut down"):
        await collect(engine, "late")
    await engine.shutdown()  # idempotent


async def test_shutdown_with_timeout_lets_requests_finish(model_dir: Path) -> None:
    engine = AsyncEngine.from_pretrained(model_dir, **ENGINE_OPTIONS)
    tasks = [asyncio.create_task(collect(engine, f"short {i}")) for i in range(3)]
    await asyncio.sleep(0)  # let them submit
    await engine.shutdown(timeout=10)
    for task in tasks:
        assert (await task)[-1].finish_reason in ("stop", "length")
