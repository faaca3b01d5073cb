"""The contract between the engine (which reads the scheduler's buffers) and the model runner.

A `StepPlan` holds, by name, every step buffer the scheduler's description (`STEP_BUFFERS`) marks
as read by the runner: CPU tensors, views into the scheduler's buffers sliced to this step's
counts, `(row, column, page)` triples shaped `[k, 3]`. They are valid until the next `schedule()`;
the runner copies what it keeps. What each buffer means is its `BufferSpec.doc`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

from omniserve._scheduler import (
    FLAG_NEEDS_LOGITS,
    FLAG_NEW_ROW,
    FLAG_PREFILL,
    FLAG_RESELECT,
    STEP_BUFFERS,
    BufferSpec,
)

__all__ = [
    "FLAG_NEEDS_LOGITS",
    "FLAG_NEW_ROW",
    "FLAG_PREFILL",
    "FLAG_RESELECT",
    "PLAN_BUFFERS",
    "StepPlan",
]

PLAN_BUFFERS: tuple[BufferSpec, ...] = tuple(
    spec for spec in STEP_BUFFERS if spec.phase == "schedule" and spec.reader == "runner"
)
"""The buffers a plan carries, in the scheduler's order."""
_PLAN_NAMES = frozenset(spec.name for spec in PLAN_BUFFERS)

_DTYPES = {"int32": torch.int32, "int64": torch.int64}


def buffer_dtype(spec: BufferSpec) -> torch.dtype:
    return _DTYPES[spec.dtype]


def filled(view: torch.Tensor, count: int, width: int, extra: int) -> torch.Tensor:
    """The part of a buffer's flat view that holds `count` items of `width` elements (plus
    `extra`, as `BufferSpec` describes it), items of several elements as rows."""
    part = view[: count * width + extra]
    return part.view(-1, width) if width > 1 else part


class StepPlan(Mapping[str, torch.Tensor]):
    """One step's runner buffers by name; `plan.rows` is `plan["rows"]`."""

    __slots__ = ("_buffers",)

    def __init__(self, buffers: dict[str, torch.Tensor]) -> None:
        if buffers.keys() != _PLAN_NAMES:
            missing, unknown = _PLAN_NAMES - buffers.keys(), buffers.keys() - _PLAN_NAMES
            raise TypeError(f"StepPlan: missing {sorted(missing)}, unknown {sorted(unknown)}")
        self._buffers = buffers

    @classmethod
    def of(cls, **given: torch.Tensor) -> StepPlan:
        """A plan from hand-made tensors (tests, memory profiling). A buffer not given is zeros
        of the length its count implies, the counts read off the given buffers (0 if none
        tells)."""
        specs = {spec.name: spec for spec in PLAN_BUFFERS}
        if unknown := given.keys() - specs.keys():
            raise TypeError(f"StepPlan: unknown buffers {sorted(unknown)}")
        counts: dict[str, int] = {}
        for name, tensor in given.items():
            spec = specs[name]
            rows = tensor.shape[0] if spec.width > 1 else tensor.numel() - spec.extra
            counts.setdefault(spec.count, rows)
            if counts[spec.count] != rows:
                raise ValueError(
                    f"StepPlan: {name} has {rows} items, another buffer {counts[spec.count]}"
                )
        buffers: dict[str, torch.Tensor] = {}
        for spec in PLAN_BUFFERS:
            if spec.name in given:
                buffers[spec.name] = given[spec.name]
                continue
            count = counts.get(spec.count, 0)
            zeros = torch.zeros(count * spec.width + spec.extra, dtype=buffer_dtype(spec))
            buffers[spec.name] = filled(zeros, count, spec.width, spec.extra)
        return cls(buffers)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._buffers[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._buffers)

    def __len__(self) -> int:
        return len(self._buffers)

    def __getattr__(self, name: str) -> torch.Tensor:
        if name.startswith("_"):  # `_buffers` itself, before __init__ (copy, pickle)
            raise AttributeError(name)
        try:
            return self._buffers[name]
        except KeyError:
            raise AttributeError(f"StepPlan has no buffer {name!r}") from None

    @property
    def num_reqs(self) -> int:
        return int(self._buffers["rows"].shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self._buffers["input_ids"].shape[0])
