"""The QoQ quantizer: an HF fp checkpoint → our quantized checkpoint
(docs/architecture.md#offline-quantization, docs/formats.md#checkpoint-format).

Per decoder layer, on the calibration device, with only that layer and its activations there:

1. rotation: fold both RMSNorm gains into their readers and rotate the residual stream by a seeded
   random Hadamard R (rotation.py; the embedding and lm_head are rotated once, up front);
2. one fp forward over the calibration windows, recording per-channel maxima, an evenly strided
   sample of every linear's inputs and, for GPTQ, their Hessians (calibration.py); its outputs are
   the next layer's inputs (the fp model's, so errors do not compound into the statistics);
3. SmoothAttention on q/k (KV-quantized precisions), smoothing of down_proj inputs into up_proj and
   of o_proj inputs into v_proj, α chosen per layer from a grid by the quantized output error with
   "no smoothing" as a candidate (smooth.py) — all exact fp transforms;
4. for g128, activation-aware reordering of down_proj inputs, kept where it lowers the error
   (reorder.py);
5. each linear: per-channel clipping ratios by grid search on the output error (clip.py), then the
   RTN codes on that grid or GPTQ's (gptq.py), stored in the precision's format (formats/weight.py).

Everything off (`QoQOptions.rtn()`) reproduces `rtn_model.write_rtn_checkpoint` code for code:
both use formats/weight.py's one implementation of each format.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from omniserve.errors import CheckpointError, ConfigError
from omniserve.formats.checkpoint import (
    check_kv_granularity,
    copy_side_files,
    write_checkpoint,
)
from omniserve.formats.kv import PER_TENSOR, PER_TOKEN_HEAD, static_kv_scales
from omniserve.formats.precision import Precision
from omniserve.formats.weight import StoredWeight, weight_grid
from omniserve.quantize.qoq.calibration import (
    CalibrationData,
    LayerStatistics,
    PointStatistics,
)
from omniserve.quantize.qoq.clip import (
    clip_grid,
    relative_error,
    runtime_input,
    search_clip,
)
from omniserve.quantize.qoq.gptq import gptq_codes
from omniserve.quantize.qoq.model import (
    DOWN,
    DOWN_INPUT,
    EMBED,
    FINAL_NORM,
    KEYS,
    LM_HEAD,
    O_INPUT,
    PROJECTIONS,
    READERS,
    VALUES,
    Geometry,
    Layer,
    O,
    SourceModel,
    layer_forward,
    rope_tables,
)
from omniserve.quantize.qoq.reorder import fold_down_permutation, salience_order
from omniserve.quantize.qoq.rotation import (
    describe,
    fold_norm,
    random_rotation,
    rotate_layer,
)
from omniserve.quantize.qoq.smooth import (
    down_weight_absmax,
    fold_down,
    fold_out,
    fold_smooth_attention,
    kv_to_query_channels,
    out_weight_absmax,
    query_to_kv_max,
    smooth_attention_scale,
    smoothing_scale,
)

METHOD = "qoq"


@dataclass(frozen=True)
class QoQOptions:
    """Which QoQ transforms run, and their settings (every field lands in the recipe)."""

    rotation: bool = True
    rotation_seed: int = 0
    smooth_down: bool = True
    smooth_out: bool = True
    smooth_alphas: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
    """Candidate α of down/o smoothing; the quantizer also tries no smoothing."""
    smooth_attention: bool = True
    smooth_attention_alpha: float = 0.5
    clip: bool = True
    clip_min: float = 0.5
    clip_steps: int = 21
    reorder: bool = True
    """g128 only."""
    gptq: bool = False
    gptq_damp: float = 0.01
    gptq_block: int = 128
    max_rows: int = 2048
    """Calibration token rows kept per linear input for the searches and error reports."""
    batch_size: int = 8
    """Calibration windows per forward."""

    @classmethod
    def rtn(cls) -> QoQOptions:
        """Every transform off: plain round-to-nearest."""
        return cls(
            rotation=False,
            smooth_down=False,
            smooth_out=False,
            smooth_attention=False,
            clip=False,
            reorder=False,
            gptq=False,
        )

    def __post_init__(self) -> None:
        if self.clip:
            clip_grid(self.clip_min, self.clip_steps)  # ValueError naming a bad setting
        if any(not 0.0 <= a <= 1.0 for a in self.smooth_alphas):
            raise ValueError(f"smoothing alphas must lie in [0, 1], got {self.smooth_alphas}")
        if not 0.0 < self.smooth_attention_alpha <= 1.0:
            raise ValueError(
                f"SmoothAttention alpha must be in (0, 1], got {self.smooth_attention_alpha}"
            )
        if self.max_rows < 1 or self.batch_size < 1:
            raise ValueError("max_rows and batch_size must be >= 1")


@dataclass
class QoQReport:
    """What the quantizer chose and measured."""

    recipe: dict[str, Any]
    errors: dict[str, float] = field(default_factory=dict)
    """Quantized linear prefix → relative output error on the calibration sample (clip.py)."""


def quantize_checkpoint(
    src: str | Path,
    dst: str | Path,
    precision: Precision,
    calibration: CalibrationData,
    options: QoQOptions | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    kv_granularity: str = PER_TOKEN_HEAD,
) -> QoQReport:
    """Quantize the HF fp checkpoint `src` with QoQ into our checkpoint directory `dst`.

    `kv_granularity` PER_TENSOR (KV8 precisions only) also calibrates static per-layer K and V
    scales on the transformed model, which the engine then serves as static KV8."""
    opts = options or QoQOptions()
    check_kv_granularity(kv_granularity, precision)
    source_dir, out = Path(src), Path(dst)
    if not precision.quantized_weights:
        raise ConfigError(
            f"{precision.name} keeps the model's fp weights (its KV cache is quantized at run "
            "time, with no calibration); quantize to a w4a8 or w8a8 precision"
        )
    if precision.float8:
        raise ConfigError(
            "QoQ targets the integer grids; fp8 is rounded per channel with no calibration "
            "(omniserve.quantize.rtn_model.write_rtn_checkpoint, `omniserve quantize --precision "
            "fp8`)"
        )
    if out.exists() and out.resolve() == source_dir.resolve():
        raise ConfigError(f"{dst}: write the quantized checkpoint to another directory than {src}")
    dev = torch.device(device)
    with SourceModel(source_dir) as source:
        quantizer = _Quantizer(
            source, precision, calibration, opts, dev, static_kv=kv_granularity == PER_TENSOR
        )
        linears, tensors, config = quantizer.run(progress)
        report = QoQReport(quantizer.recipe(), quantizer.errors)
        kv_scales = None
        if quantizer.kv_absmax is not None:
            kv_scales = static_kv_scales(torch.stack(quantizer.kv_absmax))
        write_checkpoint(out, config, precision, linears, tensors, report.recipe, kv_scales)
    copy_side_files(source_dir, out)
    return report


class _Quantizer:
    def __init__(
        self,
        source: SourceModel,
        precision: Precision,
        calibration: CalibrationData,
        options: QoQOptions,
        device: torch.device,
        static_kv: bool = False,
    ) -> None:
        self.source = source
        self.precision = precision
        self.calibration = calibration
        self.opts = options
        self.device = device
        self.geometry: Geometry = source.geometry
        self.errors: dict[str, float] = {}
        self.choices: dict[str, dict[int, Any]] = {
            "smooth_down": {},
            "smooth_out": {},
            "reorder": {},
        }
        vocab = int(source.config.vocab_size)
        if int(calibration.ids.max()) >= vocab:
            raise ConfigError(
                f"calibration token id {int(calibration.ids.max())} is outside the model's "
                f"vocabulary of {vocab}: was the calibration set tokenized for another model?"
            )
        self.rotation = (
            random_rotation(self.geometry.hidden, options.rotation_seed).to(device, torch.float32)
            if options.rotation
            else None
        )
        self.clip_ratios = (
            clip_grid(options.clip_min, options.clip_steps) if options.clip else [1.0]
        )
        self.smooth_attention = options.smooth_attention and precision.kv_bits is not None
        self.kv_absmax: list[torch.Tensor] | None = [] if static_kv else None
        """Per layer fp32 [2]: max |post-RoPE key| and max |value| of the transformed layer."""

    def recipe(self) -> dict[str, Any]:
        o = self.opts
        return {
            "method": METHOD,
            "rotation": describe(self.geometry.hidden, o.rotation_seed) if o.rotation else None,
            "smooth_attention": (
                {"alpha": o.smooth_attention_alpha, "beta": 0.0, "rope_pairs": "rotate_half"}
                if self.smooth_attention
                else None
            ),
            "smooth_down": self._smooth_recipe(o.smooth_down, "smooth_down", "up_proj"),
            "smooth_out": self._smooth_recipe(o.smooth_out, "smooth_out", "v_proj"),
            "clip": (
                {
                    "objective": "output_mse",
                    "granularity": "per_channel",
                    "grid": [round(r, 6) for r in self.clip_ratios],
                }
                if o.clip
                else None
            ),
            "reorder": (
                {
                    "metric": "input_absmax",
                    "linears": "down_proj",
                    "layers": sorted(i for i, kept in self.choices["reorder"].items() if kept),
                }
                if self.reorder_enabled
                else None
            ),
            "gptq": (
                {
                    "damp": o.gptq_damp,
                    "block": o.gptq_block,
                    "grid": "rtn_static_groups",
                    "act_order": False,
                }
                if o.gptq
                else None
            ),
            "kv_cache": (
                {
                    "granularity": PER_TENSOR,
                    "scale": "absmax / 127 of the transformed layer's "
                    "post-RoPE keys and values over the calibration set",
                }
                if self.kv_absmax is not None
                else {"granularity": PER_TOKEN_HEAD, "scale": "dynamic"}
            ),
            "calibration": {
                **self.calibration.recipe(),
                "max_rows": o.max_rows,
                "activations": f"int{self.precision.act_bits} per token",
            },
        }

    @property
    def reorder_enabled(self) -> bool:
        return self.opts.reorder and self.precision.group_size != -1

    def _smooth_recipe(self, enabled: bool, key: str, producer: str) -> dict[str, Any] | None:
        if not enabled:
            return None
        return {
            "formula": "max|X|^alpha / max|W|^(1-alpha)",
            "alpha_grid": list(self.opts.smooth_alphas),
            "folded_into": producer,
            "alpha_per_layer": [self.choices[key].get(i) for i in range(self.source.num_layers)],
        }

    # -- the run -----------------------------------------------------------------------------

    def run(
        self, progress: bool
    ) -> tuple[dict[str, StoredWeight], dict[str, torch.Tensor], dict[str, Any]]:
        src = self.source
        embed = src.tensor(EMBED)
        x = F.embedding(self.calibration.ids.to(self.device), embed.to(self.device).float())
        if self.rotation is not None:
            x = x @ self.rotation
        rope = rope_tables(src.config, self.calibration.ids.shape[1], self.device)
        linears: dict[str, StoredWeight] = {}
        tensors: dict[str, torch.Tensor] = {}
        bar = tqdm(range(src.num_layers), desc="QoQ layers", unit="layer", disable=not progress)
        for i in bar:
            layer = src.layer(i, self.device)
            dtypes = {n: src.tensor(f"model.layers.{i}.{n}").dtype for n in layer}
            x, quantized = self._layer(i, layer, x, rope)
            for name, t in layer.items():
                if name.endswith(".weight") and name.removesuffix(".weight") in PROJECTIONS:
                    continue
                tensors[f"model.layers.{i}.{name}"] = t.to("cpu", dtypes[name])
            for proj in PROJECTIONS:
                prefix = f"model.layers.{i}.{proj}"
                linears[prefix] = quantized[proj]
        config = dict(src.raw_config)
        tensors.update(self._ends(embed))
        if self.rotation is not None and src.tied:
            config["tie_word_embeddings"] = False  # lm_head is E · diag(g) · R, no longer E · R
        return linears, tensors, config

    def _ends(self, embed: torch.Tensor) -> dict[str, torch.Tensor]:
        """Embedding, final norm and lm_head (rotated, gain folded, untied when rotating)."""
        src = self.source
        norm = src.tensor(FINAL_NORM)
        head = embed if src.tied else src.tensor(LM_HEAD)
        if self.rotation is None:
            return {EMBED: embed, FINAL_NORM: norm, **({} if src.tied else {LM_HEAD: head})}
        r = self.rotation
        gain = norm.to(self.device, torch.float32)
        rotated_head = fold_norm(head.to(self.device, torch.float32), gain) @ r
        return {
            EMBED: (embed.to(self.device, torch.float32) @ r).to("cpu", embed.dtype),
            FINAL_NORM: torch.ones_like(norm),
            LM_HEAD: rotated_head.to("cpu", head.dtype),
        }

    def _layer(
        self, index: int, layer: Layer, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, StoredWeight]]:
        """Transform and quantize one layer: (its fp outputs, its projections by name)."""
        if self.rotation is not None:
            rotate_layer(layer, self.rotation)
        stats = LayerStatistics(
            x.shape[0] * x.shape[1], self.opts.max_rows, hessians=self.opts.gptq
        )
        out = torch.empty_like(x)
        with torch.no_grad():
            for start in range(0, x.shape[0], self.opts.batch_size):
                end = start + self.opts.batch_size
                out[start:end] = layer_forward(
                    self.geometry, index, layer, x[start:end], rope, stats
                )
            self._transform(index, layer, stats)
            if self.kv_absmax is not None:
                self.kv_absmax.append(self._kv_absmax(index, layer, x, rope))
            quantized = {}
            for point, readers in READERS.items():
                p = stats.points[point]
                rows = p.rows()
                rows_hat = runtime_input(rows, self.precision)
                for proj in readers:
                    quantized[proj] = self._quantize(
                        f"model.layers.{index}.{proj}",
                        layer[f"{proj}.weight"],
                        rows,
                        rows_hat,
                        p.hessian,
                    )
        return out, quantized

    def _kv_absmax(
        self, index: int, layer: Layer, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        """fp32 [2]: max |key| and max |value| of the transformed layer over every calibration
        token. A second forward, because SmoothAttention and o_proj smoothing rescale K and V."""
        absmax = torch.zeros(2, device=self.device)

        def observe(point: str, t: torch.Tensor) -> None:
            if point in (KEYS, VALUES):
                slot = 0 if point == KEYS else 1
                absmax[slot] = torch.maximum(absmax[slot], t.abs().max())

        step = self.opts.batch_size
        for start in range(0, x.shape[0], step):
            layer_forward(self.geometry, index, layer, x[start : start + step], rope, observe)
        return absmax.cpu()

    def _transform(self, index: int, layer: Layer, stats: LayerStatistics) -> None:
        g = self.geometry
        points = stats.points
        if self.smooth_attention:
            key_absmax = points[KEYS].absmax
            assert key_absmax is not None
            fold_smooth_attention(
                layer, smooth_attention_scale(key_absmax, self.opts.smooth_attention_alpha, g), g
            )
        if self.opts.smooth_down:
            down = points[DOWN_INPUT]
            scale = self._search_smoothing(
                "smooth_down",
                index,
                layer[f"{DOWN}.weight"],
                down.rows(),
                down.absmax,
                down_weight_absmax(layer),
                lambda s: s,
            )
            if scale is not None:
                fold_down(layer, scale)
                _divide_inputs(down, scale)
        if self.opts.smooth_out:
            o = points[O_INPUT]
            assert o.absmax is not None
            kv_scale = self._search_smoothing(
                "smooth_out",
                index,
                layer[f"{O}.weight"],
                o.rows(),
                query_to_kv_max(o.absmax, g),
                out_weight_absmax(layer, g),
                lambda s: kv_to_query_channels(s, g),
            )
            if kv_scale is not None:
                fold_out(layer, kv_scale, g)
                _divide_inputs(o, kv_to_query_channels(kv_scale, g))
        if self.reorder_enabled:
            down = points[DOWN_INPUT]
            assert down.absmax is not None
            order = salience_order(down.absmax)
            weight, rows = layer[f"{DOWN}.weight"], down.rows()
            before = self._rtn_error(weight, rows)
            after = self._rtn_error(weight[:, order], rows[:, order])
            keep = after < before
            self.choices["reorder"][index] = keep
            if keep:
                fold_down_permutation(layer, order)
                down.sample = [rows[:, order]]
                down.absmax = down.absmax[order]
                if down.hessian is not None:
                    down.hessian = down.hessian[order][:, order]

    def _search_smoothing(
        self,
        key: str,
        index: int,
        weight: torch.Tensor,
        rows: torch.Tensor,
        act_absmax: torch.Tensor | None,
        weight_absmax: torch.Tensor,
        expand: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor | None:
        """The smoothing scale (in the producer's channels) of the α with the lowest quantized
        output error, or None when no smoothing is best; records the choice."""
        assert act_absmax is not None
        best_error, best_alpha, best_scale = self._rtn_error(weight, rows), None, None
        for alpha in self.opts.smooth_alphas:
            scale = smoothing_scale(act_absmax, weight_absmax, alpha)
            s = expand(scale)
            error = self._rtn_error(weight * s.unsqueeze(0), rows / s.unsqueeze(0))
            if error < best_error:
                best_error, best_alpha, best_scale = error, alpha, scale
        self.choices[key][index] = best_alpha
        return best_scale

    def _rtn_error(self, weight: torch.Tensor, rows: torch.Tensor) -> float:
        w_hat = weight_grid(weight, self.precision).fake_quantize(weight)
        return relative_error(rows, runtime_input(rows, self.precision), weight, w_hat)

    def _quantize(
        self,
        prefix: str,
        weight: torch.Tensor,
        rows: torch.Tensor,
        rows_hat: torch.Tensor,
        hessian: torch.Tensor | None,
    ) -> StoredWeight:
        """The stored weight of one linear (clipped RTN or GPTQ codes); records its error."""
        try:
            clip = (
                search_clip(weight, rows, rows_hat, self.precision, self.clip_ratios)
                if self.opts.clip
                else None
            )
            grid = weight_grid(weight, self.precision, clip)
        except ValueError as exc:  # the format's tile / group constraints
            raise ConfigError(
                f"{prefix} cannot be stored as {self.precision.name} with group_size "
                f"{self.precision.group_size}: {exc}"
            ) from None
        if self.opts.gptq:
            if hessian is None:
                raise CheckpointError(f"{prefix}: no Hessian was gathered for GPTQ")
            codes = gptq_codes(weight, hessian, grid, self.opts.gptq_damp, self.opts.gptq_block)
        else:
            codes = grid.codes(weight, 0)
        w_hat = grid.dequantize(codes, 0)
        self.errors[prefix] = relative_error(rows, rows_hat, weight, w_hat)
        return grid.pack(codes)


def _divide_inputs(point: PointStatistics, scale: torch.Tensor) -> None:
    """Statistics of inputs that a smoothing divided by `scale` [channels]."""
    point.sample = [point.rows() / scale.unsqueeze(0)]
    point.absmax = point.absmax / scale
    if point.hessian is not None:
        point.hessian = point.hessian / scale.unsqueeze(0) / scale.unsqueeze(1)
