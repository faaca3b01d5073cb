"""Page selection at decode (LServe dynamic sparsity) end to end on CPU.

Greedy decode of a tiny model with `sparse_decode` equals a direct torch implementation written
here (HF's modules; each decode query's pages chosen by Quest's bound over the keys, by hand), per
KV head and per query head; a request within its budget, and every request under a budget that
covers its context, gets exactly the dense result, in a batch with long requests too; and the
result does not depend on how prefill is chunked; and the key statistics stay exact through
preemption and the reuse of freed pages. (A recompute after preemption prefills the generated
tokens again, densely: later tokens may then differ from an unpreempted run, as in any engine
whose prefill and decode attend differently.)
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from omniserve import Engine, SamplingParams
from omniserve.errors import ConfigError
from omniserve.outputs import RequestOutput
from omniserve.runner.model_runner import ModelRunner, PendingStep
from omniserve.runner.step_plan import StepPlan
from tiny_models import save_servable

PAGE, LOGICAL = 16, 4
LAYERS = 2


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    root = tmp_path_factory.mktemp("sparse-decode")
    hf = save_servable("llama3", root / "model", num_hidden_layers=LAYERS)
    return root / "model", hf


def _engine(path: Path, **options: object) -> Engine:
    defaults: dict[str, object] = {
        "device": "cpu",
        "dtype": "float32",
        "page_size": PAGE,
        "logical_pages_per_page": PAGE // LOGICAL,
        "num_kv_pages": 128,
        "max_num_seqs": 8,
        "max_model_len": 512,
        "sparse_decode": True,
        "token_budget": 3 * PAGE,
    }
    return Engine.from_pretrained(path, **{**defaults, **options})


def _greedy(n: int, logprobs: int | None = None) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, logprobs=logprobs)


def _prompts(seed: int, lengths: tuple[int, ...]) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 384, (n,), generator=g).tolist() for n in lengths]


def _selected_mask(
    q: torch.Tensor, k: torch.Tensor, prompt_len: int, budget_pages: int, per_query_head: bool
) -> torch.Tensor:
    """bool [q_heads, n, n]: what each query sees. Prompt queries: causal. A decode query at i:
    if its page i // PAGE has more than budget_pages - 1 pages before it, the budget_pages - 1 of
    those with the best bound (max over logical pages, and over the GQA group unless per query
    head, of sum_c max(q_c kmax_c, q_c kmin_c); ties to the lower page), and its own page."""
    heads, n, _ = q.shape
    group = heads // k.shape[0]
    chosen = budget_pages - 1
    mask = torch.ones(n, n).tril().bool().repeat(heads, 1, 1)
    for i in range(prompt_len, n):
        tail = i // PAGE
        if tail <= chosen:
            continue
        keys = k[:, : tail * PAGE].reshape(k.shape[0], -1, LOGICAL, k.shape[-1])
        lo, hi = keys.amin(2), keys.amax(2)  # [kv_heads, logical pages, dim]
        for kv in range(k.shape[0]):
            members = range(kv * group, (kv + 1) * group)
            selectors = [[h] for h in members] if per_query_head else [list(members)]
            for heads_of in selectors:
                bound = torch.stack(
                    [torch.maximum(q[h, i] * hi[kv], q[h, i] * lo[kv]).sum(-1) for h in heads_of]
                ).amax(0)  # [logical pages]
                page_score = bound.view(tail, PAGE // LOGICAL).amax(1)
                top = sorted(sorted(range(tail), key=lambda p: -page_score[p])[:chosen])
                seen = torch.zeros(n, dtype=torch.bool)
                for p in top:
                    seen[p * PAGE : (p + 1) * PAGE] = True
                seen[tail * PAGE : i + 1] = True
                for h in heads_of:
                    mask[h, i] = seen
    return mask


@torch.no_grad()
def _selected_logits(
    hf: torch.nn.Module, tokens: list[int], prompt_len: int, budget_pages: int, per_q: bool
) -> torch.Tensor:
    m = hf.model
    n = len(tokens)
    x = m.embed_tokens(torch.tensor([tokens]))
    cos, sin = m.rotary_emb(x, torch.arange(n)[None])
    for layer in m.layers:
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        d = attn.head_dim
        q = attn.q_proj(h).view(1, n, -1, d).transpose(1, 2)
        k = attn.k_proj(h).view(1, n, -1, d).transpose(1, 2)
        v = attn.v_proj(h).view(1, n, -1, d).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        mask = _selected_mask(q[0], k[0], prompt_len, budget_pages, per_q)
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        scores = (q @ k.transpose(2, 3)) * d**-0.5
        out = scores.masked_fill(~mask[None], float("-inf")).softmax(-1) @ v
        x = x + attn.o_proj(out.transpose(1, 2).reshape(1, n, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return hf.lm_head(m.norm(x))[0]


def _selected_greedy(
    hf: torch.nn.Module, prompt: list[int], n: int, budget_pages: int, per_q: bool
) -> list[int]:
    tokens = list(prompt)
    for _ in range(n):
        logits = _selected_logits(hf, tokens, len(prompt), budget_pages, per_q)
        tokens.append(int(logits[-1].argmax()))
    return tokens[len(prompt) :]


@pytest.mark.parametrize("page_selection", ["kv_head", "query_head"])
def test_greedy_equals_the_selected_model(
    model: tuple[Path, torch.nn.Module], page_selection: str
) -> None:
    path, hf = model
    # Longer than the budget (48 tokens), a page boundary inside the decode, and one that fits.
    prompts = _prompts(0, (150, 97, 20))
    per_q = page_selection == "query_head"
    expected = [_selected_greedy(hf, p, 20, 3, per_q) for p in prompts]
    engine = _engine(path, page_selection=page_selection, selector_interval=1)
    got = [o.token_ids for o in engine.generate(prompts, _greedy(20), use_tqdm=False)]
    assert got == expected
    dense = _engine(path, sparse_decode=False)
    dense_ids = [o.token_ids for o in dense.generate(prompts, _greedy(20), use_tqdm=False)]
    assert dense_ids[:2] != expected[:2], "the budget must cut something for this to mean much"
    assert dense_ids[2] == expected[2], "a request inside its budget is dense"


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8", "int4"])
def test_a_budget_covering_every_context_is_bit_equal_to_dense(
    model: tuple[Path, torch.nn.Module], kv_cache_dtype: str
) -> None:
    path, _ = model
    options = {"kv_cache_dtype": kv_cache_dtype, "max_num_batched_tokens": 40}
    sparse = _assert_a_covering_budget_equals_dense(path, _prompts(1, (150, 60, 33)), options)
    assert sparse.runner.selection is not None, "selection on: the budget is under max_model_len"


def _assert_a_covering_budget_equals_dense(
    path: Path, prompts: list[list[int]], options: dict[str, object]
) -> Engine:
    """Greedy tokens and logprobs of a 12-page budget (more than any of `prompts` reaches) equal
    those of dense decode, bit for bit; returns the selecting engine."""
    params = _greedy(24, logprobs=3)
    sparse = _engine(path, token_budget=12 * PAGE, **options)
    dense = _engine(path, sparse_decode=False, **options)
    for s, d in zip(
        sparse.generate(prompts, params, use_tqdm=False),
        dense.generate(prompts, params, use_tqdm=False),
        strict=True,
    ):
        assert s.token_ids == d.token_ids
        assert s.logprobs == d.logprobs
    return sparse


def test_a_short_request_beside_a_long_one_gets_its_dense_result(
    model: tuple[Path, torch.nn.Module],
) -> None:
    """Selection is decided per request, not by the batch's longest context: the short one
    attends its whole context and gets its dense result (alone or beside the long one, equal up
    to rounding: the torch path pads a decode group to its longest view, and the GEMMs' blocking
    follows the batch size), while the long one is selected."""
    path, _ = model
    short, long = _prompts(2, (20, 200))
    params = _greedy(28, logprobs=3)
    mixed = _engine(path).generate([short, long], params, use_tqdm=False)
    dense = _engine(path, sparse_decode=False).generate([short, long], params, use_tqdm=False)
    solo = _engine(path, sparse_decode=False).generate([short], params, use_tqdm=False)
    assert mixed[0].token_ids == dense[0].token_ids == solo[0].token_ids
    for other in (dense[0], solo[0]):
        assert mixed[0].logprobs and other.logprobs
        for a, b in zip(mixed[0].logprobs, other.logprobs, strict=True):
            assert a.logprob == pytest.approx(b.logprob, abs=1e-5)
            assert [t for t, _ in a.top] == [t for t, _ in b.top]
    assert mixed[1].token_ids != dense[1].token_ids, "the long one is selected"


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int4"])
def test_chunked_prefill_does_not_change_the_selection(
    model: tuple[Path, torch.nn.Module], kv_cache_dtype: str
) -> None:
    path, _ = model
    prompts = _prompts(3, (130, 75, 110, 50))
    one_shot = _engine(path, kv_cache_dtype=kv_cache_dtype)
    # Chunks of up to 24 tokens, split mid-page and mid-logical-page.
    sliced = _engine(
        path,
        kv_cache_dtype=kv_cache_dtype,
        max_num_batched_tokens=24,
        long_prefill_token_threshold=17,
        max_partial_prefills=2,
    )
    want = [o.token_ids for o in one_shot.generate(prompts, _greedy(40), use_tqdm=False)]
    got = [o.token_ids for o in sliced.generate(prompts, _greedy(40), use_tqdm=False)]
    assert got == want


def _assert_stats_match_the_cache(runner: ModelRunner, plan: StepPlan) -> None:
    """Every logical page the plan's requests hold (positions before their step's end) has as
    statistics the min and max of the keys the cache holds there, in every layer."""
    cache = runner.kv_cache
    for i, layer in enumerate(runner.model.attention_layers):
        stats = cache.layer_key_stats(i)
        for row, end in zip(plan.rows.tolist(), (plan.pos0 + plan.num_new).tolist(), strict=True):
            rows = cache.index(
                torch.tensor(row, device=stats.device), torch.arange(end, device=stats.device)
            ).flatten()
            keys = layer.k_cache.read(rows)
            pages = rows // LOGICAL
            want = torch.stack(
                [
                    torch.full_like(stats[:, 0], float("inf")).index_reduce_(
                        0, pages, keys, "amin"
                    ),
                    torch.full_like(stats[:, 0], float("-inf")).index_reduce_(
                        0, pages, keys, "amax"
                    ),
                ],
                1,
            )
            held = pages.unique()
            assert torch.equal(stats[held], want[held]), f"layer {i}, row {row}"


@pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu, id="cuda-fused")]
)
def test_statistics_stay_exact_through_preemption_and_page_reuse(
    model: tuple[Path, torch.nn.Module], device: str, tmp_path: Path
) -> None:
    """On CUDA (fp16, head_dim 64: the kernels' shapes) the RoPE + KV write kernel folds the keys
    of decode steps (in the decode graphs too), `update_key_stats` those of prefill chunks."""
    path, _ = model
    gpu: dict[str, object] = {}
    if device == "cuda":
        path = tmp_path / "m"
        save_servable("llama3", path, num_hidden_layers=LAYERS, hidden_size=256)
        gpu = {"device": "cuda", "dtype": "float16"}
    # 22 usable pages for four requests that grow to 5-10 pages: preemption, recompute, and
    # pages freed by one request written by another.
    engine = _engine(
        path,
        num_kv_pages=23,
        watermark=0.0,
        max_num_batched_tokens=24,
        max_partial_prefills=2,
        **gpu,
    )
    if gpu:
        assert engine.runner.kernels.rope_kv.kernel and engine.runner._graphs is not None
    launch = engine.runner.launch
    checked_steps = 0

    def checked(plan: StepPlan) -> PendingStep:
        nonlocal checked_steps
        out = launch(plan)
        _assert_stats_match_the_cache(engine.runner, plan)
        checked_steps += 1
        return out

    engine.runner.launch = checked  # type: ignore[method-assign]
    outs = engine.generate(_prompts(4, (130, 75, 110, 50)), _greedy(40), use_tqdm=False)
    assert all(len(o.token_ids) == 40 for o in outs)
    assert engine.stats().num_preemptions > 0
    assert checked_steps > 0  # the check ran (it wraps what the engine calls)


def test_options_are_checked(model: tuple[Path, torch.nn.Module]) -> None:
    path, _ = model
    with pytest.raises(ConfigError, match="token_budget must cover at least two pages"):
        _engine(path, token_budget=PAGE)
    with pytest.raises(ConfigError, match="logical_pages_per_page"):
        _engine(path, logical_pages_per_page=3)


def test_a_budget_over_max_model_len_turns_selection_off(
    model: tuple[Path, torch.nn.Module], caplog: pytest.LogCaptureFixture
) -> None:
    path, _ = model
    with caplog.at_level(logging.INFO, logger="omniserve.runner.selection"):
        engine = _engine(path, token_budget=4096)
    assert engine.runner.selection is None
    assert "covers max_model_len" in caplog.text
    assert engine.runner.kv_cache.key_stats is None


def test_the_statistics_take_their_share_of_the_cache_memory(
    model: tuple[Path, torch.nn.Module],
) -> None:
    path, _ = model
    dense = _engine(path, sparse_decode=False, num_kv_pages=None, cpu_kv_cache_gib=0.01)
    sparse = _engine(path, num_kv_pages=None, cpu_kv_cache_gib=0.01)
    spec = sparse.runner.kv_cache.spec
    # fp32 K and V rows of head_dim values, and a min and a max per LOGICAL keys.
    row = 2 * spec.head_dim * 4
    stats = 2 * spec.head_dim * 4 / LOGICAL
    ratio = dense.runner.num_kv_pages / sparse.runner.num_kv_pages
    assert ratio == pytest.approx((row + stats) / row, rel=0.02)


def _agree(a: RequestOutput, b: RequestOutput, tolerance: float) -> bool:
    """Whether b generated a's tokens with a's logprobs, within `tolerance`. A near-tie of two
    pages' scores that selects differently moves the logprobs before (or without) changing
    a token, so either counts as parting ways."""
    assert a.logprobs and b.logprobs
    return all(
        x.token_id == y.token_id and abs(x.logprob - y.logprob) <= tolerance
        for x, y in zip(a.logprobs, b.logprobs, strict=True)
    )


def _streaming_options(directory: Path) -> dict[str, object]:
    """Static sparsity beside selection: layer 1's KV head 0 streams (sink 1 page, local 2)."""
    directory.mkdir()
    (directory / "full_attention_heads.tsv").write_text("0.9\t0.8\n0.1\t0.7\n")
    (directory / "config.json").write_text(json.dumps({"sink_size": 16, "recent_size": 32}))
    return {
        "static_sparsity": 0.25,
        "attn_pattern": str(directory),
        "prefill_sink_tokens": 16,
        "prefill_local_tokens": 32,
        "decode_sink_tokens": 16,
        "decode_local_tokens": 32,
    }


@pytest.mark.gpu
@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8", "int4"])
def test_gpu_kernels_and_graphs_agree_with_the_torch_path(
    tmp_path: Path, kv_cache_dtype: str, streaming: bool
) -> None:
    """The scoring kernel, the decode kernel's selected views (with streaming heads in the same
    launch, or none) and the decode graphs, against the torch reference, in fp16 on head_dim 64.
    Near-ties of two pages' scores may select differently, so most (not all) sequences must
    agree whole."""
    save_servable("llama3", tmp_path / "m", num_hidden_layers=LAYERS, hidden_size=256)
    options: dict[str, object] = {
        "device": "cuda",
        "dtype": "float16",
        "kv_cache_dtype": kv_cache_dtype,
        "max_num_batched_tokens": 64,
        **(_streaming_options(tmp_path / "pattern") if streaming else {}),
    }
    fast = _engine(tmp_path / "m", **options)
    assert fast.runner.kernels.decode_attention.kernel and fast.runner._graphs is not None
    torch_path = _engine(tmp_path / "m", attention_backend="torch", **options)
    prompts = _prompts(7, (190, 130, 77, 20))
    params = _greedy(24, logprobs=1)
    tolerance = 0.1 if kv_cache_dtype == "int4" else 0.03
    outs = zip(
        fast.generate(prompts, params, use_tqdm=False),
        torch_path.generate(prompts, params, use_tqdm=False),
        strict=True,
    )
    agree = [_agree(a, b, tolerance) for a, b in outs]
    assert sum(agree) >= 3, f"sequences generated alike: {agree}"


@pytest.mark.gpu
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8", "int4"])
def test_gpu_budget_covering_every_context_is_bit_equal_to_dense(
    tmp_path: Path, kv_cache_dtype: str
) -> None:
    """On the kernels too (eager, so both engines size their launches by the step's lengths)."""
    save_servable("llama3", tmp_path / "m", num_hidden_layers=LAYERS, hidden_size=256)
    options: dict[str, object] = {
        "device": "cuda",
        "dtype": "float16",
        "kv_cache_dtype": kv_cache_dtype,
        "enforce_eager": True,
    }
    sparse = _assert_a_covering_budget_equals_dense(
        tmp_path / "m", _prompts(8, (150, 60, 33)), options
    )
    assert sparse.runner.kernels.decode_attention.kernel and sparse.runner.selection is not None
