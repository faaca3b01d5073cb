"""Typed views of the Rust scheduler's step buffers, made once, read after every call.

The scheduler writes each step into `bytearray`s it owns and describes them (`STEP_BUFFERS`:
name, dtype, when written, who reads, which count sizes them); `torch.frombuffer` gives
zero-copy tensors over them, so a step crosses the boundary with no per-request Python objects
until the engine turns the few sampled tokens into outputs.
"""

from __future__ import annotations

import torch

from omniserve import _scheduler
from omniserve.runner.step_plan import PLAN_BUFFERS, StepPlan, buffer_dtype, filled


class StepIO:
    """Owns a `Scheduler` and the tensor views of its buffers."""

    def __init__(self, scheduler: _scheduler.Scheduler) -> None:
        self.scheduler = scheduler
        buffers = scheduler.buffers()
        self._views: dict[str, torch.Tensor] = {
            spec.name: torch.frombuffer(buffers[spec.name], dtype=buffer_dtype(spec))
            for spec in _scheduler.STEP_BUFFERS
        }
        self._specs = {spec.name: spec for spec in _scheduler.STEP_BUFFERS}
        # Read per step: (name, view, count field, width, extra), so that a step reads no spec.
        self._plan_parts = [
            (spec.name, self._views[spec.name], spec.count, spec.width, spec.extra)
            for spec in PLAN_BUFFERS
        ]

    def _filled(self, name: str, count: int) -> torch.Tensor:
        spec = self._specs[name]
        return filled(self._views[name], count, spec.width, spec.extra)

    def schedule(self) -> tuple[_scheduler.StepCounts, StepPlan | None]:
        counts = self.scheduler.schedule()
        if counts.num_reqs == 0:
            return counts, None
        plan: dict[str, torch.Tensor] = {}
        for name, view, count, width, extra in self._plan_parts:
            plan[name] = filled(view, getattr(counts, count), width, extra)
        return counts, StepPlan(plan)

    def req_ids(self, counts: _scheduler.StepCounts) -> list[int]:
        return self._filled("req_ids", counts.num_reqs).tolist()

    def aborted(self, counts: _scheduler.StepCounts) -> list[int]:
        return self._filled("aborted_ids", counts.num_aborted).tolist()

    def update(
        self, sampled_idx: torch.Tensor, token_ids: torch.Tensor
    ) -> tuple[list[int], list[int], list[int], list[int]]:
        """Hand the sampled tokens to the scheduler; returns (req_ids, tokens, schedule indices,
        finish codes), one entry per token the scheduler appended."""
        self._views["sampled"][sampled_idx] = token_ids
        n = self.scheduler.update()
        return (
            self._filled("out_req_ids", n).tolist(),
            self._filled("out_tokens", n).tolist(),
            self._filled("out_sched_idx", n).tolist(),
            self._filled("out_finish", n).tolist(),
        )
