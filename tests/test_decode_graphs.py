"""CUDA graphs of decode-only steps (runner/decode_graphs.py).

CPU (always run): the captured batch sizes, padding rows' KV destination, the config switch.
GPU (`gpu` marker): an engine replaying graphs decodes what the eager engine decodes. Graphs size
the attention launch for max_model_len where eager steps size it for the batch's longest context,
so split-K partitions, and with them roundings, differ: the eager engine generates, both score
its sequences (teacher forcing; every step after the prefill is decode-only, so the graph engine
scores through its graphs), and logits must agree with greedy choices equal except at numerical
ties. Batches of 1, 3, 9 and 16 requests replay graphs of sizes 1, 4, 16 and 16 (padded rows).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from omniserve import Engine, SamplingParams
from omniserve.config import EngineConfig
from omniserve.runner.decode_graphs import capture_sizes
from omniserve.runner.kv_cache import KVCache, KVCacheSpec
from teacher_forcing import assert_engines_agree
from test_kernels_attention import KV4_LOGIT_TOLERANCE


def test_capture_sizes() -> None:
    assert capture_sizes(1) == [1]
    assert capture_sizes(3) == [1, 2, 3]
    assert capture_sizes(8) == [1, 2, 4, 8]
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 20]
    sizes = capture_sizes(256)
    assert sizes[:4] == [1, 2, 4, 8] and sizes[-1] == 256 and len(sizes) == 35
    assert all(b - a <= 8 for a, b in itertools.pairwise(sizes))


def test_null_rows_are_slot_zero_of_the_null_page() -> None:
    spec = KVCacheSpec(num_layers=1, page_size=16, num_kv_heads=3, head_dim=8, dtype=torch.float32)
    cache = KVCache(
        spec, num_pages=5, max_num_seqs=2, max_pages_per_seq=2, device=torch.device("cpu")
    )
    rows = cache.null_rows(4)
    assert rows.shape == (3, 4) and rows.dtype == torch.long
    # Page 0, offset 0 of each head: what `index` gives for position 0 of a row with no pages.
    want = cache.index(torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long))
    assert torch.equal(rows, want)


def test_enforce_eager_is_a_config_option() -> None:
    assert EngineConfig.from_kwargs("m").enforce_eager is False
    assert EngineConfig.from_kwargs("m", enforce_eager=True).enforce_eager is True


def test_cpu_engine_captures_nothing() -> None:
    engine = Engine.from_pretrained(device="cpu", num_kv_pages=64, max_num_seqs=4)
    assert engine.runner._graphs is None


gpu = pytest.mark.gpu
LOGIT_TOLERANCE = 0.02
"""Largest logit difference between graph and eager scoring, as a fraction of the largest |logit|
of the position, on an fp16 cache: both run the same kernels, only the attention's split-K
partitioning differs. A KV4 cache turns such roundings into whole code steps
(`KV4_LOGIT_TOLERANCE`, measured up to 10% here on the H100)."""
TIE_RATE = 0.05


@gpu
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int4"])
@pytest.mark.parametrize("batch", [1, 3, 9, 16])
def test_graph_decode_matches_eager(kv_cache_dtype: str, batch: int) -> None:
    base = "def fibonacci(n):\n    if n < 2:\n        return n\n"
    prompts = [base * (1 + i % 4) + f"# case {i}\n" for i in range(batch)]
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    engines = {
        eager: Engine.from_pretrained(
            device="cuda",
            dtype="float16",
            page_size=16,
            num_kv_pages=512,
            max_num_seqs=16,
            kv_cache_dtype=kv_cache_dtype,
            enforce_eager=eager,
        )
        for eager in (True, False)
    }
    assert engines[True].runner._graphs is None
    graphs = engines[False].runner._graphs
    assert graphs is not None and graphs.sizes == [1, 2, 4, 8, 16]
    replays = []
    original = graphs.run
    graphs.run = lambda step: replays.append(step.input_ids.shape[0]) or original(step)  # type: ignore[method-assign]
    outputs = assert_engines_agree(  # the eager engine generates; only the graphs' scoring replays
        engines[True],
        engines[False],
        prompts,
        params,
        logit_tolerance=KV4_LOGIT_TOLERANCE if kv_cache_dtype == "int4" else LOGIT_TOLERANCE,
        max_tie_rate=TIE_RATE,
    )
    assert replays == [batch] * (params.max_tokens - 1), "every decode step replays a graph"
    tokens = [o.token_ids for o in outputs]
    # And the engine itself, free-running on its graphs, generates the eager engine's tokens.
    again = engines[False].generate(prompts, params, use_tqdm=False)
    agree = sum(a == b for o, g in zip(outputs, again) for a, b in zip(o.token_ids, g.token_ids))
    assert agree >= (1 - TIE_RATE) * sum(len(t) for t in tokens)
