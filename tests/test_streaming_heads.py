"""Streaming heads (LServe static sparsity) end to end on CPU.

Greedy decode of a tiny model with a head pattern equals a direct torch implementation of the
Λ-masked model written here (HF's modules, attention and masks by hand), for prompts longer than
sink + local, however the scheduler slices the work (chunked prefill, preemption); a window
covering the whole context equals dense attention; and the ring index and visibility rule of
`formats/streaming.py` agree with each other and with a brute-force reading of the rule.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from omniserve import Engine, SamplingParams
from omniserve.errors import ConfigError
from omniserve.formats.streaming import StreamTable, StreamWindow
from omniserve.layers.attention import PagedAttention
from omniserve.runner.kv_cache import KVCache, KVCacheSpec, StreamPool
from teacher_forcing import assert_engines_agree
from tiny_models import save_servable

PAGE = 16
LAYERS, KV_HEADS = 3, 2
# Gates: layer 0 keeps both heads dense, layer 1 streams head 0, layer 2 streams both: at
# static_sparsity 0.5 (3 of 6 heads), every kind of split occurs.
GATES = [[0.9, 0.8], [0.1, 0.7], [0.05, 0.2]]
STREAM = torch.tensor([[False, False], [True, False], [True, True]])
WINDOWS = {  # tokens: prefill sees 1 sink + 3 local pages, decode 1 sink + 2 local pages
    "prefill_sink_tokens": 16,
    "prefill_local_tokens": 48,
    "decode_sink_tokens": 16,
    "decode_local_tokens": 32,
}


def _write_pattern(directory: Path, gates: list[list[float]]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    rows = ["\t".join(str(g) for g in row) for row in gates]
    (directory / "full_attention_heads.tsv").write_text("\n".join(rows) + "\n")
    (directory / "config.json").write_text(json.dumps({"sink_size": 16, "recent_size": 32}))
    return directory


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, torch.nn.Module]:
    root = tmp_path_factory.mktemp("streaming")
    hf = save_servable("llama3", root / "model", num_hidden_layers=LAYERS)
    return root / "model", _write_pattern(root / "pattern", GATES), hf


def _engine(path: Path, pattern: Path, **options: object) -> Engine:
    defaults: dict[str, object] = {
        "device": "cpu",
        "dtype": "float32",
        "page_size": PAGE,
        "num_kv_pages": 128,
        "max_num_seqs": 8,
        "static_sparsity": 0.5,
        "attn_pattern": str(pattern),
        **WINDOWS,
    }
    return Engine.from_pretrained(path, **{**defaults, **options})


def _greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def _prompts(seed: int, lengths: tuple[int, ...]) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 384, (n,), generator=g).tolist() for n in lengths]


def _lambda_logits(
    hf: torch.nn.Module, tokens: list[int], prompt_len: int, windows: dict[str, int]
) -> torch.Tensor:
    """Logits of the model whose streaming heads (STREAM) see, per query, the sink pages and the
    local pages before its own page plus that page; prompt queries under the prefill window,
    later ones under the decode window. Full recompute, plain attention."""
    m = hf.model
    n = len(tokens)
    x = m.embed_tokens(torch.tensor([tokens]))
    cos, sin = m.rotary_emb(x, torch.arange(n)[None])
    q_pos, k_pos = torch.arange(n)[:, None], torch.arange(n)[None, :]
    causal = k_pos <= q_pos

    def lam(sink_tokens: int, local_tokens: int) -> torch.Tensor:
        sink, local = -(-sink_tokens // PAGE), -(-local_tokens // PAGE)
        near = (k_pos // PAGE < sink) | (k_pos // PAGE >= q_pos // PAGE - local)
        return causal & near

    prefill = lam(windows["prefill_sink_tokens"], windows["prefill_local_tokens"])
    decode = lam(windows["decode_sink_tokens"], windows["decode_local_tokens"])
    streaming = torch.where(q_pos < prompt_len, prefill, decode)
    for li, layer in enumerate(m.layers):
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        d = attn.head_dim
        q = attn.q_proj(h).view(1, n, -1, d).transpose(1, 2)
        k = attn.k_proj(h).view(1, n, -1, d).transpose(1, 2)
        v = attn.v_proj(h).view(1, n, -1, d).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        masks = torch.stack(
            [streaming if STREAM[li, hq // group] else causal for hq in range(q.shape[1])]
        )
        scores = (q @ k.transpose(2, 3)) * d**-0.5
        out = scores.masked_fill(~masks[None], float("-inf")).softmax(-1) @ v
        x = x + attn.o_proj(out.transpose(1, 2).reshape(1, n, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return hf.lm_head(m.norm(x))[0]


@torch.no_grad()
def _lambda_greedy(
    hf: torch.nn.Module, prompt: list[int], n: int, windows: dict[str, int] = WINDOWS
) -> list[int]:
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(int(_lambda_logits(hf, tokens, len(prompt), windows)[-1].argmax()))
    return tokens[len(prompt) :]


def test_greedy_equals_the_lambda_masked_model(model: tuple[Path, Path, torch.nn.Module]) -> None:
    path, pattern, hf = model
    # Longer than sink + local in both windows (64 and 48 tokens), with page-boundary lengths.
    prompts = _prompts(0, (150, 97, 64, 33))
    expected = [_lambda_greedy(hf, p, 24) for p in prompts]
    engine = _engine(path, pattern)
    assert [o.token_ids for o in engine.generate(prompts, _greedy(24), use_tqdm=False)] == expected
    dense = _engine(path, pattern, static_sparsity=0.0)
    dense_ids = [o.token_ids for o in dense.generate(prompts, _greedy(24), use_tqdm=False)]
    assert dense_ids != expected, "the windows must cut something for this test to mean anything"
    _assert_clean(engine)


def test_chunked_prefill_and_preemption_give_the_lambda_model(
    model: tuple[Path, Path, torch.nn.Module],
) -> None:
    path, pattern, hf = model
    prompts = _prompts(1, (120, 70, 90, 45))
    expected = [_lambda_greedy(hf, p, 40) for p in prompts]
    # Chunks of up to 24 tokens (several per prompt, some of them split mid-page), and 20 usable
    # dense pages for four requests that grow to 6-11 pages: preemption and recompute happen.
    engine = _engine(
        path,
        pattern,
        num_kv_pages=21,
        watermark=0.0,
        max_num_batched_tokens=24,
        long_prefill_token_threshold=17,
        max_partial_prefills=2,
    )
    outs = engine.generate(prompts, _greedy(40), use_tqdm=False)
    assert [o.token_ids for o in outs] == expected
    assert engine.stats().num_preemptions > 0
    _assert_clean(engine)


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8", "int4"])
def test_a_window_covering_the_context_equals_dense(
    model: tuple[Path, Path, torch.nn.Module], kv_cache_dtype: str
) -> None:
    path, pattern, _ = model
    prompts = _prompts(2, (100, 37))
    wide = {name: 256 for name in WINDOWS}
    options = {"kv_cache_dtype": kv_cache_dtype, "max_num_batched_tokens": 32}
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, logprobs=2)
    sparse = _engine(path, pattern, **wide, **options).generate(prompts, params, use_tqdm=False)
    dense = _engine(path, pattern, static_sparsity=0.0, **options).generate(
        prompts, params, use_tqdm=False
    )
    for s, d in zip(sparse, dense, strict=True):
        assert s.token_ids == d.token_ids
        assert s.logprobs and d.logprobs
        for a, b in zip(s.logprobs, d.logprobs, strict=True):
            assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
            assert [t for t, _ in a.top] == [t for t, _ in b.top]


@pytest.mark.parametrize("kv_cache_dtype", ["int8", "int4"])
def test_quantized_streaming_cache_does_not_depend_on_scheduling(
    model: tuple[Path, Path, torch.nn.Module], kv_cache_dtype: str
) -> None:
    path, pattern, _ = model
    prompts = _prompts(3, (110, 66, 41))
    one_shot = _engine(path, pattern, kv_cache_dtype=kv_cache_dtype)
    sliced = _engine(
        path,
        pattern,
        kv_cache_dtype=kv_cache_dtype,
        num_kv_pages=19,
        watermark=0.0,
        max_num_batched_tokens=20,
    )
    want = [o.token_ids for o in one_shot.generate(prompts, _greedy(30), use_tqdm=False)]
    got = [o.token_ids for o in sliced.generate(prompts, _greedy(30), use_tqdm=False)]
    assert got == want
    assert sliced.stats().num_preemptions > 0


def test_teacher_forcing_scores_what_generation_computed(
    model: tuple[Path, Path, torch.nn.Module],
) -> None:
    """The GPU agreement test's harness on two equal CPU engines: a fresh engine's teacher-forced
    logits (its streaming tables and prompt lengths set by the harness) equal those of the engine
    that generated, and each position's greedy token is the one generated."""
    path, pattern, _ = model
    prompts = _prompts(8, (120, 70, 33))
    generating = _engine(path, pattern, max_num_batched_tokens=40)
    assert_engines_agree(
        generating,
        _engine(path, pattern, max_num_batched_tokens=40),
        prompts,  # type: ignore[arg-type]
        _greedy(25),
        logit_tolerance=1e-5,
        max_tie_rate=0.0,
    )


@pytest.mark.gpu
def test_gpu_torch_path_equals_the_lambda_model(model: tuple[Path, Path, torch.nn.Module]) -> None:
    path, pattern, hf = model
    prompts = _prompts(6, (150, 81))
    expected = [_lambda_greedy(hf, p, 20) for p in prompts]
    engine = _engine(path, pattern, device="cuda", max_num_batched_tokens=40)
    assert [o.token_ids for o in engine.generate(prompts, _greedy(20), use_tqdm=False)] == expected


@pytest.mark.gpu
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8", "int4"])
def test_gpu_kernels_agree_with_the_torch_path(tmp_path: Path, kv_cache_dtype: str) -> None:
    """FlexAttention prefill, the decode kernel's streaming heads, the fused RoPE + KV write into
    both pools and decode graphs, against SDPA under the dense mask and the gathered decode, in
    fp16 on head_dim 64 (the kernels' shapes)."""
    hf = save_servable("llama3", tmp_path / "m", num_hidden_layers=LAYERS, hidden_size=256)
    del hf
    pattern = _write_pattern(tmp_path / "pattern", GATES)
    options: dict[str, object] = {
        "device": "cuda",
        "dtype": "float16",
        "kv_cache_dtype": kv_cache_dtype,
        # Chunks of a tile or more take FlexAttention, shorter ones the dense mask: both occur.
        "max_num_batched_tokens": 256,
    }
    fast = _engine(tmp_path / "m", pattern, **options)
    assert fast.runner.kernels.stream_prefill.kernel
    assert fast.runner.kernels.decode_attention.kernel and fast.runner._graphs is not None
    torch_path = _engine(tmp_path / "m", pattern, attention_backend="torch", **options)
    prompts = _prompts(7, (190, 130, 77, 20))
    assert_engines_agree(
        fast,
        torch_path,
        prompts,  # type: ignore[arg-type]
        _greedy(30),
        logit_tolerance=0.1 if kv_cache_dtype == "int4" else 0.02,
        max_tie_rate=0.05,
    )


def test_stats_count_streaming_pages(model: tuple[Path, Path, torch.nn.Module]) -> None:
    path, pattern, _ = model
    engine = _engine(path, pattern, max_num_seqs=4)
    stats = engine.stats()
    # The default pool: a full table (1 sink + ring of 4 pages) for each of 4 rows, + null page.
    assert stats.stream_pages_total == 4 * 5
    engine.add_request("a", _prompts(4, (100,))[0], _greedy(50))
    engine.step()
    assert engine.stats().stream_pages_used == 5
    assert engine.stats().dense_pages_used == 7
    engine.add_request("b", _prompts(5, (20,))[0], _greedy(3))
    engine.step()
    # A request too short to wrap the ring gets only the pages it can reach (23 tokens: 2).
    assert engine.stats().stream_pages_used == 5 + 2


def test_static_sparsity_zero_has_no_streaming_pool(
    model: tuple[Path, Path, torch.nn.Module],
) -> None:
    path, pattern, _ = model
    engine = _engine(path, pattern, static_sparsity=0.0)
    assert engine.runner.streaming is None
    assert engine.stats().stream_pages_total == 0


def test_streaming_needs_a_pattern(model: tuple[Path, Path, torch.nn.Module]) -> None:
    path, _, _ = model
    with pytest.raises(ConfigError, match="needs a head pattern"):
        Engine.from_pretrained(path, device="cpu", static_sparsity=0.5, num_kv_pages=64)


def test_a_too_small_streaming_pool_is_a_clear_error(
    model: tuple[Path, Path, torch.nn.Module],
) -> None:
    path, pattern, _ = model
    with pytest.raises(ConfigError, match="streaming table needs 5"):
        _engine(path, pattern, num_stream_kv_pages=5)


def _assert_clean(engine: Engine) -> None:
    assert engine.stats().idle
    assert engine.stats().stream_pages_used == 0
    engine._io.scheduler.check_invariants()


# -- the rule and the ring -------------------------------------------------------------------


@pytest.mark.parametrize("sink,local", [(0, 0), (1, 2), (2, 3), (3, 0)])
def test_visible_pages_list_exactly_what_the_rule_lets_a_query_see(sink: int, local: int) -> None:
    window = StreamWindow(sink, local, 4)
    table = StreamTable.serving(window, StreamWindow(1, 5, 4))
    q_pos = torch.arange(60)
    pages, count = table.visible_pages(
        q_pos, torch.full_like(q_pos, sink), torch.full_like(q_pos, local)
    )
    for q in range(60):
        seen = {
            int(k) // 4 for k in range(q + 1) if window.visible(torch.tensor(q), torch.tensor(k))
        }
        listed = pages[q, : count[q]].tolist()
        assert listed == sorted(seen), q


def test_ring_columns_hold_every_visible_page_of_the_latest_query() -> None:
    windows = (StreamWindow(2, 3, 4), StreamWindow(1, 5, 4))
    table = StreamTable.serving(*windows)
    assert (table.sink_pages, table.ring_pages) == (2, 6)
    for last in range(80):
        held = {}
        for pos in range(last + 1):  # written in order: a later page takes its ring column
            held[int(table.column(torch.tensor(pos // 4)))] = pos // 4
        for window in windows:
            for k in range(last + 1):
                if window.visible(torch.tensor(last), torch.tensor(k)):
                    assert held[int(table.column(torch.tensor(k // 4)))] == k // 4


def test_only_the_last_writer_of_a_ring_slot_survives_a_step() -> None:
    table = StreamTable(1, 3, 4)
    pos = torch.arange(40)
    keep = table.survives(pos, torch.tensor(39))
    slots = table.column(pos // 4) * 4 + pos % 4
    survivors = slots[keep]
    assert survivors.unique().numel() == survivors.numel()
    for slot in slots.unique():  # the survivor of each slot is its latest writer
        writers = pos[slots == slot]
        assert keep[writers].tolist() == [False] * (len(writers) - 1) + [True]


def test_each_layer_lays_out_dense_heads_then_streaming_heads() -> None:
    spec = KVCacheSpec(3, 16, 3, 8, torch.float32, stream_heads=((1,), (), (0, 2)))
    cache = KVCache(spec, 5, 2, 4, torch.device("cpu"), stream=StreamPool(4, StreamTable(1, 2, 16)))
    dense, stream = 5 * 16, 4 * 16
    layers = [PagedAttention(6, 3, 8, None, fused_rope_kv=False) for _ in range(3)]
    cache.bind(layers)
    assert [layer.heads.base.tolist() for layer in layers] == [
        [0, 2 * dense, dense],  # heads 0, 2 dense; head 1 streams
        [0, dense, 2 * dense],  # the dense layout
        [dense, 0, dense + stream],  # head 1 dense; heads 0, 2 stream
    ]
    assert layers[0].heads.stream_q.tolist() == [2, 3]  # two query heads per KV head
    rows = [2 * dense + stream, 3 * dense, dense + 2 * stream]
    assert [cache.layer_storage(i).shape[1] for i in range(3)] == rows
    assert cache.storage.shape[0] == 2 * sum(rows)
    assert spec.bytes_per_page == 2 * 16 * (9 - 3) * 8 * 4
    assert spec.bytes_per_stream_page == 2 * 16 * 3 * 8 * 4
