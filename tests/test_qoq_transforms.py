"""QoQ's exact transforms keep the fp model's function, and its searches beat RTN where promised.

Each transform is checked on tiny random HF checkpoints (tests/tiny_models.py) in fp32 against
the untransformed model: rotation + norm folding on the whole model's logits (llama3 GQA, qwen2
with q/k/v biases, tied embeddings and a sliding window, and a hidden size of 96 = 32 · 3 that takes
the Hadamard ⊗ orthogonal path), SmoothAttention and smoothing on a decoder layer's output. The
bounds are float error (measured ≤ 2e-6 relative); a transform that is wrong in any channel moves
the outputs by O(1). Clipping and GPTQ are checked against RTN on the same grid.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from omniserve.formats.precision import parse
from omniserve.formats.weight import W4A8PerGroupWeight, quantize_weight, weight_grid
from omniserve.quantize.qoq.clip import (
    channel_errors,
    clip_grid,
    runtime_input,
    search_clip,
)
from omniserve.quantize.qoq.gptq import gptq_codes
from omniserve.quantize.qoq.model import (
    DOWN_INPUT,
    EMBED,
    FINAL_NORM,
    KEYS,
    LM_HEAD,
    O_INPUT,
    SourceModel,
    layer_forward,
    rope_tables,
)
from omniserve.quantize.qoq.reorder import fold_down_permutation, salience_order
from omniserve.quantize.qoq.rotation import (
    fold_norm,
    hadamard,
    random_rotation,
    rotate_layer,
)
from omniserve.quantize.qoq.smooth import (
    down_weight_absmax,
    fold_down,
    fold_out,
    fold_smooth_attention,
    out_weight_absmax,
    query_to_kv_max,
    smooth_attention_scale,
    smoothing_scale,
)
from tiny_models import hf_logits, save_checkpoint

CPU = torch.device("cpu")


def _ids(vocab: int, batch: int = 2, seq: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _logits(source: SourceModel, ids: torch.Tensor, rotation: torch.Tensor | None) -> torch.Tensor:
    """fp32 logits [batch, seq, vocab] of the functional model, rotated by `rotation` if given."""
    embed = source.tensor(EMBED).float()
    head = embed if source.tied else source.tensor(LM_HEAD).float()
    gain = source.tensor(FINAL_NORM).float()
    if rotation is not None:
        r = rotation.float()
        embed, head, gain = embed @ r, fold_norm(head, gain) @ r, torch.ones_like(gain)
    rope = rope_tables(source.config, ids.shape[1], CPU)
    x = F.embedding(ids, embed)
    for i in range(source.num_layers):
        layer = source.layer(i, CPU)
        if rotation is not None:
            rotate_layer(layer, rotation.float())
        x = layer_forward(source.geometry, i, layer, x, rope)
    return F.linear(F.rms_norm(x, (x.shape[-1],), gain, source.geometry.eps), head)


def test_rotations_are_orthogonal_and_seeded() -> None:
    h = hadamard(8)
    assert torch.equal(h @ h.t(), 8 * torch.eye(8, dtype=torch.float64))
    for n in (64, 96, 5120):
        r = random_rotation(n, seed=3)
        assert torch.allclose(r @ r.t(), torch.eye(n, dtype=torch.float64), atol=1e-10)
        assert torch.equal(r, random_rotation(n, seed=3))
        assert not torch.equal(r, random_rotation(n, seed=4))
    # power of two: every entry ±1/√n, the most even spreading of an outlier channel
    assert torch.allclose(
        random_rotation(64, 0).abs(), torch.full((64, 64), 1 / 8.0, dtype=torch.float64)
    )
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard(12)


@pytest.mark.parametrize(
    ("family", "overrides"),
    [
        ("llama3", {}),
        ("qwen2", {}),
        ("llama3", {"hidden_size": 96, "num_attention_heads": 6, "num_key_value_heads": 2}),
    ],
)
def test_rotation_with_folded_norms_preserves_logits(
    tmp_path: Path, family: str, overrides: dict[str, int]
) -> None:
    hf = save_checkpoint(family, tmp_path, **overrides)
    ids = _ids(384)
    with SourceModel(tmp_path) as source:
        plain = _logits(source, ids, None)
        rotated = _logits(source, ids, random_rotation(source.geometry.hidden, seed=7))
    reference = torch.stack([hf_logits(hf, row.tolist()) for row in ids])
    assert (plain - reference).norm() / reference.norm() < 2e-5  # the functional model is HF's
    assert (rotated - plain).norm() / plain.norm() < 2e-5


def _layer_run(
    source: SourceModel, layer: dict, x: torch.Tensor, rope: tuple
) -> tuple[torch.Tensor, dict]:
    seen: dict[str, torch.Tensor] = {}

    def observe(point: str, a: torch.Tensor) -> None:
        seen[point] = a.abs().amax(dim=0)

    return layer_forward(source.geometry, 0, layer, x, rope, observe), seen


@pytest.fixture
def llama_layer(tmp_path: Path) -> tuple[SourceModel, dict, torch.Tensor, tuple]:
    save_checkpoint("llama3", tmp_path)
    source = SourceModel(tmp_path)
    x = torch.randn(2, 24, source.geometry.hidden, generator=torch.Generator().manual_seed(1))
    yield source, source.layer(0, CPU), x, rope_tables(source.config, 24, CPU)
    source.close()


def test_smooth_attention_preserves_attention_and_flattens_keys(llama_layer: tuple) -> None:
    source, layer, x, rope = llama_layer
    g = source.geometry
    # plant a key outlier channel so that there is something to flatten
    layer["self_attn.k_proj.weight"][5] *= 20
    out, seen = _layer_run(source, layer, x, rope)
    lam = smooth_attention_scale(seen[KEYS], 0.5, g)
    half = g.head_dim // 2
    pairs = lam.view(g.num_kv_heads, g.head_dim)
    assert torch.equal(pairs[:, :half], pairs[:, half:])  # shared by RoPE pairs
    smoothed = {k: v.clone() for k, v in layer.items()}
    fold_smooth_attention(smoothed, lam, g)
    out2, seen2 = _layer_run(source, smoothed, x, rope)
    assert (out2 - out).norm() / out.norm() < 1e-5  # q · k unchanged

    def spread(k: torch.Tensor) -> float:
        return float(k.max() / k.mean())

    assert spread(seen2[KEYS]) < 0.5 * spread(seen[KEYS])
    # a λ not shared by the pair does not commute with RoPE: the same check catches it
    broken = {k: v.clone() for k, v in layer.items()}
    fold_smooth_attention(broken, lam * torch.linspace(0.5, 2, lam.numel()), g)
    out3, _ = _layer_run(source, broken, x, rope)
    assert (out3 - out).norm() / out.norm() > 1e-3


def test_smoothing_preserves_the_layer_and_moves_maxima(llama_layer: tuple) -> None:
    source, layer, x, rope = llama_layer
    g = source.geometry
    out, seen = _layer_run(source, layer, x, rope)
    s_down = smoothing_scale(seen[DOWN_INPUT], down_weight_absmax(layer), 0.5)
    s_out = smoothing_scale(query_to_kv_max(seen[O_INPUT], g), out_weight_absmax(layer, g), 0.5)
    fold_down(layer, s_down)
    fold_out(layer, s_out, g)
    out2, seen2 = _layer_run(source, layer, x, rope)
    assert (out2 - out).norm() / out.norm() < 1e-5
    assert torch.allclose(seen2[DOWN_INPUT], seen[DOWN_INPUT] / s_down, rtol=1e-4)
    # permuting down_proj inputs, folded into gate/up, also keeps the layer
    order = salience_order(seen2[DOWN_INPUT])
    fold_down_permutation(layer, order)
    out3, seen3 = _layer_run(source, layer, x, rope)
    assert (out3 - out).norm() / out.norm() < 1e-5
    assert torch.all(seen3[DOWN_INPUT][:-1] >= seen3[DOWN_INPUT][1:])


def _correlated_inputs(tokens: int, k: int, seed: int) -> torch.Tensor:
    """Inputs with a few large channels and correlated columns, like a real layer's."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, k // 4, generator=g) @ torch.randn(k // 4, k, generator=g) / 4
    x[:, :: k // 8] *= 8
    return x


@pytest.mark.parametrize(("precision", "group_size"), [("w4a8", -1), ("w4a8", 128), ("w8a8", -1)])
def test_clipping_search_beats_rtn_per_channel(precision: str, group_size: int) -> None:
    p = parse(precision, group_size)
    g = torch.Generator().manual_seed(2)
    w = torch.randn(64, 256, generator=g)
    w[:, 3] *= 6  # a heavy-tailed column: clipping has something to win
    x = _correlated_inputs(512, 256, 3)
    x_hat = runtime_input(x, p)
    clip = search_clip(w, x, x_hat, p, clip_grid(0.5, 11))
    rtn = channel_errors(x, x_hat, w, weight_grid(w, p).fake_quantize(w))
    clipped = channel_errors(x, x_hat, w, weight_grid(w, p, clip).fake_quantize(w))
    assert torch.all(clipped <= rtn * (1 + 1e-6))  # ratio 1 is on the grid
    if p.weight_bits == 4:
        assert clipped.sum() < 0.9 * rtn.sum() and (clip < 1).any()
    with pytest.raises(ValueError, match="one ratio in \\(0, 1\\] per output channel"):
        quantize_weight(w, p, torch.full((64,), 1.5))


@pytest.mark.parametrize(("precision", "group_size"), [("w4a8", -1), ("w4a8", 128), ("w8a8", -1)])
def test_gptq_lowers_output_error_on_the_same_grid(precision: str, group_size: int) -> None:
    p = parse(precision, group_size)
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(4))
    x = _correlated_inputs(1024, 256, 5)
    grid = weight_grid(w, p)
    codes = gptq_codes(w, x.t() @ x, grid)
    stored = grid.pack(codes)
    assert type(stored) is type(quantize_weight(w, p))
    w_gptq = stored.dequantize()
    assert torch.allclose(w_gptq, grid.dequantize(codes, 0))
    if isinstance(stored, W4A8PerGroupWeight):  # GPTQ keeps RTN's scales: same stored grid
        rtn = quantize_weight(w, p)
        assert torch.equal(stored.s2_scales, rtn.s2_scales) and torch.equal(
            stored.s1_scales, rtn.s1_scales
        )
    rtn_error = float((x @ (w - grid.fake_quantize(w)).t()).norm())
    gptq_error = float((x @ (w - w_gptq).t()).norm())
    assert gptq_error < 0.8 * rtn_error, (gptq_error, rtn_error)
