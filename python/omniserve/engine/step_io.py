"""Typed views of the Rust scheduler's step buffers, made once, read after every call.

The scheduler writes each step into `bytearray`s it owns; `torch.frombuffer` gives zero-copy int32
and int64 tensors over them, so a step crosses the boundary with no per-request Python objects
until the engine turns the few sampled tokens into outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from omniserve import _scheduler
from omniserve.runner.step_plan import StepPlan

_INT64_BUFFERS = frozenset({"req_ids", "aborted_ids", "preempted_ids", "out_req_ids"})


@dataclass(frozen=True, slots=True)
class StepCounts:
    num_reqs: int
    num_tokens: int
    num_page_updates: int
    num_stream_updates: int
    num_aborted: int
    num_preempted: int


class StepIO:
    """Owns a `Scheduler` and the tensor views of its buffers."""

    def __init__(self, scheduler: _scheduler.Scheduler) -> None:
        self.scheduler = scheduler
        self._views: dict[str, torch.Tensor] = {
            name: torch.frombuffer(
                buf, dtype=torch.int64 if name in _INT64_BUFFERS else torch.int32
            )
            for name, buf in scheduler.buffers().items()
        }

    def schedule(self) -> tuple[StepCounts, StepPlan | None]:
        counts = StepCounts(*self.scheduler.schedule())
        if counts.num_reqs == 0:
            return counts, None
        v, n = self._views, counts.num_reqs
        plan = StepPlan(
            rows=v["rows"][:n],
            pos0=v["pos0"][:n],
            num_new=v["num_new"][:n],
            qstart=v["qstart"][: n + 1],
            flags=v["flags"][:n],
            input_ids=v["input_ids"][: counts.num_tokens],
            page_updates=v["page_updates"][: 3 * counts.num_page_updates].view(-1, 3),
        )
        return counts, plan

    def req_ids(self, n: int) -> list[int]:
        return self._views["req_ids"][:n].tolist()

    def aborted(self, counts: StepCounts) -> list[int]:
        return self._views["aborted_ids"][: counts.num_aborted].tolist()

    def update(
        self, sampled_idx: torch.Tensor, token_ids: torch.Tensor
    ) -> tuple[list[int], list[int], list[int], list[int]]:
        """Hand the sampled tokens to the scheduler; returns (req_ids, tokens, schedule indices,
        finish codes), one entry per token the scheduler appended."""
        self._views["sampled"][sampled_idx] = token_ids
        n = self.scheduler.update()
        v = self._views
        return (
            v["out_req_ids"][:n].tolist(),
            v["out_tokens"][:n].tolist(),
            v["out_sched_idx"][:n].tolist(),
            v["out_finish"][:n].tolist(),
        )
