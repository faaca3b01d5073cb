"""Which KV heads stream, and the windows and table layout they use (LServe static sparsity).

`StreamingSetup.from_config` reads the head pattern (`formats/head_pattern.py`), turns its gates
into streaming heads at `static_sparsity` (one global quantile), and rounds the token windows up
to whole pages (`formats/streaming.py`), saying so when it had to. None means no head streams: the
cache has no streaming pool and every path is the dense one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from omniserve.config import EngineConfig
from omniserve.errors import ConfigError
from omniserve.formats.head_pattern import load_head_pattern, streaming_heads
from omniserve.formats.streaming import StreamTable, StreamWindow
from omniserve.layers.sparse_prefill import StreamWindows

PATTERN_DIR = "attn_pattern"
"""Where a model directory keeps its own head pattern."""

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class StreamingSetup:
    stream_heads: tuple[tuple[int, ...], ...]
    """Per layer, its streaming KV heads among this rank's (local indices; under tensor
    parallelism a rank may hold none)."""
    windows: StreamWindows
    table: StreamTable
    pattern: Path

    @classmethod
    def from_config(
        cls,
        config: EngineConfig,
        num_kv_heads: int,
        sliding_windows: list[int | None],
        rank_kv_heads: range | None = None,
    ) -> StreamingSetup | None:
        """The model's streaming heads (of `num_kv_heads` KV heads per layer) as this rank's,
        `rank_kv_heads` (all on one rank): which heads stream is decided over the whole model,
        so every rank of tensor parallelism agrees on whether any does."""
        if config.static_sparsity == 0:
            return None
        path = Path(config.attn_pattern or Path(config.model) / PATTERN_DIR)
        if config.attn_pattern is None and not path.is_dir():
            raise ConfigError(
                f"static_sparsity={config.static_sparsity} needs a head pattern: pass attn_pattern "
                f"(a DuoAttention-format directory; `omniserve calibrate-heads` makes one), or put "
                f"one at {path}"
            )
        pattern = load_head_pattern(path, len(sliding_windows), num_kv_heads)
        stream = streaming_heads(pattern.gates, config.static_sparsity)
        if not stream.any():
            logger.info("static_sparsity=%s makes no head streaming", config.static_sparsity)
            return None
        if any(w is not None for w, s in zip(sliding_windows, stream, strict=True) if s.any()):
            raise ConfigError(
                "streaming heads in sliding-window layers are not supported; use "
                "static_sparsity=0 for this model"
            )
        windows = StreamWindows(
            _window(config, "prefill", config.prefill_sink_tokens, config.prefill_local_tokens),
            _window(config, "decode", config.decode_sink_tokens, config.decode_local_tokens),
        )
        rank = range(num_kv_heads) if rank_kv_heads is None else rank_kv_heads
        heads = tuple(tuple(j for j, h in enumerate(rank) if row[h]) for row in stream.tolist())
        logger.info(
            "streaming heads (static_sparsity=%s, pattern %s): %d of %d KV heads; per layer %s",
            config.static_sparsity,
            path,
            int(stream.sum()),
            stream.numel(),
            [len(h) for h in heads],
        )
        return cls(heads, windows, StreamTable.serving(windows.prefill, windows.decode), path)


def _window(config: EngineConfig, stage: str, sink: int, local: int) -> StreamWindow:
    window = StreamWindow.of_tokens(sink, local, config.page_size)
    rounded = (window.sink_pages * config.page_size, window.local_pages * config.page_size)
    if rounded != (sink, local):
        logger.warning(
            "%s streaming window sink %d / local %d tokens rounded up to whole pages of %d: "
            "%d / %d",
            stage,
            sink,
            local,
            config.page_size,
            *rounded,
        )
    return window
