"""What rank 0 tells the other ranks of tensor parallelism, one message per model step.

Rank 0 (the engine process) owns the scheduler; each rank runs the same forward over its share of
the model, so each needs the step's plan and nothing else of the engine's state. A message is two
broadcasts over the control group: a fixed-size int64 header (the kind, whether rank 0 samples,
the number of prompt-scoring spans, the length of each plan buffer), then one int32 payload (the
plan buffers, flat and in `PLAN_BUFFERS` order, then the spans). Every rank thus runs exactly the
collectives rank 0 runs, in the same order, and no rank can drift.
"""

from __future__ import annotations

from enum import IntEnum
from typing import NamedTuple

import torch

from omniserve.distributed import ParallelGroup
from omniserve.runner.step_plan import PLAN_BUFFERS, StepPlan, filled


class Kind(IntEnum):
    STEP = 1
    """Run the plan's forward and its logits."""
    SHUTDOWN = 2
    """Leave the worker loop."""


Span = tuple[int, int, int]
"""(plan index, first step token, tokens): prompt tokens whose logits are computed for prompt
logprobs (`ModelRunner._score_spans`)."""


class StepMessage(NamedTuple):
    plan: StepPlan
    spans: list[Span]
    samples: bool
    """Rank 0 samples this step and broadcasts the sampled tokens (for async placeholders)."""


_HEADER = 3 + len(PLAN_BUFFERS)


def send_step(group: ParallelGroup, plan: StepPlan, spans: list[Span], samples: bool) -> None:
    sizes = [plan[spec.name].numel() for spec in PLAN_BUFFERS]
    header = torch.tensor([Kind.STEP, samples, len(spans), *sizes], dtype=torch.int64)
    group.broadcast_control(header)
    parts = [plan[spec.name].flatten() for spec in PLAN_BUFFERS]
    parts.append(torch.tensor(spans, dtype=torch.int32).flatten())
    payload = torch.cat(parts)
    if payload.numel():
        group.broadcast_control(payload)


def send_shutdown(group: ParallelGroup) -> None:
    header = torch.zeros(_HEADER, dtype=torch.int64)
    header[0] = Kind.SHUTDOWN
    group.broadcast_control(header)


def receive(group: ParallelGroup) -> StepMessage | None:
    """The next message from rank 0: a step, or None for shutdown."""
    header = group.broadcast_control(torch.zeros(_HEADER, dtype=torch.int64)).tolist()
    kind, samples, num_spans, *sizes = header
    if kind == Kind.SHUTDOWN:
        return None
    payload = torch.empty(sum(sizes) + 3 * num_spans, dtype=torch.int32)
    if payload.numel():
        group.broadcast_control(payload)
    buffers, offset = {}, 0
    for spec, size in zip(PLAN_BUFFERS, sizes):
        count = (size - spec.extra) // spec.width
        buffers[spec.name] = filled(payload[offset : offset + size], count, spec.width, spec.extra)
        offset += size
    spans = [(i, start, count) for i, start, count in payload[offset:].view(-1, 3).tolist()]
    return StepMessage(StepPlan(buffers), spans, bool(samples))
