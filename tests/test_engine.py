"""The engine end to end on tiny random checkpoints: greedy ids equal HF transformers' (fp32) however
the scheduler slices the work (batching, chunked prefill, preemption, late arrivals), and requests
end cleanly (stop strings, aborts, bad input) without leaking pages. Every test runs with the
engine stepping synchronously and with async scheduling (step n+1 planned before step n's tokens
are in)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from omniserve import Engine, SamplingParams
from omniserve.errors import (
    ConfigError,
    InvalidRequestError,
    OmniserveError,
    RequestRejectedError,
)
from tiny_models import FAMILIES, VOCAB_SIZE, hf_greedy, save_checkpoint, save_servable

PROMPT_LENGTHS = (5, 23, 40, 1)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
NEW_TOKENS = 12
_ASYNC = {"async_scheduling": False}
"""The scheduling mode `_engine` builds engines with; the `scheduling` fixture sets it."""


@pytest.fixture(autouse=True, params=[False, True], ids=["sync", "async"])
def scheduling(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(_ASYNC, "async_scheduling", request.param)


def _checkpoint(root: Path, family: str) -> tuple[Path, torch.nn.Module]:
    path = root / family
    return path, save_servable(family, path)


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    return _checkpoint(tmp_path_factory.mktemp("ckpt"), "llama3")


def _prompts(seed: int = 0, lengths: tuple[int, ...] = PROMPT_LENGTHS) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 384, (n,), generator=g).tolist() for n in lengths]


def _greedy(max_tokens: int = NEW_TOKENS) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def _engine(path: Path, **options: object) -> Engine:
    # An explicit pool: on CUDA the memory profile would otherwise claim most of the card.
    defaults = {"device": "cpu", "dtype": "float32", "page_size": 16, "num_kv_pages": 256}
    return Engine.from_pretrained(path, **{**defaults, **_ASYNC, **options})


def _assert_clean(engine: Engine) -> None:
    assert engine.stats().idle
    engine._io.scheduler.check_invariants()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_greedy_matches_transformers_batched(tmp_path: Path, family: str, device: str) -> None:
    path, hf = _checkpoint(tmp_path, family)
    prompts = _prompts()
    expected = [hf_greedy(hf, p, NEW_TOKENS) for p in prompts]
    engine = _engine(path, device=device)
    single = [engine.generate([p], _greedy(), use_tqdm=False)[0].token_ids for p in prompts]
    batched = [o.token_ids for o in engine.generate(prompts, _greedy(), use_tqdm=False)]
    assert single == expected
    assert batched == expected
    _assert_clean(engine)


@pytest.mark.parametrize("device", DEVICES)
def test_chunked_prefill_gives_the_same_tokens(
    llama: tuple[Path, torch.nn.Module], device: str
) -> None:
    path, hf = llama
    prompts = _prompts(1, (70, 33, 9))
    expected = [hf_greedy(hf, p, NEW_TOKENS) for p in prompts]
    engine = _engine(
        path,
        device=device,
        max_num_seqs=8,
        max_num_batched_tokens=24,
        long_prefill_token_threshold=7,
        max_partial_prefills=2,
    )
    outs = engine.generate(prompts, _greedy(), use_tqdm=False)
    assert [o.token_ids for o in outs] == expected
    _assert_clean(engine)


@pytest.mark.parametrize("device", DEVICES)
def test_preemption_under_a_small_page_pool_gives_the_same_tokens(
    llama: tuple[Path, torch.nn.Module], device: str
) -> None:
    path, hf = llama
    prompts = _prompts(2, (30, 31, 17, 29, 25, 12))
    expected = [hf_greedy(hf, p, 40) for p in prompts]
    # 12 usable pages of 16 tokens: each request grows to 3-5 pages, so they cannot all run.
    engine = _engine(path, device=device, num_kv_pages=13, watermark=0.0)
    outs = engine.generate(prompts, _greedy(40), use_tqdm=False)
    assert [o.token_ids for o in outs] == expected
    assert engine.stats().num_preemptions > 0
    _assert_clean(engine)


def test_requests_arriving_mid_run(llama: tuple[Path, torch.nn.Module]) -> None:
    path, hf = llama
    prompts = _prompts(3, (12, 40, 7, 19))
    expected = {f"r{i}": hf_greedy(hf, p, NEW_TOKENS) for i, p in enumerate(prompts)}
    engine = _engine(path, max_num_seqs=8, max_num_batched_tokens=32)
    results = {}
    pending = list(enumerate(prompts))
    steps = 0
    while pending or engine.has_unfinished_requests():
        if pending and steps % 3 == 0:
            i, p = pending.pop(0)
            engine.add_request(f"r{i}", p, _greedy())
        results.update({o.request_id: o.token_ids for o in engine.step() if o.finished})
        steps += 1
    assert results == expected
    _assert_clean(engine)


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_sampling_is_reproducible_and_batch_independent(
    llama: tuple[Path, torch.nn.Module], device: str
) -> None:
    path, _ = llama
    prompts = _prompts(4, (10, 20, 5))
    params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    engine = _engine(path, device=device)
    first = [o.token_ids for o in engine.generate(prompts, params, use_tqdm=False)]
    again = [o.token_ids for o in engine.generate(prompts, params, use_tqdm=False)]
    alone = engine.generate([prompts[1]], params, use_tqdm=False)[0].token_ids
    assert first == again
    assert alone == first[1]
    other_seed = SamplingParams(max_tokens=16, temperature=1.0, seed=99, ignore_eos=True)
    assert engine.generate([prompts[1]], other_seed, use_tqdm=False)[0].token_ids != first[1]


def test_abort_frees_pages_and_reports(llama: tuple[Path, torch.nn.Module]) -> None:
    path, hf = llama
    engine = _engine(path)
    prompts = _prompts(5, (30, 20))
    engine.add_request("keep", prompts[0], _greedy(20))
    engine.add_request("drop", prompts[1], _greedy(200))
    engine.add_request("never-ran", prompts[1], _greedy(5))
    engine.abort("never-ran")
    finished = {}
    for _ in range(3):
        finished.update({o.request_id: o for o in engine.step() if o.finished})
    assert engine.stats().dense_pages_used > 0
    engine.abort("drop")
    engine.abort("drop")  # idempotent
    engine.abort("unknown")  # ignored
    while engine.has_unfinished_requests():
        finished.update({o.request_id: o for o in engine.step() if o.finished})
    assert finished["drop"].finish_reason == "abort"
    assert finished["never-ran"].finish_reason == "abort"
    assert finished["never-ran"].token_ids == []
    assert finished["keep"].finish_reason == "length"
    assert finished["keep"].token_ids == hf_greedy(hf, prompts[0], 20)
    _assert_clean(engine)


def test_stop_strings_never_leak(llama: tuple[Path, torch.nn.Module]) -> None:
    path, _ = llama
    engine = _engine(path)
    prompt = "def add(a, b):"
    full = engine.generate([prompt], _greedy(24), use_tqdm=False)[0]
    assert len(full.text) > 6
    stop = full.text[3:6]
    cut = engine.generate(
        [prompt],
        SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, stop=[stop]),
        use_tqdm=False,
    )[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == full.text[: full.text.index(stop)]
    assert stop not in cut.text
    kept = engine.generate(
        [prompt],
        SamplingParams(
            max_tokens=24,
            temperature=0.0,
            ignore_eos=True,
            stop=[stop],
            include_stop_str_in_output=True,
        ),
        use_tqdm=False,
    )[0]
    assert kept.text == full.text[: full.text.index(stop) + len(stop)]
    _assert_clean(engine)


def test_stop_token_and_min_tokens(llama: tuple[Path, torch.nn.Module]) -> None:
    path, _ = llama
    engine = _engine(path)
    prompt = _prompts(6, (15,))[0]
    free = engine.generate([prompt], _greedy(16), use_tqdm=False)[0].token_ids
    stop_id = free[4]
    out = engine.generate(
        [prompt],
        SamplingParams(max_tokens=16, temperature=0.0, stop_token_ids=(stop_id,)),
        use_tqdm=False,
    )[0]
    first = free.index(stop_id)
    assert out.finish_reason == "stop" and out.stop_reason == stop_id
    assert out.token_ids == free[: first + 1]
    late = engine.generate(
        [prompt],
        SamplingParams(
            max_tokens=16, temperature=0.0, stop_token_ids=(stop_id,), min_tokens=first + 2
        ),
        use_tqdm=False,
    )[0]
    assert len(late.token_ids) >= first + 2


def test_delta_outputs_add_up(llama: tuple[Path, torch.nn.Module]) -> None:
    path, _ = llama
    engine = _engine(path)
    final = engine.generate(["class Engine:"], _greedy(10), use_tqdm=False)[0]
    engine.add_request("d", "class Engine:", _greedy(10), output_kind="delta")
    tokens: list[int] = []
    text = ""
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens += out.token_ids
            text += out.text
    assert tokens == final.token_ids and text == final.text


def test_logprobs(llama: tuple[Path, torch.nn.Module]) -> None:
    path, hf = llama
    prompt = _prompts(7, (9,))[0]
    engine = _engine(path)
    out = engine.generate(
        [prompt],
        SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True, logprobs=2),
        use_tqdm=False,
    )[0]
    assert out.logprobs is not None and len(out.logprobs) == 3
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([prompt])).logits[0, -1].float(), -1)
    first = out.logprobs[0]
    assert first.token_id == out.token_ids[0]
    assert first.logprob == pytest.approx(ref[first.token_id].item(), abs=1e-4)
    assert [t for t, _ in first.top] == ref.topk(2).indices.tolist()


def test_bad_input_is_rejected_and_the_engine_keeps_serving(
    llama: tuple[Path, torch.nn.Module],
) -> None:
    path, hf = llama
    engine = _engine(path, max_model_len=128)
    with pytest.raises(RequestRejectedError):
        engine.add_request("long", list(range(3, 200)), _greedy())
    with pytest.raises(InvalidRequestError, match="vocabulary"):
        engine.add_request("oov", [5, 100000], _greedy())
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.add_request("empty", [], _greedy())
    with pytest.raises(InvalidRequestError):
        SamplingParams(temperature=-1.0)
    # What the sampler and the scheduler's binding rely on, refused at intake with the field named.
    for params, field in (
        (SamplingParams(stop_token_ids=[VOCAB_SIZE]), "stop_token_ids"),
        (SamplingParams(stop_token_ids=[2**40]), "stop_token_ids"),
        (SamplingParams(max_tokens=2**64), "max_tokens"),
        (SamplingParams(max_tokens=126), "max_tokens"),  # 128 - 3 prompt tokens leave 125
    ):
        with pytest.raises(InvalidRequestError, match=field):
            engine.add_request("bad", [5, 6, 7], params)
    with pytest.raises(InvalidRequestError, match="priority"):
        engine.add_request("bad", [5, 6, 7], _greedy(), priority=2**70)
    with pytest.raises(InvalidRequestError, match="SamplingParams"):
        engine.add_request("bad", [5, 6, 7], {"max_tokens": 3})  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="sequence of token ids"):
        engine.generate([None], use_tqdm=False)  # type: ignore[list-item]
    engine.add_request("room", [5, 6, 7], SamplingParams(max_tokens=125, ignore_eos=True))
    engine.abort("room")
    engine.add_request("ok", [5, 6, 7], _greedy())
    with pytest.raises(InvalidRequestError, match="already in use"):
        engine.add_request("ok", [5, 6, 7], _greedy())
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert outs[-1].token_ids == hf_greedy(hf, [5, 6, 7], NEW_TOKENS)
    _assert_clean(engine)


def test_a_failure_in_one_requests_output_ends_only_that_request(
    llama: tuple[Path, torch.nn.Module],
) -> None:
    """A fault injected into one request's output handling (at its 3rd token: a stop-string
    check or the detokenizer failing, say) ends it with finish reason "error" and frees its pages; the
    batch's other requests get exactly what they get alone, and the engine keeps serving."""
    path, hf = llama
    engine = _engine(path)
    append = engine._append_token

    def faulty(req, token, *args):  # type: ignore[no-untyped-def]
        if req.request_id == "bad" and len(req.token_ids) == 2:
            raise RuntimeError("injected")
        return append(req, token, *args)

    engine._append_token = faulty  # type: ignore[method-assign]
    prompts = _prompts()
    for i, prompt in enumerate(prompts):
        engine.add_request("bad" if i == 1 else f"r{i}", prompt, _greedy())
    outs = {}
    while engine.has_unfinished_requests():
        outs.update({o.request_id: o for o in engine.step() if o.finished})
    bad = outs.pop("bad")
    assert bad.finish_reason == "error" and bad.error == "RuntimeError: injected"
    assert len(bad.token_ids) == 2  # the tokens recorded before the fault
    for i, prompt in enumerate(prompts):
        if i != 1:
            assert outs[f"r{i}"].token_ids == hf_greedy(hf, prompt, NEW_TOKENS)
    _assert_clean(engine)
    assert engine.generate([prompts[1]], _greedy(), use_tqdm=False)[0].token_ids == hf_greedy(
        hf, prompts[1], NEW_TOKENS
    )


def test_a_sampling_failure_confined_to_one_row_ends_only_that_request(
    llama: tuple[Path, torch.nn.Module],
) -> None:
    """A fault in the batched sampler that only one request's row causes (at its 3rd token):
    the batch is sampled again row by row, that request ends with "error", and the others get
    the tokens and logprobs they get without the fault."""
    path, hf = llama
    prompts = _prompts()
    bad_params = _greedy()
    with_logprobs = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, logprobs=2)
    expected = _engine(path).generate(prompts[:1], with_logprobs, use_tqdm=False)[0]

    engine = _engine(path)
    sampler = engine.runner.sampler
    bind, sample = sampler.bind_row, sampler.sample
    bad_row: list[int] = []

    def binding(row, params, *args):  # type: ignore[no-untyped-def]
        if params is bad_params:
            bad_row[:] = [row]
        return bind(row, params, *args)

    def faulty(logits, rows):  # type: ignore[no-untyped-def]
        if bad_row and bad_row[0] in rows.tolist() and sampler._num_out[bad_row[0]] == 2:
            raise RuntimeError("injected")
        return sample(logits, rows)

    sampler.bind_row, sampler.sample = binding, faulty  # type: ignore[method-assign]
    engine.add_request("r0", prompts[0], with_logprobs)
    engine.add_request("bad", prompts[1], bad_params)
    for i in (2, 3):
        engine.add_request(f"r{i}", prompts[i], _greedy())
    outs = {}
    while engine.has_unfinished_requests():
        outs.update({o.request_id: o for o in engine.step() if o.finished})
    bad = outs.pop("bad")
    assert bad.finish_reason == "error" and bad.error == "RuntimeError: injected"
    assert len(bad.token_ids) == 2
    assert outs["r0"].token_ids == expected.token_ids
    got, want = outs["r0"].logprobs, expected.logprobs
    assert got is not None and want is not None
    # Alone or in a batch of 4, the forward pass rounds differently (1e-6).
    assert [[t for t, _ in lp.top] for lp in got] == [[t for t, _ in lp.top] for lp in want]
    assert [v for lp in got for _, v in lp.top] == pytest.approx(
        [v for lp in want for _, v in lp.top], abs=1e-4
    )
    for i in (2, 3):
        assert outs[f"r{i}"].token_ids == hf_greedy(hf, prompts[i], NEW_TOKENS)
    _assert_clean(engine)


def test_config_and_checkpoint_errors_are_clear(
    llama: tuple[Path, torch.nn.Module], tmp_path: Path
) -> None:
    path, _ = llama
    with pytest.raises(ConfigError, match="page_size"):
        _engine(path, page_size=0)
    with pytest.raises(ConfigError, match="not_an_option"):
        Engine.from_pretrained(path, not_an_option=1)
    with pytest.raises(OmniserveError, match="nowhere"):
        Engine.from_pretrained(tmp_path / "nowhere", device="cpu")
    save_checkpoint("llama3", tmp_path / "no-tokenizer")
    with pytest.raises(ConfigError, match="tokenizer"):
        _engine(tmp_path / "no-tokenizer")
    bare = _engine(tmp_path / "no-tokenizer", skip_tokenizer_init=True)
    assert bare.generate([[5, 6, 7]], _greedy(3), use_tqdm=False)[0].text == ""


def test_prompt_logprobs_match_transformers_across_chunks_and_preemption(
    llama: tuple[Path, torch.nn.Module],
) -> None:
    path, hf = llama
    prompts = _prompts(8, (50, 37, 21))
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, prompt_logprobs=True)
    engine = _engine(path, max_num_seqs=4, max_num_batched_tokens=16, num_kv_pages=9, watermark=0.0)
    outs = engine.generate(prompts, params, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        with torch.no_grad():
            logits = hf(torch.tensor([prompt])).logits[0].float()
        ref = (
            torch.log_softmax(logits, -1)[:-1]
            .gather(1, torch.tensor(prompt[1:])[:, None])
            .squeeze(1)
        )
        assert out.prompt_logprobs is not None and out.prompt_logprobs[0] is None
        assert torch.allclose(torch.tensor(out.prompt_logprobs[1:]), ref, atol=1e-4)
    assert engine.stats().num_preemptions > 0
    _assert_clean(engine)


def test_generate_refuses_a_busy_engine(llama: tuple[Path, torch.nn.Module]) -> None:
    path, hf = llama
    engine = _engine(path)
    engine.add_request("mine", [5, 6, 7], _greedy())
    with pytest.raises(InvalidRequestError, match="idle engine"):
        engine.generate([[8, 9]], _greedy(), use_tqdm=False)
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert [o.request_id for o in outs] == ["mine"]
    assert outs[0].token_ids == hf_greedy(hf, [5, 6, 7], NEW_TOKENS)
    _assert_clean(engine)
