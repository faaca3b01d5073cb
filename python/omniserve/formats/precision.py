"""Serving precisions (`--precision`, `--group-size`): parsing and validation
(docs/architecture.md#precisions-and-formats).

A precision names the bits of the linear weights (w), of the linear-layer input activations (a) and
of the KV cache (kv): `w4a8kv4` = uint4 weights, per-token int8 activations, 4-bit KV cache.
`w16` means the model's own fp16/bf16 weights, and a precision without `kv` keeps the KV cache in
8 bits for the quantized-weight precisions (`w4a8` = `w4a8kv8`, `w8a8` = `w8a8kv8`) and in the
model dtype for `w16a16`. The group size is -1 (one scale per output channel) or 128 (progressive
g128 quantization, docs/formats.md#w4a8-g128), and 128 exists only for W4A8: W8A8 is per-channel
by construction and fp16 weights have no groups.

`fp8` is the Hopper industry configuration (vLLM's and TensorRT-LLM's FP8): e4m3 weights with a
scale per output channel, per-token dynamic e4m3 activations, and the KV cache in the model dtype
(their default; docs/formats.md#fp8). It is the peer the integer precisions are measured against.
"""

from __future__ import annotations

from dataclasses import dataclass

from omniserve.errors import ConfigError

PER_CHANNEL = -1
"""`group_size` value meaning one weight scale per output channel."""

GROUP_SIZE_128 = 128
"""The only per-group size: QServe's g128 kernels hard-code it."""

# text -> (weight_bits, act_bits, kv_bits or None for a KV cache in the model dtype, float8)
_PRECISIONS: dict[str, tuple[int, int, int | None, bool]] = {
    "w4a8kv4": (4, 8, 4, False),
    "w4a8kv8": (4, 8, 8, False),
    "w4a8": (4, 8, 8, False),
    "w8a8kv4": (8, 8, 4, False),
    "w8a8kv8": (8, 8, 8, False),
    "w8a8": (8, 8, 8, False),
    "w16a16kv4": (16, 16, 4, False),
    "w16a16kv8": (16, 16, 8, False),
    "w16a16": (16, 16, None, False),
    "fp8": (8, 8, None, True),
}

PRECISION_CHOICES: tuple[str, ...] = tuple(_PRECISIONS)
"""Every accepted `--precision` text, in documentation order."""

GROUP_SIZE_CHOICES: tuple[int, ...] = (PER_CHANNEL, GROUP_SIZE_128)


@dataclass(frozen=True)
class Precision:
    """A validated serving precision. Construct it with `parse`."""

    weight_bits: int
    """4 (uint4, QServe W4A8), 8 (int8, W8A8) or 16 (the model's own weights)."""
    act_bits: int
    """8 (per-token dynamic int8 inputs to every linear) or 16 (no activation quantization)."""
    kv_bits: int | None
    """4 or 8 for a quantized KV cache, None for a KV cache in the model dtype."""
    group_size: int
    """-1 (per output channel) or 128 (progressive per-group, W4A8 only)."""
    float8: bool = False
    """Weights and activations are FP8 e4m3 (`fp8`) rather than integers."""

    @property
    def name(self) -> str:
        """Canonical text, with the KV part always spelled out where it is quantized."""
        if self.float8:
            return "fp8"
        kv = "" if self.kv_bits is None else f"kv{self.kv_bits}"
        return f"w{self.weight_bits}a{self.act_bits}{kv}"

    @property
    def quantized_weights(self) -> bool:
        return self.weight_bits < 16


def parse(text: str, group_size: int = PER_CHANNEL) -> Precision:
    """Parse `--precision` and `--group-size`; raise ConfigError naming the valid choices."""
    key = text.strip().lower()
    if key not in _PRECISIONS:
        raise ConfigError(
            f"precision {text!r} is not supported; valid choices: {', '.join(PRECISION_CHOICES)}"
        )
    weight_bits, act_bits, kv_bits, float8 = _PRECISIONS[key]
    if group_size not in GROUP_SIZE_CHOICES:
        raise ConfigError(
            f"group_size {group_size} is not supported; valid choices: "
            f"{', '.join(map(str, GROUP_SIZE_CHOICES))} (-1 = per-channel)"
        )
    if group_size == GROUP_SIZE_128 and weight_bits != 4:
        raise ConfigError(
            f"group_size 128 is only valid for W4A8 precisions (w4a8kv4, w4a8kv8, w4a8); "
            f"{key} requires group_size -1 (per-channel)"
        )
    return Precision(weight_bits, act_bits, kv_bits, group_size, float8)
