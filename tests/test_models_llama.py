"""Our Llama-family decoder against HF transformers (fp32, CPU), driven through ModelRunner with
hand-built step plans: whole prompts, chunked prefill, batches, mixed batches and greedy decode."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch
from transformers import PreTrainedModel

from omniserve.config import EngineConfig
from omniserve.runner.model_runner import ModelRunner
from omniserve.runner.step_plan import StepPlan
from omniserve.sampling_params import SamplingParams
from tiny_models import FAMILIES, PagedRequests, hf_greedy, hf_logits, save_checkpoint

PAGE_SIZE = 16
NUM_PAGES = 96
ATOL = RTOL = 1e-4


@dataclass
class Pair:
    hf: PreTrainedModel
    runner: ModelRunner

    def requests(self, seed: int = 0) -> PagedRequests:
        # Fresh page bookkeeping per test: every test writes its requests' KV before reading it.
        return PagedRequests(PAGE_SIZE, NUM_PAGES, seed)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def pair(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pair]:
    directory = tmp_path_factory.mktemp(request.param)
    hf = save_checkpoint(request.param, directory)
    config = EngineConfig(
        model=str(directory),
        device="cpu",
        page_size=PAGE_SIZE,
        num_kv_pages=NUM_PAGES,
        max_num_seqs=8,
        max_num_batched_tokens=256,
    )
    yield Pair(hf, ModelRunner(config))


def _prompt(seed: int, length: int) -> list[int]:
    return torch.randint(3, 384, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_whole_prompt(pair: Pair) -> None:
    prompt = _prompt(0, 37)
    idx, logits = pair.runner.compute_logits(pair.requests().step([(0, prompt)]))
    assert idx.tolist() == [0]
    torch.testing.assert_close(logits[0], hf_logits(pair.hf, prompt)[-1], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("sizes", [[16, 16, 8], [5, 1, 11, 1, 19], [1, 1, 2, 3, 33]])
def test_chunked_prefill_reads_earlier_chunks_from_pages(pair: Pair, sizes: list[int]) -> None:
    prompt = _prompt(1, sum(sizes))
    ref = hf_logits(pair.hf, prompt)
    reqs = pair.requests(seed=len(sizes))
    end = 0
    for size in sizes:
        _, logits = pair.runner.compute_logits(reqs.step([(5, prompt[end : end + size])]))
        end += size
        torch.testing.assert_close(logits[0], ref[end - 1], atol=ATOL, rtol=RTOL)


def test_batch_of_different_lengths(pair: Pair) -> None:
    prompts = {row: _prompt(10 + row, length) for row, length in [(3, 9), (0, 40), (6, 17), (1, 1)]}
    plan = pair.requests().step(list(prompts.items()))
    idx, logits = pair.runner.compute_logits(plan)
    assert idx.tolist() == [0, 1, 2, 3]
    for i, prompt in enumerate(prompts.values()):
        torch.testing.assert_close(logits[i], hf_logits(pair.hf, prompt)[-1], atol=ATOL, rtol=RTOL)


def test_mixed_prefill_and_decode_in_one_step(pair: Pair) -> None:
    long_a, long_b, short = _prompt(20, 45), _prompt(21, 30), _prompt(22, 12)
    reqs = pair.requests()
    pair.runner.compute_logits(reqs.step([(0, long_a[:44]), (1, long_b[:20])]))
    # Row 0 decodes, row 1 continues its prefill (and is not sampled), row 2 starts.
    plan = reqs.step([(0, long_a[44:]), (1, long_b[20:]), (2, short)], [True, False, True])
    idx, logits = pair.runner.compute_logits(plan)
    assert idx.tolist() == [0, 2]
    torch.testing.assert_close(logits[0], hf_logits(pair.hf, long_a)[-1], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(logits[1], hf_logits(pair.hf, short)[-1], atol=ATOL, rtol=RTOL)
    # The unsampled chunk still wrote its KV: the next token of row 1 sees the whole prompt.
    _, logits = pair.runner.compute_logits(reqs.step([(1, [7])]))
    expected = hf_logits(pair.hf, long_b + [7])[-1]
    torch.testing.assert_close(logits[0], expected, atol=ATOL, rtol=RTOL)


def test_greedy_decode_matches_hf_generate(pair: Pair) -> None:
    steps = 12
    prompts = [_prompt(30, 21), _prompt(31, 3), _prompt(32, 34)]
    greedy = SamplingParams(temperature=0.0, max_tokens=steps)
    for row, prompt in enumerate(prompts):
        pair.runner.bind_row(row, greedy, prompt, [], [])
    reqs = pair.requests()
    # The first prompt arrives in two chunks, so decode starts at different steps.
    plan = reqs.step([(0, prompts[0][:10]), (1, prompts[1]), (2, prompts[2])], [False, True, True])
    outputs: dict[int, list[int]] = {0: [], 1: [], 2: []}

    def run(plan: StepPlan) -> None:
        idx, result, *_ = pair.runner.execute(plan)
        assert result.token_ids.dtype == torch.int32
        for row, token in zip(plan.rows[idx].tolist(), result.token_ids.tolist()):
            outputs[row].append(token)

    run(plan)
    plan = reqs.step([(0, prompts[0][10:]), (1, outputs[1][-1:]), (2, outputs[2][-1:])])
    while min(len(o) for o in outputs.values()) < steps:
        run(plan)
        plan = reqs.step([(row, out[-1:]) for row, out in outputs.items() if len(out) < steps])
    for row, prompt in enumerate(prompts):
        assert outputs[row] == hf_greedy(pair.hf, prompt, steps)
