"""Calibration of per-tensor static KV8 scales (LServe's default KV mode, formats/kv.py).

Each layer gets `kv_scale_quant_orig` = [k_absmax / 127, v_absmax / 127], where the maxima are of
|post-RoPE key| and |value| over every token, KV head and channel the model produced on the
calibration windows: keys after RoPE because that is what the cache stores. Two sources:

- `calibrate_kv_absmax` runs an HF causal LM (the model as the quantizer holds it, e.g. with QoQ's
  rotation and smoothing folded in) over token windows and reads the maxima from its KV cache;
- DeepCompressor's `acts.pt` already holds them (quantize/convert_deepcompressor.py reads it).

Either way `static_kv_scales` (formats/kv.py) turns the [num_layers, 2] maxima into the scales that
`write_checkpoint(..., kv_scales=...)` stores.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import DynamicCache


@torch.no_grad()
def calibrate_kv_absmax(
    model: PreTrainedModel, windows: Iterable[Sequence[int] | torch.Tensor]
) -> torch.Tensor:
    """fp32 [num_layers, 2 (K, V)]: max |post-RoPE key| and max |value| of each layer over the
    token windows (each run as one sequence from position 0)."""
    num_layers = model.config.num_hidden_layers
    device = next(model.parameters()).device
    absmax = torch.zeros(num_layers, 2)
    seen = 0
    for window in windows:
        ids = torch.as_tensor(window, dtype=torch.long, device=device).reshape(1, -1)
        if ids.shape[1] == 0:
            raise ValueError("calibration windows must hold at least one token")
        # A cache built without the config keeps every position of every layer (one built from
        # it would keep only the last `sliding_window` keys of sliding-window layers).
        cache = DynamicCache()
        model(input_ids=ids, use_cache=True, **{_cache_argument(model): cache})
        for layer in range(num_layers):
            for kv, t in enumerate(_layer_kv(cache, layer)):
                absmax[layer, kv] = torch.maximum(absmax[layer, kv], t.detach().abs().max().cpu())
        seen += 1
    if not seen:
        raise ValueError("calibration needs at least one token window")
    return absmax


def _cache_argument(model: PreTrainedModel) -> str:
    """The forward argument that takes a KV cache: `cache` in recent transformers 5, which
    deprecates `past_key_values`, the only one in 4.x."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _layer_kv(cache: DynamicCache, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys, values) [batch, kv_heads, tokens, head_dim] of one layer; transformers 5 keeps them
    in `cache.layers`, 4.x indexes the cache."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return layers[layer].keys, layers[layer].values
    keys, values = cache[layer]
    return keys, values
