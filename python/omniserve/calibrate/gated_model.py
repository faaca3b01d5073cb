"""The training code's plain-torch Llama with DuoAttention's gated attention.

Each KV head of each layer mixes two attentions of the same queries, keys and values by a gate α:
α · full causal attention + (1 − α) · streaming attention, where a streaming head sees only what
`StreamWindow.visible` allows (sink pages, local pages, its own page). α = 1 everywhere is the
model itself; α in {0, 1} is a head pattern as serving runs it (streaming heads on the Λ mask,
the others dense); learned α is how calibration ranks heads. The query heads of a GQA group share
their KV head's gate, as they share its cache.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from omniserve.formats.streaming import StreamWindow
from omniserve.training.model import Attention, DecoderLayer, LlamaLM, ModelConfig


def streaming_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: StreamWindow
) -> torch.Tensor:
    """Attention of q, k, v [batch, heads, seq, head_dim] under the window's Λ mask.

    Each page of queries attends only to the key pages it may see (sinks, local pages, its own),
    gathered per query page: work and memory grow with seq x window, not seq², which is what
    makes 8K-token calibration affordable on a CPU. The mask over the gathered keys is
    `window.visible` itself.
    """
    b, h, s, d = q.shape
    page = window.page_size
    pages = -(-s // page)
    q_page = torch.arange(pages, device=q.device)[:, None]
    sinks = torch.arange(window.sink_pages, device=q.device).expand(pages, -1)
    local = q_page + torch.arange(-window.local_pages, 1, device=q.device)
    # A local page that is also a sink page (or before the first page) is gathered once only.
    key_pages = torch.cat([sinks, local], dim=1)
    fresh = torch.cat([torch.ones_like(sinks, dtype=torch.bool), local >= window.sink_pages], 1)
    offsets = torch.arange(page, device=q.device)
    k_pos = (key_pages[:, :, None] * page + offsets).flatten(1)  # [pages, keys]
    q_pos = (q_page * page + offsets)[:, :, None]  # [pages, page, 1]
    mask = window.visible(q_pos, k_pos[:, None, :])
    mask &= (fresh.repeat_interleave(page, dim=1) & (k_pos < s))[:, None, :]

    gather = k_pos.clamp(0, s - 1).flatten()
    keys, values = (t.index_select(2, gather).view(b, h * pages, -1, d) for t in (k, v))
    queries = F.pad(q, (0, 0, 0, pages * page - s)).reshape(b, h * pages, page, d)
    out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask.repeat(h, 1, 1))
    return out.reshape(b, h, pages * page, d)[:, :, :s]


class MixedAttention(Attention):
    """The training model's attention with a per-KV-head gate between full and streaming."""

    def __init__(self, cfg: ModelConfig, window: StreamWindow) -> None:
        super().__init__(cfg)
        self.window = window
        self.gate: torch.Tensor | None = None
        """[kv_heads] in [0, 1], set by `GatedLlama.set_gates`; None: the parent's dense path."""

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.gate is None:
            return super().forward(x, cos, sin)
        q, k, v = self.qkv(x, cos, sin)
        groups = self.num_heads // self.num_kv_heads
        gate = self.gate.to(q.dtype).repeat_interleave(groups)[:, None, None]
        # A pattern's all-dense or all-streaming layer needs one attention only; a learning gate
        # needs both, for its gradient.
        if not gate.requires_grad and bool((gate == 1).all()):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif not gate.requires_grad and bool((gate == 0).all()):
            out = streaming_attention(q, k, v, self.window)
        else:
            streamed = streaming_attention(q, k, v, self.window)
            full = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            out = streamed + gate * (full - streamed)
        return self.output(out)


class GatedLlama(LlamaLM):
    """`LlamaLM` (HF tensor names, so checkpoints load as they are) whose attention layers are
    `MixedAttention` under one streaming window, and, for checkpoints with untied embeddings,
    its own `lm_head`."""

    def __init__(self, cfg: ModelConfig, window: StreamWindow, tied_embeddings: bool) -> None:
        super().__init__(cfg)
        for layer in self.decoder_layers:
            layer.self_attn = MixedAttention(cfg, window)
        self.lm_head = (
            None if tied_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        )

    @property
    def decoder_layers(self) -> list[DecoderLayer]:
        return [cast(DecoderLayer, layer) for layer in self.model.layers]

    def set_gates(self, gates: torch.Tensor | None) -> None:
        """Gates [layers, kv_heads] for the forward passes that follow (autograd flows into them
        if they require grad); None: the model's own dense attention."""
        shape = (self.cfg.num_layers, self.cfg.num_kv_heads)
        if gates is not None and tuple(gates.shape) != shape:
            raise ValueError(f"gates of shape {list(gates.shape)}, the model has {list(shape)}")
        for i, layer in enumerate(self.decoder_layers):
            cast(MixedAttention, layer.self_attn).gate = None if gates is None else gates[i]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return super().logits(hidden) if self.lm_head is None else self.lm_head(hidden)
