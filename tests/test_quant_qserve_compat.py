"""Golden compatibility with QServe's `W4A8OF16LinearDynamicInputScale.from_linear`.

`_qserve_from_linear` restates, step by step, how QServe's converter turns a fake-quantized weight
and its scales/zeros into the zoo's tensors (docs/formats.md#w4-packing,
docs/formats.md#qserve-zoo-checkpoints): int8 division/rounding, the
(N/32, 2, 2, 8, K/32, 2, 4, 4) reshape with its two permutes, int8 `(hi << 4) + lo` packing, and the
(4, 8) → (8, 4) transpose of the g128 scale/zero columns. Our quantizers must produce the same
bytes, and `linear_from_qserve` must load them.
"""

from __future__ import annotations

import pytest
import torch

from omniserve.errors import CheckpointError
from omniserve.formats.checkpoint import linear_from_qserve
from omniserve.formats.packing import unpack_w4, unpermute_group_columns
from omniserve.formats.precision import parse
from omniserve.formats.weight import quantize_w4a8_g128, quantize_w4a8_per_channel


def _qserve_pack(q: torch.Tensor) -> torch.Tensor:
    n, k = q.shape
    t = q.reshape(n // 32, 2, 2, 8, k // 32, 2, 4, 4).permute(0, 4, 3, 6, 1, 5, 2, 7).contiguous()
    t = t.permute(0, 1, 2, 3, 5, 6, 7, 4).contiguous().to(torch.int8)
    return ((t[..., 1] << 4) + t[..., 0]).reshape(n // 32, k // 32, 32, 16).reshape(n, k // 2)


def _qserve_group_perm(t: torch.Tensor, n: int, g: int) -> torch.Tensor:
    t = t.reshape(n, g).transpose(0, 1).contiguous().reshape(g, n // 32, 32)
    return t.reshape(g, n // 32, 4, 8).transpose(-2, -1).contiguous().reshape(g, n)


def _qserve_from_linear(
    w_fq: torch.Tensor, s1: torch.Tensor, zeros: torch.Tensor, s2: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    n, k = w_fq.shape
    w = w_fq.clone().div_(s1.float().reshape(n, 1)).round_()
    if s2 is None:
        q = w.to(torch.int8).add_(zeros.reshape(n, 1).to(torch.int8))
        assert q.min() >= 0 and q.max() <= 15
        return {
            "qweight": _qserve_pack(q),
            "s1_scales": s1,
            "s1_szeros": zeros.half() * s1,
        }
    g = k // 128
    w = w.reshape(n, g, 128).div_(s2.reshape(n, g, 1).half()).add_(zeros.reshape(n, g, 1).half())
    assert w.min() >= 0 and w.max() <= 15
    s2p = _qserve_group_perm(s2, n, g)
    return {
        "qweight": _qserve_pack(w.reshape(n, k)),
        "s1_scales": s1,
        "s2_scales": s2p.to(torch.int8),
        "s2_zeros": (_qserve_group_perm(-zeros.int(), n, g) * s2p.int()).to(torch.int8),
    }


@pytest.mark.parametrize(("n", "k"), [(32, 128), (96, 256)])
def test_per_channel_bytes_match_qserve(n: int, k: int) -> None:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(n + k))
    ours = quantize_w4a8_per_channel(w)
    s1 = ours.s1_scales
    zeros = torch.round(ours.s1_szeros.float() / s1.float())  # z = s1_szeros / s1
    zoo = _qserve_from_linear(ours.dequantize(), s1, zeros, None)
    assert torch.equal(zoo["qweight"].view(torch.uint8), ours.qweight)
    assert torch.equal(zoo["s1_szeros"], ours.s1_szeros)
    loaded = linear_from_qserve(zoo, parse("w4a8kv4"))
    assert torch.equal(loaded.dequantize(), ours.dequantize())


@pytest.mark.parametrize(("n", "k"), [(32, 128), (96, 384)])
def test_g128_bytes_match_qserve(n: int, k: int) -> None:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(3 * n + k))
    ours = quantize_w4a8_g128(w)
    s2 = unpermute_group_columns(ours.s2_scales).t().int()  # [N, G], natural order
    zeros = -unpermute_group_columns(ours.s2_zeros).t().int() // s2
    zoo = _qserve_from_linear(ours.dequantize(), ours.s1_scales, zeros, s2)
    for name, t in ours.tensors().items():
        assert torch.equal(zoo[name].view(t.dtype), t), name
    loaded = linear_from_qserve(zoo, parse("w4a8kv4", 128))
    assert torch.equal(unpack_w4(loaded.qweight), unpack_w4(ours.qweight))
    assert torch.equal(loaded.dequantize(), ours.dequantize())


def test_linear_from_qserve_errors() -> None:
    zoo = {"qweight": torch.zeros(32, 16, dtype=torch.int8), "s1_scales": torch.ones(32).half()}
    with pytest.raises(CheckpointError, match="s1_szeros is missing"):
        linear_from_qserve(zoo, parse("w4a8"))
    w8 = {"weight": torch.zeros(4, 4, dtype=torch.int8), "dequant_scale": torch.ones(4)}
    with pytest.raises(CheckpointError, match="dequant_scale: expected torch.float16"):
        linear_from_qserve(w8, parse("w8a8"))
