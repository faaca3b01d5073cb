"""The quantized linear layer (W4A8 per-channel, W4A8 g128, W8A8): reference path and CUDA kernels.

y = quantized_linear(quantize_per_token(x), Ŵ) (+ b), returned in x's dtype: the input is quantized
per token to int8 once (the quantizer the layer is built with: kernels/fused.py's CUDA kernel or
its reference, equal to it), and each stored weight runs the exact reference GEMM of
formats/gemm.py. A layer built for the CUDA GEMM (`kernel`, as kernels/dispatch.py chose for its
N and K and the device) instead repacks each shard in `set_weight` into the kernels' layout
(kernels/gemm.py) and, once all are loaded, concatenates them along N, so that forward is one
kernel launch with the same result (rounded once to x's dtype).

The layer also reads activations already quantized (`QuantizedActivation`): the model's RMSNorm and
SiLU·mul emit them in one fused kernel each (kernels/fused.py), so the separate quantizer pass over
a written-out float activation disappears. Such an input carries no float dtype; y is then in the
layer's (`dtype`, the model's) or the one `forward_quantized` is given.

Fused projections (q/k/v, gate/up) keep one stored weight per shard instead of concatenating the
formats along N: a shard's tensors stay exactly the checkpoint's (so the loader only validates
and places them), g128's permuted group-scale columns and W4A8's N-multiple-of-32 tiles need no
re-layout, and the activation is still quantized once for all shards, which is what fusing buys
on this path. A CUDA path converts to its own fused layout at load time
(docs/formats.md#kernel-weight-layout).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from omniserve.distributed import ParallelGroup
from omniserve.formats.activation import QuantizedActivation
from omniserve.formats.gemm import accumulate, epilogue, quantized_linear
from omniserve.formats.weight import QuantizedWeight
from omniserve.kernels import gemm as gemm_kernels
from omniserve.kernels.packed_weight import PackedWeight
from omniserve.layers.linear import (
    ParallelSplit,
    TensorSlot,
    checked_shard_names,
    fused_slots,
    shard_prefixes,
)


class QuantizedLinear(nn.Module):
    """Drop-in for `Linear` whose weight is one stored format per output slice (`fmt`).

    Biases stay in the model dtype, under the same fused slots as `Linear`'s. The stored weights
    are filled by `set_weight` from `quantized_slots`: checkpoint linear name → slice index.
    `kernel`: run the CUDA GEMM (else the reference); `quantize`: the per-token quantizer of float
    inputs (`ActivationOps.quantize_per_token`). Both are the model's kernel choices. `split`: this
    rank's part under tensor parallelism (`Linear`'s); a row-parallel layer's `quantize` must give
    every rank the scale of the whole row (`quantize_per_token_across`).
    """

    _dtype_tracker: torch.Tensor

    def __init__(
        self,
        in_features: int,
        out_sizes: Sequence[int],
        fmt: type[QuantizedWeight],
        bias: bool = False,
        shard_names: Sequence[str] | None = None,
        *,
        kernel: bool,
        quantize: Callable[[torch.Tensor], QuantizedActivation],
        split: ParallelSplit | None = None,
    ) -> None:
        super().__init__()
        self.split = split
        self.uses_kernels = kernel
        """Whether the weights are placed for, and forward runs, the CUDA GEMM."""
        self.quantize = quantize
        self.in_features = in_features
        self.shard_names = checked_shard_names(out_sizes, shard_names)
        self.out_sizes = tuple(out_sizes) if shard_names is not None else (sum(out_sizes),)
        self.fmt = fmt
        # Follows the layer through .to() as a parameter would; see `dtype`.
        self.register_buffer("_dtype_tracker", torch.empty(0), persistent=False)
        for n in self.out_sizes:
            fmt.check_shape(n, in_features)  # ValueError naming the format's tile constraints
        self.weights: list[QuantizedWeight | None] = [None] * len(self.out_sizes)
        # CUDA path: shards in the kernels' layout until all are loaded, then their concatenation.
        self._packed_shards: list[PackedWeight | None] = [None] * len(self.out_sizes)
        self.packed: PackedWeight | None = None
        self.bias = nn.Parameter(torch.empty(sum(out_sizes)), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor | QuantizedActivation) -> torch.Tensor:
        """y [T, N] of float activations x [T, K] (quantized here; y in x's dtype), or of per-token
        int8 ones from a fused op (y in the model dtype, `self.dtype`)."""
        if isinstance(x, QuantizedActivation):
            return self.forward_quantized(x, self.dtype)
        return self._gemm(self.quantize(x), x.dtype)

    def forward_quantized(self, xq: QuantizedActivation, out_dtype: torch.dtype) -> torch.Tensor:
        """y [T, N] in `out_dtype` of per-token int8 activations (codes [T, K], fp16 scales and
        int32 code sums [T], as `quantize_per_token` returns); ValueError naming what is wrong."""
        q, scales, sums = xq
        if q.dtype != torch.int8 or q.dim() != 2 or q.shape[1] != self.in_features:
            raise ValueError(
                f"quantized activations must be int8 of shape [tokens, {self.in_features}], got "
                f"{q.dtype} of shape {list(q.shape)}"
            )
        tokens = q.shape[0]
        for name, t, dtype in (("scales", scales, torch.float16), ("sums", sums, torch.int32)):
            if t.dtype != dtype or t.shape != (tokens,):
                raise ValueError(
                    f"quantized activation {name} must be {dtype} of shape [{tokens}], got "
                    f"{t.dtype} of shape {list(t.shape)}"
                )
        if not out_dtype.is_floating_point:
            raise ValueError(f"out_dtype must be a float dtype, got {out_dtype}")
        return self._gemm(xq, out_dtype)

    @property
    def dtype(self) -> torch.dtype:
        """The model dtype: the default when built (as the loader builds), or the one given to
        `.to()`. Outputs of quantized inputs, which carry no float dtype, are in it."""
        return self._dtype_tracker.dtype

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

    def set_weight(self, index: int, weight: QuantizedWeight, device: torch.device) -> None:
        """Place slice `index`'s stored weight (the checkpoint's; this rank's part of it under
        tensor parallelism) on `device`; ValueError if format or shape differ."""
        expected = self.checkpoint_shape(index)
        if not isinstance(weight, self.fmt) or weight.shape != expected:
            raise ValueError(
                f"expected {self.fmt.__name__} of shape {list(expected)}, got "
                f"{type(weight).__name__} of shape {list(weight.shape)}"
            )
        if self.split is not None:
            weight = self.split.narrow(index, weight)
        moved = type(weight)(**{name: t.to(device) for name, t in weight.tensors().items()})
        if not self.uses_kernels:
            self.weights[index] = moved
            return
        self._packed_shards[index] = gemm_kernels.pack(moved)
        if all(p is not None for p in self._packed_shards):
            self.packed = gemm_kernels.concat(self._packed_shards)  # type: ignore[arg-type]
            self._packed_shards = [None] * len(self.out_sizes)

    @property
    def quantized_nbytes(self) -> int:
        """Bytes of the stored weights (not parameters, so not in `parameters()`)."""
        placed = [w for w in (*self.weights, *self._packed_shards, self.packed) if w is not None]
        return sum(t.nbytes for w in placed for t in w.tensors().values())

    def _gemm(self, xq: QuantizedActivation, out_dtype: torch.dtype) -> torch.Tensor:
        row_parallel = self.split is not None and self.split.row_parallel
        if self.uses_kernels:
            if self.packed is None:
                raise RuntimeError("QuantizedLinear used before its weights were loaded")
            y = gemm_kernels.quantized_gemm(xq, self.packed, out_dtype)
            if row_parallel:  # the ranks' epilogues are linear in their K parts: their sum
                y = self._group.all_reduce_sum(y)
        elif row_parallel:
            y = self._row_parallel_reference(xq).to(out_dtype)
        else:
            y = torch.cat(
                [quantized_linear(xq, self._weight(i)) for i in range(len(self.weights))], -1
            ).to(out_dtype)
        # A row-parallel bias is whole on every rank: added once, after the sum.
        return y if self.bias is None else y + self.bias

    @property
    def _group(self) -> ParallelGroup:
        assert self.split is not None
        return self.split.group

    def _row_parallel_reference(self, xq: QuantizedActivation) -> torch.Tensor:
        """The reference GEMM of this rank's K part, exactly the whole's: the integer cores and
        the activations' code sums are summed over the ranks (exact, in one all-reduce), then
        the one float epilogue runs on the sums, as for one rank (a row-parallel layer has one
        output slice)."""
        weight = self._weight(0)
        acc = torch.cat([accumulate(xq, weight), xq.sums.to(torch.int64).unsqueeze(1)], 1)
        acc = self._group.all_reduce_sum(acc)
        return epilogue(acc[:, :-1], xq._replace(sums=acc[:, -1]), weight)

    def _weight(self, index: int) -> QuantizedWeight:
        weight = self.weights[index]
        if weight is None:
            raise RuntimeError("QuantizedLinear used before its weights were loaded")
        return weight
