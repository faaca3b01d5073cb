"""The FP8 linear layer (the `fp8` precision): e4m3 weights per channel, e4m3 activations per token.

y = s_a · s_w · (x_q · W_qᵀ) (+ b) in x's dtype (formats/fp8.py). The input is quantized here, per
token, with torch ops; the GEMM is cuBLAS's FP8 `torch._scaled_mm` with its row-wise scales on a
GPU with FP8 tensor cores (the `kernel` choice, kernels/dispatch.py), else the float64 reference.
This is the configuration vLLM and TensorRT-LLM serve on Hopper, so the engine can measure its
integer precisions against it in the same run.

Fused projections (q/k/v, gate/up) hold one weight: each shard's rows are copied into their slice
by `set_weight`, so forward is one GEMM. The loader fills the layer as it fills `QuantizedLinear`
(`quantized_slots`, `set_weight`); the weights are not parameters, so a float `.to(dtype)` of the
model cannot cast the codes.

Under tensor parallelism (`split`) a column-parallel layer holds its rows of each slice; a
row-parallel one its input columns, quantizing its part of each row under the whole row's scale
(`quantize_per_token_fp8_across`) and summing the ranks' outputs: on the reference path their
exact float64 sums, so the result is one rank's bit for bit; with cuBLAS their outputs in the
model dtype, as vLLM sums them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from omniserve.formats.fp8 import (
    FP8_DTYPE,
    Fp8Activation,
    accumulate_fp8,
    epilogue_fp8,
    quantize_per_token_fp8,
    quantize_per_token_fp8_across,
)
from omniserve.formats.weight import Fp8Weight
from omniserve.layers.linear import (
    ParallelSplit,
    TensorSlot,
    checked_shard_names,
    fused_slots,
    shard_prefixes,
)

_SCALED_MM_ROWS = 16
"""cuBLAS's FP8 GEMM takes M in multiples of 16: shorter inputs are padded with zero rows."""


class Fp8Linear(nn.Module):
    """Drop-in for `Linear` whose weight is e4m3 codes [sum(out_sizes), in_features] with an fp32
    scale per output channel. Biases stay in the model dtype, under `Linear`'s fused slots.
    `kernel`: run cuBLAS's FP8 GEMM (else the reference); `split`: this rank's part under tensor
    parallelism (the sizes are the part's)."""

    def __init__(
        self,
        in_features: int,
        out_sizes: Sequence[int],
        bias: bool = False,
        shard_names: Sequence[str] | None = None,
        *,
        kernel: bool,
        split: ParallelSplit | None = None,
    ) -> None:
        super().__init__()
        self.split = split
        self.uses_kernels = kernel
        self.in_features = in_features
        self.shard_names = checked_shard_names(out_sizes, shard_names)
        self.out_sizes = tuple(out_sizes) if shard_names is not None else (sum(out_sizes),)
        for n in self.out_sizes:
            Fp8Weight.check_shape(n, in_features)  # ValueError naming the multiples of 16
        self.bias = nn.Parameter(torch.empty(sum(out_sizes)), requires_grad=False) if bias else None
        self.weight: torch.Tensor | None = None
        """e4m3 [N, K] once the first shard is placed (on that shard's device)."""
        self.weight_scale: torch.Tensor | None = None
        """fp32 [N]."""
        self._loaded = [False] * len(self.out_sizes)
        self._ready = False
        """Every slice is placed: checked once per load, not on each forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y [T, N] in x's dtype of float activations x [T, K]."""
        if not self._ready:
            raise RuntimeError("Fp8Linear used before its weights were loaded")
        assert self.weight is not None and self.weight_scale is not None
        group = self.split.group if self.split is not None and self.split.row_parallel else None
        if group is None:
            xq = quantize_per_token_fp8(x)
        else:
            xq = quantize_per_token_fp8_across(x, group.all_reduce_max)
        if self.uses_kernels:
            y = _scaled_mm(xq, self.weight, self.weight_scale).to(x.dtype)
            if group is not None:
                y = group.all_reduce_sum(y)
        else:
            acc = accumulate_fp8(xq, self.weight)
            if group is not None:
                acc = group.all_reduce_sum(acc)
            y = epilogue_fp8(acc, xq.scales, self.weight_scale).to(x.dtype)
        # A row-parallel bias is whole on every rank: added once, after the sum.
        return y if self.bias is None else y + self.bias

    def checkpoint_slots(self, prefix: str) -> dict[str, TensorSlot]:
        """The fp tensors this layer reads (biases), as `Linear.checkpoint_slots`."""
        return fused_slots(
            prefix, self.shard_names, self.out_sizes, {"bias": self.bias}, self.split
        )

    def quantized_slots(self, prefix: str) -> dict[str, int]:
        """Checkpoint quantized-linear names this layer reads → output slice index."""
        return {name: i for i, name in enumerate(shard_prefixes(prefix, self.shard_names))}

    def checkpoint_shape(self, index: int) -> tuple[int, int]:
        """(N, K) of slice `index`'s weight in the checkpoint (under tensor parallelism the
        whole, of which this rank holds its part)."""
        n, k = self.out_sizes[index], self.in_features
        return (n, k) if self.split is None else self.split.checkpoint_shape(index, n, k)

    def set_weight(self, index: int, weight: Fp8Weight, device: torch.device) -> None:
        """Copy slice `index`'s codes and scales (the checkpoint's; this rank's part of them
        under tensor parallelism) into the layer on `device`; ValueError if the format or shape
        differ."""
        expected = self.checkpoint_shape(index)
        if not isinstance(weight, Fp8Weight) or weight.shape != expected:
            raise ValueError(
                f"expected Fp8Weight of shape {list(expected)}, got "
                f"{type(weight).__name__} of shape {list(weight.shape)}"
            )
        if self.split is not None:
            weight = self.split.narrow(index, weight)
        if self.weight is None or self.weight_scale is None:
            n = sum(self.out_sizes)
            self.weight = torch.empty(n, self.in_features, dtype=FP8_DTYPE, device=device)
            self.weight_scale = torch.empty(n, dtype=torch.float32, device=device)
        start = sum(self.out_sizes[:index])
        rows = slice(start, start + self.out_sizes[index])
        self.weight[rows].copy_(weight.weight)
        self.weight_scale[rows].copy_(weight.weight_scale)
        self._loaded[index] = True
        self._ready = all(self._loaded)

    @property
    def quantized_nbytes(self) -> int:
        """Bytes of the stored weights (not parameters, so not in `parameters()`)."""
        placed = (t for t in (self.weight, self.weight_scale) if t is not None)
        return sum(t.nbytes for t in placed)


def _scaled_mm(xq: Fp8Activation, weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """cuBLAS's FP8 GEMM with row-wise scales: bf16 [M, N] (its one output dtype with row-wise
    scales)."""
    q, scales = xq
    m = q.shape[0]
    pad = -m % _SCALED_MM_ROWS
    if pad:  # zero rows (e4m3 zeros under scale 1) contribute nothing and are sliced off
        q = F.pad(q.view(torch.uint8), (0, 0, 0, pad)).view(FP8_DTYPE)
        scales = F.pad(scales, (0, pad), value=1.0)
    y = torch._scaled_mm(
        q,
        weight.t(),
        scale_a=scales.unsqueeze(1),
        scale_b=weight_scale.unsqueeze(0),
        out_dtype=torch.bfloat16,
    )
    return y[:m]
