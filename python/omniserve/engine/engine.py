"""`Engine`: the synchronous front of the system.

One step is: the Rust scheduler plans (`schedule`), the model runner computes and samples, the
scheduler appends the tokens (`update`), and the engine turns them into text and outputs. With
async scheduling (the default on CUDA) the engine plans and launches step n+1 before it hands step
n's tokens to the scheduler, so the host's part of a step runs while the device computes. Python
keeps what only Python needs (sampling parameters, detokenizers, logprobs); the scheduler keeps
tokens, pages and lifecycles.
"""

from __future__ import annotations

import itertools
import logging
import operator
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import TracebackType
from typing import Any, cast

import msgspec
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from omniserve import _scheduler
from omniserve.config import EngineConfig
from omniserve.engine.detokenizer import IncrementalDetokenizer
from omniserve.engine.step_io import StepIO
from omniserve.errors import ConfigError, EngineDeadError, InvalidRequestError
from omniserve.layers.sampler import SampleResult
from omniserve.outputs import FinishReason, OutputKind, RequestOutput, TokenLogprob
from omniserve.runner.model_runner import ModelRunner, PendingStep, StepOutput
from omniserve.runner.step_plan import FLAG_NEW_ROW
from omniserve.runner.worker import WorkerPool
from omniserve.sampling_params import SamplingParams

Prompt = str | Sequence[int]

logger = logging.getLogger(__name__)

# The scheduler names its finish codes with the OpenAI reasons `FinishReason` lists.
_FINISH_REASONS = cast(dict[int, FinishReason], _scheduler.FINISH_REASONS)
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
"""The range of the scheduler's priority."""


def bundled_model_path() -> Path:
    """The small model shipped inside the package, used when no model is given."""
    return Path(str(resources.files("omniserve"))) / "assets" / "model"


class EngineStats(msgspec.Struct, frozen=True):
    running: int
    waiting: int
    dense_pages_used: int
    dense_pages_total: int
    stream_pages_used: int
    stream_pages_total: int
    num_preemptions: int
    num_steps: int
    num_finished: int
    prefix_cache_queries: int
    """Prompt tokens of admissions that could use the prefix cache (recomputes included)."""
    prefix_cache_hits: int
    """Of those, the tokens the prefix cache held."""
    prefix_cache_pages: int
    """Dense pages the prefix cache holds, in use or free (evicted only when pages run out)."""
    prompt_tokens_total: int
    generated_tokens_total: int

    @property
    def idle(self) -> bool:
        """No request waits, runs or holds a KV page."""
        return (
            self.running == 0
            and self.waiting == 0
            and self.dense_pages_used == 0
            and self.stream_pages_used == 0
        )


@dataclass(slots=True)
class _Request:
    """Python-side state of one request: what the scheduler does not need to know."""

    request_id: str
    ext_id: int
    prompt_ids: list[int]
    params: SamplingParams
    output_kind: OutputKind
    stop_ids: tuple[int, ...]
    detok: IncrementalDetokenizer | None
    arrival_time: float
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    text: str = ""
    sent_tokens: int = 0
    sent_text: int = 0
    first_token_time: float | None = None
    prompt_logprobs: list[float | None] | None = None

    def record_prompt_logprobs(self, pos0: int, logprobs: list[float]) -> None:
        """Scores of prompt tokens pos0+1.. ; written by position, since a recompute after
        preemption scores the same tokens again."""
        assert self.prompt_logprobs is not None
        self.prompt_logprobs[pos0 + 1 : pos0 + 1 + len(logprobs)] = logprobs


class Engine:
    """Continuous-batching generation over a paged KV cache.

    `add_request` and `step` belong to one thread; `abort` may be called from any thread.
    With `tensor_parallel_size > 1` the engine starts worker processes, which `close()` (or
    leaving a `with` block, or the engine's collection, or the interpreter's exit) ends.
    """

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self._workers = WorkerPool(config) if config.tensor_parallel_size > 1 else None
        try:
            self.runner = ModelRunner(
                config, None if self._workers is None else self._workers.group
            )
        except Exception as exc:
            if self._workers is None:
                raise
            failure = self._workers.failure(exc)
            self._workers.close()
            if failure is None:
                raise
            raise failure from exc
        self.max_model_len = self.runner.max_model_len
        self.tokenizer = None if config.skip_tokenizer_init else _load_tokenizer(config)
        self._eos_ids = _eos_token_ids(self.runner.hf_config, self.tokenizer, config.model)
        options = config.scheduler_options() | self.runner.scheduler_options()
        # A streaming head's KV lives in its request's own table, which no other request can
        # share: the prefix cache is on by default only where every head is dense.
        options.setdefault("enable_prefix_caching", not options.get("num_stream_pages"))
        # On the CPU the host computes the step itself: nothing to overlap.
        options.setdefault("async_scheduling", self.runner.device.type == "cuda")
        self._async: bool = options["async_scheduling"]
        self._in_flight: PendingStep | None = None
        """The launched step whose tokens the next `step()` hands to the scheduler (async)."""
        scheduler = _scheduler.Scheduler(
            _scheduler.SchedulerConfig(
                num_dense_pages=self.runner.num_kv_pages,
                max_model_len=self.max_model_len,
                **options,
            )
        )
        self._io = StepIO(scheduler)
        self._aborter = scheduler.abort_handle()
        self._requests: dict[int, _Request] = {}
        self._ext_ids: dict[str, int] = {}
        self._next_ext_id = itertools.count(1)
        self._next_batch_id = itertools.count(1)
        self._dead: BaseException | None = None
        self._prompt_tokens = 0
        self._generated_tokens = 0

    @classmethod
    def from_pretrained(cls, model: str | os.PathLike[str] | None = None, **options: Any) -> Engine:
        """Load a Hugging Face checkpoint directory (the bundled small model when `model` is None).
        `options` are `EngineConfig` fields."""
        if model is None:
            model = bundled_model_path()
            if not (model / "config.json").is_file():
                raise ConfigError(f"no model given and the bundled model is missing at {model}")
        return cls(EngineConfig.from_kwargs(str(model), **options))

    # -- requests ---------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt: Prompt,
        params: SamplingParams | None = None,
        *,
        output_kind: OutputKind = "final",
        priority: int = 0,
    ) -> None:
        """Queue a request. Raises InvalidRequestError for bad input and RequestRejectedError for
        a prompt that can never fit; either way nothing else is affected."""
        self._check_alive()
        if request_id in self._ext_ids:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(
                f"params must be a SamplingParams, got {type(params).__name__} "
                "(SamplingParams.from_dict builds one from a dict)"
            )
        if not _INT64_MIN <= priority <= _INT64_MAX:
            raise InvalidRequestError(f"priority must be a 64-bit integer, got {priority}")
        prompt_ids = self._prompt_ids(prompt)
        self._check_lengths_and_ids(params, len(prompt_ids))
        if params.stop and self.tokenizer is None:
            raise InvalidRequestError(
                "stop strings need a tokenizer (engine runs with skip_tokenizer_init)"
            )
        stop_ids = tuple(params.stop_token_ids) + (() if params.ignore_eos else self._eos_ids)
        ext_id = next(self._next_ext_id)
        self._io.scheduler.add_request(
            ext_id,
            prompt_ids,
            max_tokens=params.max_tokens,
            min_tokens=params.min_tokens,
            stop_token_ids=stop_ids,
            priority=priority,
            # Prompt logprobs need every prompt token computed.
            cache_prefix=not params.prompt_logprobs,
        )
        detok = None
        if self.tokenizer is not None:
            detok = IncrementalDetokenizer(
                self.tokenizer,
                prompt_ids,
                skip_special_tokens=params.skip_special_tokens,
                # SamplingParams.__post_init__ stores `stop` as a tuple.
                stop=cast(tuple[str, ...], params.stop),
                include_stop_str_in_output=params.include_stop_str_in_output,
                min_tokens=params.min_tokens,
            )
        self._requests[ext_id] = _Request(
            request_id=request_id,
            ext_id=ext_id,
            prompt_ids=prompt_ids,
            params=params,
            output_kind=output_kind,
            stop_ids=stop_ids,
            detok=detok,
            arrival_time=time.monotonic(),
            logprobs=[] if params.logprobs is not None else None,
            prompt_logprobs=[None] * len(prompt_ids) if params.prompt_logprobs else None,
        )
        self._ext_ids[request_id] = ext_id
        self._prompt_tokens += len(prompt_ids)

    def abort(self, request_id: str) -> None:
        """Thread-safe and idempotent; the request ends at the next step with reason "abort"."""
        ext_id = self._ext_ids.get(request_id)
        if ext_id is not None:
            self._aborter.abort(ext_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    # -- stepping ---------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one scheduling step; returns outputs per each request's output kind, plus every
        request that finished or was aborted in this step. With async scheduling the tokens are
        those of the step launched by the previous call (this call launches the next one)."""
        self._check_alive()
        try:
            if self._workers is not None:
                self._workers.check()
            return self._step()
        except Exception as exc:
            # A failure between schedule() and update() leaves the scheduler's view of the KV
            # cache out of step with the runner's: nothing after it can be trusted.
            self._dead = exc
            if isinstance(exc, EngineDeadError):
                raise
            failure = None if self._workers is None else self._workers.failure(exc)
            if failure is not None:
                raise failure from exc
            raise EngineDeadError(f"engine step failed: {exc!r}") from exc

    @property
    def worker_pids(self) -> tuple[int, ...]:
        """Process ids of the tensor-parallel workers (ranks 1..N-1); () without them."""
        return () if self._workers is None else self._workers.pids

    def close(self) -> None:
        """End the worker processes of tensor parallelism (nothing to do without them); the
        engine serves no more. Idempotent."""
        if self._dead is None:
            self._dead = EngineDeadError("the engine was closed")
        if self._workers is not None:
            self._workers.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _step(self) -> list[RequestOutput]:
        # With async scheduling the step planned now is launched before the one in flight is
        # finished, so the device computes it while the host turns the earlier step's tokens
        # into outputs; the scheduler plans it with the earlier step's tokens as placeholders.
        outputs, launched = self._launch()
        if self._in_flight is not None:
            outputs += self._complete(self._in_flight.wait())
            self._in_flight = None
        if launched is not None:
            if self._async:
                self._in_flight = launched
            else:
                outputs += self._complete(launched.wait())
        return outputs

    def _launch(self) -> tuple[list[RequestOutput], PendingStep | None]:
        """Schedule a step and queue it on the device; returns the outputs of the requests
        aborted at this step boundary and the launched step, if any."""
        counts, plan = self._io.schedule()
        now = time.monotonic()
        outputs = [
            self._finish(self._requests[ext_id], "abort", None, now)
            for ext_id in self._io.aborted(counts)
            if ext_id in self._requests
        ]
        if plan is None:
            return outputs, None
        req_ids = self._io.req_ids(counts)
        for i in (plan.flags & FLAG_NEW_ROW).nonzero().flatten().tolist():
            req = self._requests[req_ids[i]]
            self.runner.bind_row(
                int(plan.rows[i]), req.params, req.prompt_ids, req.token_ids, req.stop_ids
            )
        pending = self.runner.launch(plan)
        # Prompt scores are on the host already; the plan's buffers are the next step's soon.
        for i, logprobs in pending.prompt_scores:
            self._requests[req_ids[i]].record_prompt_logprobs(int(plan.pos0[i]), logprobs.tolist())
        return outputs, pending

    def _complete(self, step: StepOutput) -> list[RequestOutput]:
        """Hand a step's tokens to the scheduler and turn them into outputs."""
        sampled_idx, result, _, failed = step
        outputs: list[RequestOutput] = []
        out_ids, out_tokens, out_sched, out_finish = self._io.update(sampled_idx, result.token_ids)
        k_of_sched = {s: k for k, s in enumerate(sampled_idx.tolist())}
        now = time.monotonic()
        touched: list[_Request] = []
        for ext_id, token, sched_idx, code in zip(out_ids, out_tokens, out_sched, out_finish):
            req, k = self._requests[ext_id], k_of_sched[sched_idx]
            ended = code != _scheduler.FINISH_NONE
            finished: RequestOutput | None
            if k in failed:  # its token is a placeholder
                finished = self._fail(req, failed[k], ended=ended, now=now)
            else:
                try:
                    finished = self._append_token(req, token, result, k, code, now)
                except Exception as exc:  # this request's output failed; the others' go on
                    finished = self._fail(req, exc, ended=ended, now=now)
            if finished is not None:
                outputs.append(finished)
            elif req.output_kind != "final":
                touched.append(req)
        outputs.extend(self._progress(req, now) for req in touched)
        return outputs

    def _append_token(
        self, req: _Request, token: int, result: SampleResult, k: int, code: int, now: float
    ) -> RequestOutput | None:
        """Record one token; returns the final output if the request ended with it."""
        if req.first_token_time is None:
            req.first_token_time = now
        req.token_ids.append(token)
        self._generated_tokens += 1
        if req.logprobs is not None:
            req.logprobs.append(_token_logprob(result, k, token, req.params.logprobs or 0))
        stop_token = code == _scheduler.FINISH_STOP
        stop_string = None
        # The stop token's own text is not part of the output (as vLLM does) unless asked.
        if req.detok is not None and (not stop_token or req.params.include_stop_str_in_output):
            delta = req.detok.push([token])
            req.text += delta.delta_text
            stop_string = delta.stop_reason
        if stop_string is not None:
            if code == _scheduler.FINISH_NONE:
                self._io.scheduler.finish(req.ext_id)
            return self._finish(req, "stop", stop_string, now)
        if code != _scheduler.FINISH_NONE:
            if req.detok is not None:
                req.text += req.detok.flush()
            return self._finish(req, _FINISH_REASONS[code], token if stop_token else None, now)
        return None

    def _fail(self, req: _Request, exc: Exception, *, ended: bool, now: float) -> RequestOutput:
        """End `req` with finish reason "error" (freeing its pages unless the scheduler `ended`
        it already): an error in one request's output handling is that request's, not the
        engine's, whose scheduler and cache stay consistent."""
        logger.error("request %r failed; it ends with an error", req.request_id, exc_info=exc)
        if not ended:
            self._io.scheduler.finish(req.ext_id)
        # Popped, not deleted: the failure may have come after `_finish` removed it.
        self._requests.pop(req.ext_id, None)
        self._ext_ids.pop(req.request_id, None)
        out = self._output(req, finished=True, reason="error", stop_reason=None, now=now)
        return msgspec.structs.replace(out, error=f"{type(exc).__name__}: {exc}")

    def _progress(self, req: _Request, now: float) -> RequestOutput:
        return self._output(req, finished=False, reason=None, stop_reason=None, now=now)

    def _finish(
        self, req: _Request, reason: FinishReason, stop_reason: str | int | None, now: float
    ) -> RequestOutput:
        del self._requests[req.ext_id]
        del self._ext_ids[req.request_id]
        return self._output(req, finished=True, reason=reason, stop_reason=stop_reason, now=now)

    def _output(
        self,
        req: _Request,
        *,
        finished: bool,
        reason: FinishReason | None,
        stop_reason: str | int | None,
        now: float,
    ) -> RequestOutput:
        if req.output_kind == "delta":
            token_ids = req.token_ids[req.sent_tokens :]
            text = req.text[req.sent_text :]
            logprobs = None if req.logprobs is None else req.logprobs[req.sent_tokens :]
            req.sent_tokens, req.sent_text = len(req.token_ids), len(req.text)
        else:
            token_ids = list(req.token_ids)
            text = req.text
            logprobs = None if req.logprobs is None else list(req.logprobs)
        return RequestOutput(
            request_id=req.request_id,
            prompt_token_ids=req.prompt_ids,
            token_ids=token_ids,
            text=text,
            logprobs=logprobs,
            prompt_logprobs=req.prompt_logprobs if finished else None,
            finished=finished,
            finish_reason=reason,
            stop_reason=stop_reason,
            num_prompt_tokens=len(req.prompt_ids),
            num_generated_tokens=len(req.token_ids),
            arrival_time=req.arrival_time,
            first_token_time=req.first_token_time,
            finish_time=now if finished else None,
        )

    # -- batch API --------------------------------------------------------------------------

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids); outputs come back in prompt order.

        It drives the engine until its own requests finish, so it needs an engine with no other
        requests in flight (their outputs would be consumed here); use `add_request`/`step` to mix."""
        if self.has_unfinished_requests():
            raise InvalidRequestError(
                "generate() needs an idle engine: requests added with add_request() are still "
                "running; drive them with step() first"
            )
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [cast(Prompt, prompts)]
        # Not one prompt (checked above), so a sequence of prompts.
        prompts = list(cast(Sequence[Prompt], prompts))
        if isinstance(params, Sequence):
            if len(params) != len(prompts):
                raise InvalidRequestError(
                    f"got {len(params)} sampling params for {len(prompts)} prompts"
                )
            per_prompt = list(params)
        else:
            per_prompt = [params or SamplingParams()] * len(prompts)
        ids = [f"generate-{next(self._next_batch_id)}" for _ in prompts]
        added: list[str] = []
        try:
            for request_id, prompt, p in zip(ids, prompts, per_prompt):
                self.add_request(request_id, prompt, p)
                added.append(request_id)
        except Exception:
            for request_id in added:
                self.abort(request_id)
            while self.has_unfinished_requests():
                self.step()
            raise
        results: dict[str, RequestOutput] = {}
        progress = _progress_bar(len(ids), use_tqdm)
        while len(results) < len(ids):
            for out in self.step():
                if out.finished:
                    results[out.request_id] = out
                    progress.update(1)
        progress.close()
        return [results[i] for i in ids]

    def stats(self) -> EngineStats:
        return EngineStats(
            **self._io.scheduler.stats(),
            prompt_tokens_total=self._prompt_tokens,
            generated_tokens_total=self._generated_tokens,
        )

    # -- helpers ----------------------------------------------------------------------------

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"engine failed earlier: {self._dead!r}")

    def _check_lengths_and_ids(self, params: SamplingParams, prompt_len: int) -> None:
        """What the scheduler and the sampler rely on, checked before either sees the request:
        the tokens fit max_model_len, and every stop id is in the vocabulary."""
        room = self.max_model_len - prompt_len
        if room >= 1 and params.max_tokens > room:  # a prompt with no room: the scheduler's error
            raise InvalidRequestError(
                f"max_tokens {params.max_tokens} is more than the {room} tokens max_model_len "
                f"{self.max_model_len} leaves after the {prompt_len}-token prompt"
            )
        if (bad := self._outside_vocabulary(params.stop_token_ids)) is not None:
            raise InvalidRequestError(f"stop_token_ids: token id {bad}")

    def _outside_vocabulary(self, ids: Sequence[int]) -> str | None:
        """'ID is outside the vocabulary [0, V)' for the first id of `ids` that is; else None."""
        vocab = self.runner.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        return None if bad is None else f"{bad} is outside the vocabulary [0, {vocab})"

    def _prompt_ids(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequestError("text prompts need a tokenizer; pass token ids")
            ids = self.tokenizer.encode(prompt, verbose=False)  # the length is checked below
        else:
            try:
                ids = [operator.index(t) for t in prompt]
            except TypeError:
                raise InvalidRequestError(
                    f"a prompt is a string or a sequence of token ids, got {type(prompt).__name__}"
                ) from None
        if not ids:
            raise InvalidRequestError("the prompt is empty")
        if (bad := self._outside_vocabulary(ids)) is not None:
            raise InvalidRequestError(f"prompt token id {bad}")
        return ids


def _load_tokenizer(config: EngineConfig) -> PreTrainedTokenizerBase:
    path = config.tokenizer or config.model
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"cannot load a tokenizer from {path}: {exc} "
            "(pass tokenizer=DIR, or skip_tokenizer_init=True to run on token ids)"
        ) from None


def _eos_token_ids(
    hf_config: Any, tokenizer: PreTrainedTokenizerBase | None, model_dir: str
) -> tuple[int, ...]:
    """Every id that ends generation: the model's, its generation config's and the tokenizer's."""
    found: list[int] = []

    def add(value: Any) -> None:
        if isinstance(value, int):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found.extend(v for v in value if isinstance(v, int))

    add(getattr(hf_config, "eos_token_id", None))
    gen_path = Path(model_dir) / "generation_config.json"
    if gen_path.is_file():
        add(msgspec.json.decode(gen_path.read_bytes()).get("eos_token_id"))
    if tokenizer is not None:
        add(tokenizer.eos_token_id)
    return tuple(dict.fromkeys(found))


def _token_logprob(result: SampleResult, k: int, token: int, top_n: int) -> TokenLogprob:
    # Called only for requests that asked for logprobs, so the sampler returned them.
    assert result.logprobs is not None
    top: tuple[tuple[int, float], ...] = ()
    if top_n:
        assert result.top_ids is not None and result.top_logprobs is not None
        top = tuple(
            zip(result.top_ids[k, :top_n].tolist(), result.top_logprobs[k, :top_n].tolist())
        )
    return TokenLogprob(token_id=token, logprob=float(result.logprobs[k]), top=top)


def _progress_bar(total: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="generate", unit="req", disable=not enabled)
