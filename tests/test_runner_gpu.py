"""ModelRunner on CUDA: bf16 logits near HF's, fp32 greedy ids equal to HF's, the start-up memory
profile, and an 8B-sized dummy model."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, PreTrainedModel

from omniserve.config import EngineConfig
from omniserve.runner.model_runner import ModelRunner
from omniserve.sampling_params import SamplingParams
from tiny_models import FAMILIES, PagedRequests, hf_greedy, hf_logits, save_checkpoint

pytestmark = pytest.mark.gpu  # skipped without CUDA (tests/conftest.py)

PAGE_SIZE, NUM_PAGES = 16, 128


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def checkpoint(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, PreTrainedModel]:
    directory = tmp_path_factory.mktemp(request.param)
    return directory, save_checkpoint(request.param, directory)


def _runner(directory: Path, **kwargs: object) -> ModelRunner:
    options = {
        "device": "cuda",
        "page_size": PAGE_SIZE,
        "num_kv_pages": NUM_PAGES,
        "max_num_seqs": 8,
        "max_num_batched_tokens": 256,
        **kwargs,
    }
    return ModelRunner(EngineConfig.from_kwargs(str(directory), **options))


def _prompt(seed: int, length: int) -> list[int]:
    return torch.randint(3, 384, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_bf16_logits_near_hf(checkpoint: tuple[Path, PreTrainedModel]) -> None:
    directory, hf = checkpoint
    runner = _runner(directory)
    assert runner.dtype == torch.bfloat16  # "auto" on GPU
    hf_bf16 = copy.deepcopy(hf).to("cuda", torch.bfloat16)
    prompts = [_prompt(1, 45), _prompt(2, 9), _prompt(3, 30)]
    reqs = PagedRequests(PAGE_SIZE, NUM_PAGES)
    # Chunked prefill of the first prompt beside whole prompts, then a decode step of all three.
    plans = [
        reqs.step([(0, prompts[0][:20]), (1, prompts[1][:-1]), (2, prompts[2][:-1])]),
        reqs.step([(0, prompts[0][20:44]), (1, prompts[1][-1:]), (2, prompts[2][-1:])]),
        reqs.step([(0, prompts[0][44:])]),
    ]
    checked = {0: [19, 43, 44], 1: [7, 8], 2: [28, 29]}
    got: dict[int, list[torch.Tensor]] = {0: [], 1: [], 2: []}
    for plan in plans:
        idx, logits = runner.compute_logits(plan)
        for row, row_logits in zip(plan.rows[idx].tolist(), logits.cpu()):
            got[row].append(row_logits)
    for row, positions in checked.items():
        ref = hf_logits(hf_bf16, prompts[row])[positions]
        exact = hf_logits(hf, prompts[row])[positions]
        ours = torch.stack(got[row])
        # bf16 rounding differs in order between implementations: ask for agreement within the
        # error HF's own bf16 run makes against fp32, plus a margin.
        hf_error = (ref - exact).abs().max().item()
        assert (ours - ref).abs().max().item() <= 2 * hf_error + 0.05
        assert (ours - exact).abs().max().item() <= 2 * hf_error + 0.05


def test_fp32_greedy_ids_equal_hf(checkpoint: tuple[Path, PreTrainedModel]) -> None:
    directory, hf = checkpoint
    runner = _runner(directory, dtype="float32")
    hf_gpu = copy.deepcopy(hf).to("cuda")
    steps = 16
    prompts = [_prompt(10, 37), _prompt(11, 5), _prompt(12, 50)]
    greedy = SamplingParams(temperature=0.0, max_tokens=steps)
    for row, prompt in enumerate(prompts):
        runner.bind_row(row, greedy, prompt, [], [])
    reqs = PagedRequests(PAGE_SIZE, NUM_PAGES)
    outputs: dict[int, list[int]] = {row: [] for row in range(len(prompts))}
    plan = reqs.step(list(enumerate(prompts)))
    for _ in range(steps):
        idx, result, *_ = runner.execute(plan)
        for row, token in zip(plan.rows[idx].tolist(), result.token_ids.tolist()):
            outputs[row].append(token)
        plan = reqs.step([(row, out[-1:]) for row, out in outputs.items()])
    for row, prompt in enumerate(prompts):
        assert outputs[row] == hf_greedy(hf_gpu, prompt, steps)


def test_memory_profile_sizes_the_cache(checkpoint: tuple[Path, PreTrainedModel]) -> None:
    directory, _ = checkpoint
    runner = _runner(
        directory,
        num_kv_pages=None,
        gpu_memory_utilization=0.2,
        max_num_seqs=64,
        max_num_batched_tokens=2048,
    )
    report = runner.memory_report()
    assert report["peak_activations"] > 0
    assert runner.num_kv_pages * runner._kv_spec.bytes_per_page == runner.kv_cache.nbytes
    total = torch.cuda.mem_get_info()[1]
    assert torch.cuda.memory_allocated() <= 0.2 * total
    assert report["kv_cache"] > 0.1 * total / 2**30  # most of the share went to the cache


@pytest.mark.slow
def test_llama3_8b_dummy(tmp_path: Path) -> None:
    """Llama-3-8B's config with random weights: loads onto the GPU directly, profiles, and runs a
    long prefill and batched decode with finite logits."""
    LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        bos_token_id=128000,
        eos_token_id=128001,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    ).save_pretrained(str(tmp_path))
    runner = ModelRunner(EngineConfig(model=str(tmp_path), load_format="dummy"))
    report = runner.memory_report()
    assert 14.0 < report["weights"] < 16.0
    assert runner.num_kv_pages > 8192 // 64
    greedy = SamplingParams(temperature=0.0)
    reqs = PagedRequests(64, runner.num_kv_pages)
    for row in range(32):
        runner.bind_row(row, greedy, [1], [], [])
    prompt = list(range(1000, 5000))
    plan = reqs.step([(0, prompt)] + [(r, [r] * 50) for r in range(1, 32)])
    _, logits = runner.compute_logits(plan)
    assert logits.isfinite().all()
    plan = reqs.step([(r, [7]) for r in range(32)])
    idx, result, *_ = runner.execute(plan)
    assert idx.tolist() == list(range(32)) and result.token_ids.shape == (32,)
