"""Async scheduling: the engine plans and launches step n+1 before step n's tokens reach the
scheduler, with placeholders for the tokens still being sampled. Outputs must be those of
synchronous stepping for every KV format, precision and sparse-attention mode, through chunked
prefill, preemption, the prefix cache and seeded sampling with penalties; requests that end on a
token (stop ids, stop strings) lose only the extra step planned for them, and aborts end requests
with a prefix of their tokens. (tests/test_engine.py runs all of its tests in both modes; the
scheduler's side is in rust/scheduler/tests/async_scheduling.rs and the property test.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from omniserve import Engine, SamplingParams
from tiny_models import save_servable

PAGE = 16
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("async") / "llama3"
    # hidden 128: every quantized format's tiles fit; 3 layers for the streaming pattern below.
    save_servable("llama3", path, hidden_size=128, intermediate_size=256, num_hidden_layers=3)
    return path


@pytest.fixture(scope="module")
def pattern(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Streaming heads: layer 1 streams one KV head, layer 2 both (static_sparsity 0.5)."""
    directory = tmp_path_factory.mktemp("pattern")
    gates = [[0.9, 0.8], [0.1, 0.7], [0.05, 0.2]]
    (directory / "full_attention_heads.tsv").write_text(
        "".join("\t".join(map(str, row)) + "\n" for row in gates)
    )
    (directory / "config.json").write_text(json.dumps({"sink_size": 16, "recent_size": 32}))
    return directory


def _engine(path: Path, async_scheduling: bool, **options: object) -> Engine:
    defaults = {"device": "cpu", "dtype": "float32", "page_size": PAGE, "num_kv_pages": 128}
    return Engine.from_pretrained(
        path, **{**defaults, **options, "async_scheduling": async_scheduling}
    )


def _prompts(seed: int, lengths: tuple[int, ...] = (5, 23, 40, 1, 70, 17)) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 384, (n,), generator=g).tolist() for n in lengths]


def _greedy(max_tokens: int = 24) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def _run(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    """Every prompt, checking the scheduler's invariants after each step."""
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    finished = {}
    while engine.has_unfinished_requests():
        finished.update({o.request_id: o.token_ids for o in engine.step() if o.finished})
        engine._io.scheduler.check_invariants()
    assert engine.stats().idle
    return [finished[str(i)] for i in range(len(prompts))]


def test_the_default_follows_the_device(llama: Path) -> None:
    engine = Engine.from_pretrained(llama, device="cpu", num_kv_pages=32)
    assert engine._io.scheduler.config.async_scheduling is False


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"kv_cache_dtype": "int8"},
        {"kv_cache_dtype": "int4"},
        {"precision": "w4a8kv4", "load_format": "dummy"},
        {"precision": "w8a8kv8", "load_format": "dummy"},
        # Chunked prefill and a pool tight enough to preempt, with the prefix cache.
        {"max_num_batched_tokens": 32, "max_num_seqs": 4, "num_kv_pages": 9, "watermark": 0.0},
        {"sparse_decode": True, "token_budget": 2 * PAGE, "logical_pages_per_page": 2},
        "streaming",
    ],
    ids=["fp", "int8", "int4", "w4a8kv4", "w8a8kv8", "tight", "sparse", "streaming"],
)
def test_greedy_outputs_equal_synchronous_stepping(
    llama: Path, pattern: Path, options: dict[str, object] | str, device: str
) -> None:
    if options == "streaming":
        options = {
            "static_sparsity": 0.5,
            "attn_pattern": str(pattern),
            "prefill_sink_tokens": PAGE,
            "prefill_local_tokens": 2 * PAGE,
            "decode_sink_tokens": PAGE,
            "decode_local_tokens": 2 * PAGE,
        }
    assert isinstance(options, dict)
    prompts = _prompts(0)
    outputs, preemptions = {}, {}
    for mode in (False, True):
        engine = _engine(llama, mode, device=device, **options)
        # Twice: the second round finds the first round's prompts in the prefix cache.
        outputs[mode] = _run(engine, prompts, _greedy()) + _run(engine, prompts, _greedy())
        preemptions[mode] = engine.stats().num_preemptions
    assert outputs[True] == outputs[False]
    if "watermark" in options:
        assert preemptions[True] > 0 and preemptions[False] > 0


def test_seeded_sampling_with_penalties_equals_synchronous_stepping(llama: Path) -> None:
    """Counter-based seeded draws and the penalty tables ignore the tokens of dropped steps (a
    preempted request's in-flight token is re-bound away)."""
    params = SamplingParams(
        max_tokens=30, temperature=0.9, top_p=0.9, seed=7, repetition_penalty=1.3, ignore_eos=True
    )
    tight = {"num_kv_pages": 12, "watermark": 0.0, "max_num_seqs": 4}
    outputs = []
    for mode in (False, True):
        engine = _engine(llama, mode, **tight)
        outputs.append(_run(engine, _prompts(1), params))
        assert engine.stats().num_preemptions > 0
    assert outputs[1] == outputs[0]


def test_requests_ending_on_a_token_lose_only_the_extra_step(llama: Path) -> None:
    """A stop token and a stop string end a request one step before the engine learns of it;
    the step planned meanwhile is dropped: outputs, text and finish reasons are unchanged."""
    prompts = _prompts(2, (9, 31, 4))
    free = _engine(llama, False).generate(prompts, _greedy(), use_tqdm=False)
    params = [
        SamplingParams(max_tokens=24, temperature=0.0, stop_token_ids=[free[0].token_ids[5]]),
        SamplingParams(max_tokens=24, temperature=0.0, stop=[free[1].text[4:9]]),
        _greedy(),
    ]
    results = {}
    for mode in (False, True):
        engine = _engine(llama, mode)
        outs = engine.generate(prompts, params, use_tqdm=False)
        results[mode] = [(o.token_ids, o.text, o.finish_reason, o.stop_reason) for o in outs]
        assert engine.stats().idle
        engine._io.scheduler.check_invariants()
    assert results[True] == results[False]
    assert [r[2] for r in results[True]] == ["stop", "stop", "length"]


def test_an_abort_ends_a_request_with_a_prefix_of_its_tokens(llama: Path) -> None:
    prompts = _prompts(3, (12, 50))
    full = _engine(llama, False).generate(prompts, _greedy(40), use_tqdm=False)
    engine = _engine(llama, True)
    engine.add_request("keep", prompts[0], _greedy(40))
    engine.add_request("drop", prompts[1], _greedy(40))
    finished = {}
    for step in range(1000):
        if step == 8:
            engine.abort("drop")
        finished.update({o.request_id: o for o in engine.step() if o.finished})
        if not engine.has_unfinished_requests():
            break
    drop = finished["drop"]
    assert drop.finish_reason == "abort" and 0 < len(drop.token_ids) < 40
    assert drop.token_ids == full[1].token_ids[: len(drop.token_ids)]
    assert finished["keep"].token_ids == full[0].token_ids
    assert engine.stats().idle
