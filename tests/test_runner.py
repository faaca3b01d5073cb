"""ModelRunner on CPU: device/dtype/length resolution, KV cache sizing, memory report, row reuse."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from omniserve.config import EngineConfig
from omniserve.errors import ConfigError
from omniserve.runner.model_runner import ModelRunner
from omniserve.sampling_params import SamplingParams
from tiny_models import PagedRequests, hf_logits, save_checkpoint

# llama3 tiny: 2 layers x K,V x 16 tokens x 2 kv heads x head_dim 16 x 4 bytes.
BYTES_PER_PAGE = 2 * 2 * 16 * 2 * 16 * 4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    directory = tmp_path_factory.mktemp("llama3")
    return directory, save_checkpoint("llama3", directory)


def _runner(directory: Path, **kwargs: object) -> ModelRunner:
    options = {"device": "cpu", "page_size": 16, "max_num_seqs": 4, "max_num_batched_tokens": 64}
    return ModelRunner(EngineConfig.from_kwargs(str(directory), **{**options, **kwargs}))


def test_resolution_and_sizing(checkpoint: tuple[Path, torch.nn.Module]) -> None:
    runner = _runner(checkpoint[0], cpu_kv_cache_gib=0.001)
    assert runner.device == torch.device("cpu") and runner.dtype == torch.float32
    assert runner.max_model_len == 256 and runner.vocab_size == 384
    assert runner.hf_config.model_type == "llama"
    assert runner.num_kv_pages == int(0.001 * 2**30) // BYTES_PER_PAGE
    report = runner.memory_report()
    assert set(report) == {"weights", "kv_cache", "peak_activations"}
    assert report["kv_cache"] == runner.num_kv_pages * BYTES_PER_PAGE / 2**30
    weights = sum(p.numel() for p in checkpoint[1].parameters()) * 4
    assert report["weights"] == pytest.approx(weights / 2**30)

    runner = _runner(checkpoint[0], num_kv_pages=20, max_model_len=100, dtype="bfloat16")
    assert runner.num_kv_pages == 20 and runner.max_model_len == 100
    assert runner.dtype == torch.bfloat16
    assert _runner(checkpoint[0], num_kv_pages=20, max_model_len=5000).max_model_len == 256


def test_cache_too_small_for_one_sequence(checkpoint: tuple[Path, torch.nn.Module]) -> None:
    # 256 tokens need 16 pages of 16; this budget holds 10 (plus the null page).
    with pytest.raises(ConfigError, match=r"max_model_len=256 needs 16"):
        _runner(checkpoint[0], cpu_kv_cache_gib=11 * BYTES_PER_PAGE / 2**30)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_cuda_requested_without_cuda(checkpoint: tuple[Path, torch.nn.Module]) -> None:
    with pytest.raises(ConfigError, match="CUDA is not available"):
        _runner(checkpoint[0], device="cuda")


def test_step_without_sampling(checkpoint: tuple[Path, torch.nn.Module]) -> None:
    runner = _runner(checkpoint[0], num_kv_pages=20)
    runner.bind_row(0, SamplingParams(temperature=0.0), [5] * 20, [], [])
    plan = PagedRequests(16, 20).step([(0, [5] * 20)], needs_logits=[False])
    sampled_idx, result, *_ = runner.execute(plan)
    assert sampled_idx.dtype == torch.int64 and sampled_idx.numel() == 0
    assert result.token_ids.numel() == 0


def test_reused_row_reads_only_its_new_pages(checkpoint: tuple[Path, torch.nn.Module]) -> None:
    directory, hf = checkpoint
    runner = _runner(directory, num_kv_pages=20)
    reqs = PagedRequests(16, 20)
    runner.compute_logits(reqs.step([(2, list(range(10, 50)))]))
    reqs.release(2)
    prompt = list(range(100, 121))
    _, logits = runner.compute_logits(reqs.step([(2, prompt[:17])]))
    _, logits = runner.compute_logits(reqs.step([(2, prompt[17:])]))
    torch.testing.assert_close(logits[0], hf_logits(hf, prompt)[-1], atol=1e-4, rtol=1e-4)
