"""Prefix caching end to end: requests that share a prompt prefix start after the pages an
earlier request computed (the scheduler's side is tested in rust/scheduler/tests/prefix_cache.rs),
and every output is the same as without the cache: greedy ids across KV formats, precisions and
page selection, through preemption and aborts, and prompt logprobs (whose requests compute every
token)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from omniserve import Engine, SamplingParams
from omniserve.errors import ConfigError
from tiny_models import hf_greedy, save_servable

PAGE = 16
SYSTEM = 40
"""Tokens of the shared system prompt: two full pages and half of a third."""
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    # hidden 128: every quantized format's tiles fit.
    path = tmp_path_factory.mktemp("prefix") / "llama3"
    return path, save_servable("llama3", path, hidden_size=128, intermediate_size=256)


def _prompts(seed: int) -> list[list[int]]:
    """A shared system prompt with suffixes of 0 to 30 tokens, the bare prompt twice (its last
    token always recomputed), and one prompt of its own."""
    g = torch.Generator().manual_seed(seed)
    system = torch.randint(3, 384, (SYSTEM,), generator=g).tolist()
    suffixes = [torch.randint(3, 384, (n,), generator=g).tolist() for n in (8, 1, 30, 0, 0, 24)]
    own = torch.randint(3, 384, (37,), generator=g).tolist()
    return [system + s for s in suffixes] + [own]


def _engine(path: Path, cached: bool, **options: object) -> Engine:
    defaults = {"device": "cpu", "dtype": "float32", "page_size": PAGE, "num_kv_pages": 128}
    return Engine.from_pretrained(path, **{**defaults, **options, "enable_prefix_caching": cached})


def _greedy(max_tokens: int = 10) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def _in_two_waves(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> list:
    """The first prompt alone, then the rest at once: they find its pages cached."""
    first = engine.generate(prompts[:1], params, use_tqdm=False)
    return [o.token_ids for o in first + engine.generate(prompts[1:], params, use_tqdm=False)]


def _assert_clean(engine: Engine) -> None:
    assert engine.stats().idle
    engine._io.scheduler.check_invariants()


@pytest.mark.parametrize("device", DEVICES)
def test_shared_prefixes_are_computed_once_and_match_transformers(
    llama: tuple[Path, torch.nn.Module], device: str
) -> None:
    path, hf = llama
    prompts = _prompts(0)
    engine = _engine(path, True, device=device)
    assert _in_two_waves(engine, prompts, _greedy()) == [hf_greedy(hf, p, 10) for p in prompts]
    stats = engine.stats()
    # Wave 2: four prompts hit the system prompt's two full pages; the own prompt none.
    assert stats.prefix_cache_hits == 4 * 2 * PAGE + 1 * 2 * PAGE  # the duplicate hits 1's pages
    assert stats.prefix_cache_queries == sum(len(p) for p in prompts)
    assert stats.prefix_cache_pages > 0
    _assert_clean(engine)


@pytest.mark.parametrize(
    "options",
    [
        {"kv_cache_dtype": "int8"},
        {"kv_cache_dtype": "int4"},
        {"precision": "w4a8kv4", "load_format": "dummy"},
        {"precision": "w4a8", "group_size": 128, "load_format": "dummy"},
        {"precision": "w8a8kv8", "load_format": "dummy"},
        {"sparse_decode": True, "token_budget": 2 * PAGE, "logical_pages_per_page": 2},
        pytest.param({"kv_cache_dtype": "int4"}, marks=pytest.mark.gpu, id="cuda-int4"),
    ],
    ids=lambda o: "-".join(f"{v}" for v in o.values()),
)
def test_greedy_outputs_are_identical_with_and_without_the_cache(
    llama: tuple[Path, torch.nn.Module], options: dict[str, object], request: pytest.FixtureRequest
) -> None:
    path, _ = llama
    if "cuda" in request.node.callspec.id:
        options = {**options, "device": "cuda"}
    prompts = _prompts(1)
    outputs = {}
    for cached in (False, True):
        engine = _engine(path, cached, **options)
        outputs[cached] = _in_two_waves(engine, prompts, _greedy(16))
        assert (engine.stats().prefix_cache_hits > 0) == cached
        _assert_clean(engine)
    assert outputs[True] == outputs[False]


def test_preemption_and_aborts_with_shared_pages(llama: tuple[Path, torch.nn.Module]) -> None:
    """A pool too small for every request: preempted requests come back through the cache
    (their own published pages and the system prompt's), and an abort mid-run releases shared
    pages without touching the other holders'."""
    path, hf = llama
    prompts = _prompts(2)
    expected = [hf_greedy(hf, p, 40) for p in prompts]
    # 15 usable pages of 16 tokens; each request grows to 4-6 pages.
    engine = _engine(path, True, num_kv_pages=16, watermark=0.0)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, _greedy(40))
    engine.add_request("aborted", prompts[0], _greedy(40))
    finished: dict[str, list[int]] = {}
    for step in range(10_000):
        if step == 6:
            engine.abort("aborted")
        finished.update({o.request_id: o.token_ids for o in engine.step() if o.finished})
        engine._io.scheduler.check_invariants()
        if not engine.has_unfinished_requests():
            break
    assert finished.pop("aborted") != expected[0]
    assert [finished[f"r{i}"] for i in range(len(prompts))] == expected
    stats = engine.stats()
    assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0
    _assert_clean(engine)


def test_prompt_logprobs_requests_compute_every_token(
    llama: tuple[Path, torch.nn.Module],
) -> None:
    path, _ = llama
    prompts = _prompts(3)
    params = SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=True, ignore_eos=True)
    scores = {}
    for cached in (False, True):
        engine = _engine(path, cached)
        engine.generate(prompts[:1], _greedy(), use_tqdm=False)  # caches the system prompt
        hits = engine.stats().prefix_cache_hits
        outs = engine.generate(prompts[1:3], params, use_tqdm=False)
        assert engine.stats().prefix_cache_hits == hits, "prompt-logprob requests look nothing up"
        scores[cached] = [o.prompt_logprobs for o in outs]
    for with_cache, without in zip(scores[True], scores[False]):
        assert with_cache is not None and without is not None
        assert with_cache[0] is None and None not in with_cache[1:]
        assert with_cache == pytest.approx(without, abs=1e-5)


def test_streaming_heads_turn_the_cache_off_by_default(tmp_path: Path) -> None:
    from omniserve.engine.engine import bundled_model_path

    engine = Engine.from_pretrained(
        bundled_model_path(),
        device="cpu",
        static_sparsity=0.5,
        num_kv_pages=64,
        max_num_seqs=4,
        max_model_len=512,
    )
    assert engine._io.scheduler.config.enable_prefix_caching is False
    prompt = list(range(3, 200))
    engine.generate([prompt, prompt], _greedy(2), use_tqdm=False)
    assert engine.stats().prefix_cache_queries == 0
    with pytest.raises(ConfigError, match="enable_prefix_caching needs static_sparsity 0"):
        Engine.from_pretrained(
            bundled_model_path(), device="cpu", static_sparsity=0.5, enable_prefix_caching=True
        )
