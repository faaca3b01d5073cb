"""Tensor parallelism on the CPU (gloo): TP = 2 engines against TP = 1 on tiny models that split
over two ranks (tiny_models.TP_SIZES), and the parts it is made of.

End to end, per model and precision (GQA, MHA with KV4 and a vocabulary that does not divide,
Qwen2 with biases, tied embeddings and one KV head for two ranks, W4A8 g128, W4A8 per-channel
KV4, W8A8, FP8 with an FP8 KV cache, page selection, streaming heads all on one rank): the same
greedy tokens and finish reasons under chunked prefill, preemption and an
abort, and teacher-forced logits and prompt logprobs that agree. Quantized linears are exact
across ranks (a row-parallel one sums its ranks' integer cores and code sums, then runs one
epilogue: `test_row_parallel_quantized_gemm_is_the_whole`; an FP8 one sums its ranks' exact
float64 cores: `test_row_parallel_fp8_gemm_is_the_whole`); fp linears agree to fp32 rounding (a
row-parallel one sums its ranks' float outputs, which rounds differently from one sum), and so
does attention, whose head batches differ in size (2 of 4 query heads per rank). Where that
rounding carries a value across a quantization code boundary (per-token activations, KV), the
code moves by a whole step. The GQA case runs with async scheduling, so the sampled tokens'
broadcast serves the TP = 2 placeholders. A worker
killed with SIGKILL fails the next step with EngineDeadError within seconds, and a worker that
fails to start fails the engine with its traceback.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from omniserve import Engine, SamplingParams
from omniserve.cli.engine_args import add_engine_args, engine_kwargs
from omniserve.config import EngineConfig
from omniserve.distributed import ParallelGroup
from omniserve.errors import ConfigError, EngineDeadError
from omniserve.formats.activation import quantize_per_token, quantize_per_token_across
from omniserve.formats.fp8 import (
    accumulate_fp8,
    epilogue_fp8,
    gemm_fp8,
    quantize_per_token_fp8,
    quantize_per_token_fp8_across,
)
from omniserve.formats.gemm import accumulate, epilogue, quantized_linear
from omniserve.formats.precision import parse
from omniserve.formats.weight import Fp8Weight, W4A8PerGroupWeight, quantize_weight
from omniserve.models.llama import check_shares, rank_share
from omniserve.quantize.rtn_model import write_rtn_checkpoint
from teacher_forcing import assert_greedy_agreement, teacher_forced_logits
from tiny_models import TP_SIZES, save_checkpoint, tiny_config

OPTIONS: dict[str, Any] = {
    "device": "cpu",
    "dtype": "float32",
    "page_size": 16,
    "skip_tokenizer_init": True,
    # 7 pages of 16 tokens for the workload's 166: decodes run out and preempt; a 32-token step
    # budget splits the longer prompts into chunks.
    "num_kv_pages": 8,
    "watermark": 0.0,
    "max_num_seqs": 8,
    "max_num_batched_tokens": 32,
}
PROMPT_LENGTHS = (5, 23, 40, 1, 17)
NEW_TOKENS = 16
ABORTED = "r1"
FP_LOGIT_TOLERANCE = 1e-4
"""Teacher-forced logit difference (a fraction of the largest |logit|) with fp weights, activations
and KV: fp32 rounding."""
QUANTIZED_LOGIT_TOLERANCE = 0.06
"""The same where activations or KV are quantized: a value that rounding carries across a code
boundary moves by a whole step (a KV4 step is 1/15 of its row's range), as between a kernel and
its reference (tests/test_kernels_attention.py LOGIT_TOLERANCE)."""

# name → (family, config overrides, RTN precision and group size or None, engine options)
CASES: dict[str, tuple[str, dict[str, Any], tuple[str, int] | None, dict[str, Any]]] = {
    "llama3-gqa": ("llama3", {}, None, {"async_scheduling": True}),
    "mha-kv4-vocab385": ("llama_linear_mha", {"vocab_size": 385}, None, {"precision": "w16a16kv4"}),
    "qwen2-kv1-kv8": ("qwen2", {"num_key_value_heads": 1}, None, {"kv_cache_dtype": "int8"}),
    "llama3-w4a8-g128": ("llama3", {}, ("w4a8", 128), {}),
    "qwen2-kv1-w4a8kv4": ("qwen2", {"num_key_value_heads": 1}, ("w4a8kv4", -1), {}),
    "mha-w8a8": ("llama_linear_mha", {}, ("w8a8", -1), {}),
    "llama3-fp8-kvfp8": ("llama3", {}, ("fp8", -1), {"kv_cache_dtype": "fp8"}),
    # Page selection: 2 of each context's 16-token pages (most contexts have 2 to 4), per KV head,
    # so each rank selects for its own heads.
    "llama3-sparse-decode": (
        "llama3",
        {},
        None,
        {"sparse_decode": True, "token_budget": 32, "logical_pages_per_page": 4},
    ),
    # Streaming heads (STREAMING_GATES): layer 0's and layer 1's KV head 1, both on rank 1, so
    # rank 0 has none and keeps only the streaming pool's bookkeeping.
    "llama3-streaming": (
        "llama3",
        {},
        None,
        {
            "static_sparsity": 0.5,
            "prefill_sink_tokens": 16,
            "prefill_local_tokens": 16,
            "decode_sink_tokens": 16,
            "decode_local_tokens": 16,
        },
    ),
}
STREAMING_GATES = "0.9\t0.1\n0.8\t0.2\n"
"""The head pattern of the streaming case (layers x KV heads, DuoAttention's gates)."""


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tp")
    fp_dirs: dict[tuple[str, str], Path] = {}
    out = {}
    for name, (family, overrides, rtn, _) in CASES.items():
        key = (family, repr(sorted(overrides.items())))
        if key not in fp_dirs:
            fp_dirs[key] = root / f"{family}-{len(fp_dirs)}"
            save_checkpoint(family, fp_dirs[key], **TP_SIZES, **overrides)
        out[name] = fp_dirs[key]
        if rtn is not None:
            out[name] = root / name
            write_rtn_checkpoint(fp_dirs[key], out[name], parse(*rtn))
        if "static_sparsity" in CASES[name][3]:  # the model's own pattern directory
            pattern = out[name] / "attn_pattern"
            pattern.mkdir(exist_ok=True)
            (pattern / "full_attention_heads.tsv").write_text(STREAMING_GATES)
            (pattern / "config.json").write_text('{"sink_size": 16, "recent_size": 16}')
    return out


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 384, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


def _workload(engine: Engine) -> dict[str, tuple[list[int], str | None, list[float | None] | None]]:
    """Every request's tokens, finish reason and prompt logprobs (one request asks for them),
    through chunked prefill, preemption and an abort after the second step."""
    for i, prompt in enumerate(_prompts()):
        params = SamplingParams(
            max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True, prompt_logprobs=i == 4
        )
        engine.add_request(f"r{i}", prompt, params)
    finals = {}
    steps = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = (out.token_ids, out.finish_reason, out.prompt_logprobs)
        steps += 1
        if steps == 2:
            engine.abort(ABORTED)
    return finals


@pytest.mark.parametrize("case", list(CASES))
def test_tp2_matches_tp1(case: str, checkpoints: dict[str, Path]) -> None:
    path, options = checkpoints[case], {**OPTIONS, **CASES[case][3]}
    tp1 = Engine.from_pretrained(path, **options)
    want = _workload(tp1)
    assert tp1.stats().num_preemptions > 0, "the workload must preempt"
    assert want[ABORTED][1] == "abort"
    with Engine.from_pretrained(path, tensor_parallel_size=2, **options) as tp2:
        got = _workload(tp2)
        assert tp2.stats().num_preemptions == tp1.stats().num_preemptions
        assert {r: (t, f) for r, (t, f, _) in got.items()} == {
            r: (t, f) for r, (t, f, _) in want.items()
        }
        quantized = CASES[case][2] is not None or tp1.runner.kv_cache.spec.kv_bits is not None
        tolerance = QUANTIZED_LOGIT_TOLERANCE if quantized else FP_LOGIT_TOLERANCE
        scored_want, scored_got = want["r4"][2], got["r4"][2]
        assert scored_want is not None and scored_got is not None
        torch.testing.assert_close(
            torch.tensor(scored_got[1:]), torch.tensor(scored_want[1:]), rtol=tolerance, atol=0.0
        )
        if tp1.runner.streaming is not None:
            assert tp1.runner.streaming.stream_heads == ((1,), (1,))
            assert tp2.runner.streaming is not None  # rank 0: the pool, no streaming head
            assert tp2.runner.streaming.stream_heads == ((), ())
        if tp1.runner.selection is not None or tp1.runner.streaming is not None:
            # Sparse attention changes what the workload decodes (else the case tests nothing).
            dense = _workload(Engine.from_pretrained(path, **OPTIONS))
            assert any(dense[r][0] != want[r][0] for r in want)
        if tp1.runner.selection is not None:
            return  # teacher forcing does not drive page selection: the tokens are the check
        # Teacher-forced logits of TP = 1's tokens (the engines are idle: their caches are free).
        prompts = [_prompts()[0], _prompts()[2]]
        tokens = [want["r0"][0], want["r2"][0][:8]]
        assert_greedy_agreement(
            tokens,
            *(teacher_forced_logits(e.runner, prompts, tokens) for e in (tp1, tp2)),
            logit_tolerance=tolerance,
            max_tie_rate=0.05,
        )


def test_killed_worker_fails_the_next_step(checkpoints: dict[str, Path]) -> None:
    engine = Engine.from_pretrained(checkpoints["llama3-gqa"], tensor_parallel_size=2, **OPTIONS)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    engine.add_request("a", _prompts()[0], params)
    engine.step()
    (pid,) = engine.worker_pids
    os.kill(pid, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(EngineDeadError, match="exit code -9"):
        while engine.has_unfinished_requests():
            engine.step()
    assert time.monotonic() - start < 5.0
    with pytest.raises(EngineDeadError):
        engine.step()
    engine.close()
    engine.close()  # idempotent


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_worker_start_failure_carries_its_traceback(checkpoints: dict[str, Path]) -> None:
    # The worker resolves its device first: it fails and reports before any model is built.
    options = {**OPTIONS, "device": "cuda", "tensor_parallel_size": 2}
    with pytest.raises(EngineDeadError, match=r"(?s)rank 1: Traceback.*CUDA is not available"):
        Engine.from_pretrained(checkpoints["llama3-gqa"], **options)


def test_one_rank_runs_without_torch_distributed(checkpoints: dict[str, Path]) -> None:
    with Engine.from_pretrained(checkpoints["llama3-gqa"], **OPTIONS) as engine:
        assert type(engine.runner.group) is ParallelGroup
        assert engine.worker_pids == ()
        assert not dist.is_initialized()


# -- the parts --------------------------------------------------------------------------------


class _Ranks(ParallelGroup):
    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size


@pytest.mark.parametrize(
    ("kv_heads", "first_kv"), [(4, [0, 2]), (2, [0, 1]), (1, [0, 0])], ids=["mha", "gqa", "kv1"]
)
def test_rank_share_splits_heads(kv_heads: int, first_kv: list[int]) -> None:
    config = tiny_config("llama3", **TP_SIZES, num_key_value_heads=kv_heads)
    shares = [rank_share(config, _Ranks(rank, 2)) for rank in range(2)]
    assert [s.first_head for s in shares] == [0, 2] and shares[0].num_heads == 2
    assert [s.first_kv_head for s in shares] == first_kv
    assert shares[0].num_kv_heads == max(kv_heads // 2, 1)
    assert [s.first_channel for s in shares] == [0, 256]
    assert shares[0].vocab == 192


def test_rank_share_refuses_what_does_not_split() -> None:
    with pytest.raises(ConfigError, match="tensor_parallel_size=3 must divide"):
        rank_share(tiny_config("llama3", **TP_SIZES), _Ranks(0, 3))
    # hidden 128: o_proj's 64 input channels per rank cannot hold a 128-group.
    small = tiny_config("llama3", hidden_size=128, intermediate_size=256)
    with pytest.raises(ConfigError, match="o_proj's shard .* W4A8PerGroupWeight"):
        check_shares(small, W4A8PerGroupWeight, _Ranks(0, 2))


@pytest.mark.parametrize(
    ("precision", "group_size"), [("w4a8", -1), ("w4a8", 128), ("w8a8", -1), ("fp8", -1)]
)
def test_narrowed_weights_are_the_parts_of_the_whole(precision: str, group_size: int) -> None:
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    q = quantize_weight(w, parse(precision, group_size))
    whole = q.dequantize()
    for dim, start, size in ((0, 32, 32), (1, 128, 128), (1, 0, 128)):
        part = q.narrow(dim, start, size)
        assert type(part) is type(q)
        assert torch.equal(part.dequantize(), whole.narrow(dim, start, size))
    if group_size == 128:
        with pytest.raises(ValueError, match="multiples of 128"):
            q.narrow(1, 64, 128)


@pytest.mark.parametrize(("precision", "group_size"), [("w4a8", -1), ("w4a8", 128), ("w8a8", -1)])
def test_row_parallel_quantized_gemm_is_the_whole(precision: str, group_size: int) -> None:
    """What a row-parallel QuantizedLinear's ranks compute on the reference path: each its K
    part's integer core and code sums, summed, then one epilogue, which is the whole GEMM to the
    bit."""
    g = torch.Generator().manual_seed(2)
    w = quantize_weight(torch.randn(64, 256, generator=g), parse(precision, group_size))
    x = quantize_per_token(torch.randn(5, 256, generator=g))
    parts = [
        (w.narrow(1, k, 128), x._replace(q=x.q[:, k : k + 128].contiguous())) for k in (0, 128)
    ]
    acc = sum(accumulate(xk, wk) for wk, xk in parts)
    sums = sum(xk.q.sum(-1) for _, xk in parts)
    assert torch.equal(epilogue(acc, x._replace(sums=sums), parts[0][0]), quantized_linear(x, w))


def test_row_parallel_fp8_gemm_is_the_whole() -> None:
    """A row-parallel Fp8Linear's ranks on the reference path: each quantizes its columns under
    the whole rows' scales (so its codes are the whole's columns) and accumulates its K part;
    the parts' sum, scaled once, is the whole GEMM to the bit."""
    g = torch.Generator().manual_seed(3)
    w = quantize_weight(torch.randn(64, 256, generator=g), parse("fp8", -1))
    assert isinstance(w, Fp8Weight)
    x = torch.randn(5, 256, generator=g)
    row_max = x.abs().amax(-1)
    whole = quantize_per_token_fp8(x)
    parts = [
        quantize_per_token_fp8_across(x[:, k : k + 128], lambda m: torch.maximum(m, row_max))
        for k in (0, 128)
    ]
    assert torch.equal(
        torch.cat([p.q for p in parts], -1).view(torch.uint8), whole.q.view(torch.uint8)
    )
    assert all(torch.equal(p.scales, whole.scales) for p in parts)
    halves = [w.narrow(1, k, 128) for k in (0, 128)]
    acc = sum(accumulate_fp8(p, h.weight) for p, h in zip(parts, halves, strict=True))
    assert isinstance(acc, torch.Tensor)
    got = epilogue_fp8(acc, whole.scales, w.weight_scale)
    assert torch.equal(got, gemm_fp8(whole, w.weight, w.weight_scale))


def test_row_split_activation_quantization_is_the_whole_rows() -> None:
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(1))
    halves = x[:, :32], x[:, 32:]
    row_max = x.abs().amax(-1)
    whole = quantize_per_token(x)
    parts = [
        quantize_per_token_across(h, lambda local: torch.maximum(local, row_max)) for h in halves
    ]
    assert torch.equal(torch.cat([p.q for p in parts], -1), whole.q)
    assert all(torch.equal(p.scales, whole.scales) for p in parts)
    assert torch.equal(parts[0].sums + parts[1].sums, whole.sums)


def test_options() -> None:
    with pytest.raises(ConfigError, match="tensor_parallel_size must be >= 1"):
        EngineConfig(model="m", tensor_parallel_size=0)
    import argparse

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    args = parser.parse_args(["--tensor-parallel-size", "2"])
    assert engine_kwargs(args) == {"tensor_parallel_size": 2}
