"""How much GPU memory the KV cache may take, from a start-up memory profile."""

from __future__ import annotations

import torch


def cuda_memory_for_kv_cache(device: torch.device, utilization: float, activation_peak: int) -> int:
    """Bytes left for the KV cache (may be negative) once the engine's share of the card,
    `utilization` × total, pays for what torch holds now (weights, persistent state), the
    profiled `activation_peak` of a step, and the memory outside torch's allocator (the CUDA
    context, library workspaces, other processes on the card)."""
    free, total = torch.cuda.mem_get_info(device)
    outside_torch = total - free - torch.cuda.memory_reserved(device)
    held = torch.cuda.memory_allocated(device)
    return int(utilization * total) - held - activation_peak - outside_torch
