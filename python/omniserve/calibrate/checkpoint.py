"""An HF fp checkpoint directory as a frozen `GatedLlama`, and its tokenizer.

The plain-torch model is Llama's decoder exactly (no biases, no sliding window, SwiGLU, RoPE),
so it takes Llama-architecture checkpoints in fp32, fp16 or bf16 safetensors (single or sharded,
tied or untied embeddings, RoPE scaled as the engine scales it: `layers/rotary.py`). Anything it
would compute differently is refused with the reason rather than calibrated wrongly: quantized
checkpoints (calibrate the fp model they came from: a pattern does not depend on the weight
format), attention or MLP biases (Qwen2), sliding-window attention, other activations.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

from omniserve.calibrate.gated_model import GatedLlama
from omniserve.errors import CheckpointError, ConfigError
from omniserve.formats.qserve_zoo import is_qserve_checkpoint
from omniserve.formats.streaming import StreamWindow
from omniserve.layers.rotary import inverse_frequencies
from omniserve.models.llama import head_dims, rope_parameters, sliding_windows
from omniserve.models.loader import load_hf_config
from omniserve.training.model import ModelConfig


def load_gated_llama(
    model_dir: Path,
    window: StreamWindow,
    *,
    device: torch.device,
    dtype: torch.dtype,
    max_positions: int,
) -> GatedLlama:
    """The checkpoint's model on `device` in `dtype`, every weight frozen, dense until gates are
    set; RoPE tabulated for `max_positions` positions (at most the model's context)."""
    hf = load_hf_config(str(model_dir))  # refuses a missing config and non-Llama families
    raw = json.loads((model_dir / "config.json").read_text())
    if "quantization_config" in raw or is_qserve_checkpoint(model_dir):
        raise CheckpointError(
            f"{model_dir} is a quantized checkpoint; calibrate the fp checkpoint it was made from "
            "(a head pattern does not depend on the weight format)"
        )
    unsupported = {
        "attention or MLP biases": hf.model_type == "qwen2"
        or bool(getattr(hf, "attention_bias", False) or getattr(hf, "mlp_bias", False)),
        "sliding-window attention": any(w is not None for w in sliding_windows(hf)),
        f"hidden_act {hf.hidden_act!r}": hf.hidden_act != "silu",
        "partial rotary embeddings": rope_parameters(hf).get("partial_rotary_factor", 1.0) != 1.0,
    }
    if refused := [what for what, present in unsupported.items() if present]:
        raise CheckpointError(
            f"{model_dir}: the calibration model has no {', '.join(refused)}; it takes "
            "Llama-architecture fp checkpoints"
        )
    if max_positions > hf.max_position_embeddings:
        raise ConfigError(
            f"contexts of {max_positions} tokens exceed the model's {hf.max_position_embeddings}"
        )
    num_heads, num_kv_heads, head_dim = head_dims(hf)
    try:
        rope = inverse_frequencies(head_dim, rope_parameters(hf))
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"{model_dir}/config.json: RoPE settings: {exc}") from None
    cfg = ModelConfig(
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        intermediate_size=hf.intermediate_size,
        num_layers=hf.num_hidden_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_positions,
        rope_theta=float(rope_parameters(hf)["rope_theta"]),
        rms_norm_eps=hf.rms_norm_eps,
    )
    tied = bool(getattr(hf, "tie_word_embeddings", False))
    with torch.device("meta"):  # weights come from the checkpoint: nothing to initialise
        model = GatedLlama(cfg, window, tied_embeddings=tied)
    try:
        model.load_state_dict(_read_tensors(model_dir, tied), strict=True, assign=True)
    except RuntimeError as exc:  # torch lists the missing, unexpected and mis-shaped tensors
        raise CheckpointError(f"{model_dir}: {exc}") from None
    # The engine's RoPE tables (layers/rotary.py), scaling included, replace the training model's.
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), rope)
    angles = torch.cat((angles, angles), dim=-1)
    model.rope_cos, model.rope_sin = angles.cos(), angles.sin()
    return model.requires_grad_(False).to(device=device, dtype=dtype).eval()


def load_tokenizer(model_dir: Path) -> Tokenizer:
    file = model_dir / "tokenizer.json"
    if not file.is_file():
        raise CheckpointError(f"{model_dir}: no tokenizer.json (a fast tokenizer is needed)")
    return Tokenizer.from_file(str(file))


def _read_tensors(model_dir: Path, tied: bool) -> dict[str, torch.Tensor]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{model_dir}: no *.safetensors files (.bin weights are not read)")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        tensors.update(load_file(str(file)))
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise CheckpointError(f"{model_dir}: tensor {name} is {tensor.dtype}, not fp")
    if tied:  # some tied checkpoints store the shared matrix twice
        tensors.pop("lm_head.weight", None)
    return tensors
