"""The quantized linear layer (W4A8 per-channel, W4A8 g128, W8A8) on the reference path.

y = quantized_linear(quantize_per_token(x), Ŵ) (+ b), returned in x's dtype: the input is quantized
per token to int8 once, and each stored weight runs the exact reference GEMM of quant/gemm.py.

Fused projections (q/k/v, gate/up) keep one stored weight per shard instead of concatenating the
formats along N: a shard's tensors stay exactly the checkpoint's (so the loader only validates
and places them), g128's permuted group-scale columns and W4A8's N-multiple-of-32 tiles need no
re-layout, and the activation is still quantized once for all shards, which is what fusing buys
on this path. A CUDA path converts to its own fused layout at load time (DESIGN.md §5).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from omniserve.layers.linear import TensorSlot, checked_shard_names, fused_slots, shard_prefixes
from omniserve.quant.activation import quantize_per_token
from omniserve.quant.gemm import quantized_linear
from omniserve.quant.weight import QuantizedWeight


class QuantizedLinear(nn.Module):
    """Drop-in for `Linear` whose weight is one stored format per output slice (`fmt`).

    Biases stay in the model dtype, under the same fused slots as `Linear`'s. The stored weights
    are filled by `set_weight` from `quantized_slots`: checkpoint linear name → slice index.
    """

    def __init__(
        self,
        in_features: int,
        out_sizes: Sequence[int],
        fmt: type[QuantizedWeight],
        bias: bool = False,
        shard_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.shard_names = checked_shard_names(out_sizes, shard_names)
        self.out_sizes = tuple(out_sizes) if shard_names is not None else (sum(out_sizes),)
        self.fmt = fmt
        for n in self.out_sizes:
            fmt.check_shape(n, in_features)  # ValueError naming the format's tile constraints
        self.weights: list[QuantizedWeight | None] = [None] * len(self.out_sizes)
        self.bias = (
            nn.Parameter(torch.empty(sum(out_sizes)), requires_grad=False) if bias else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq = quantize_per_token(x)
        y = torch.cat([quantized_linear(xq, self._weight(i)) for i in range(len(self.weights))], -1)
        y = y.to(x.dtype)
        return y if self.bias is None else y + self.bias

    def checkpoint_slots(self, prefix: str) -> dict[str, TensorSlot]:
        """The fp tensors this layer reads (biases), as `Linear.checkpoint_slots`."""
        return fused_slots(prefix, self.shard_names, self.out_sizes, {"bias": self.bias})

    def quantized_slots(self, prefix: str) -> dict[str, int]:
        """Checkpoint quantized-linear names this layer reads → output slice index."""
        return {name: i for i, name in enumerate(shard_prefixes(prefix, self.shard_names))}

    def set_weight(self, index: int, weight: QuantizedWeight, device: torch.device) -> None:
        """Place slice `index`'s stored weight on `device`; ValueError if format or shape differ."""
        expected = (self.out_sizes[index], self.in_features)
        if not isinstance(weight, self.fmt) or weight.shape != expected:
            raise ValueError(
                f"expected {self.fmt.__name__} of shape {list(expected)}, got "
                f"{type(weight).__name__} of shape {list(weight.shape)}"
            )
        moved = {name: t.to(device) for name, t in weight.tensors().items()}
        self.weights[index] = type(weight)(**moved)

    @property
    def quantized_nbytes(self) -> int:
        """Bytes of the stored weights (not parameters, so not in `parameters()`)."""
        return sum(t.nbytes for w in self.weights if w is not None for t in w.tensors().values())

    def _weight(self, index: int) -> QuantizedWeight:
        weight = self.weights[index]
        if weight is None:
            raise RuntimeError("QuantizedLinear used before its weights were loaded")
        return weight
