"""Sampler: greedy, penalties, min_tokens, filters, seeding and logprobs against references."""

from __future__ import annotations

import itertools
import random
from collections import Counter

import pytest
import torch

from omniserve.layers.sampler import Sampler
from omniserve.sampling_params import SamplingParams

V = 64
CPU = torch.device("cpu")


def _sample(sampler: Sampler, logits: torch.Tensor, rows: list[int]) -> list[int]:
    return sampler.sample(logits, torch.tensor(rows)).token_ids.tolist()


def _penalized(
    logits: torch.Tensor, prompt: list[int], outputs: list[int], params: SamplingParams
) -> torch.Tensor:
    """Token-by-token reference of vLLM's penalties, in float64."""
    z = logits.double().clone()
    counts = Counter(outputs)
    for t in range(len(z)):
        if t in prompt or counts[t]:
            r = params.repetition_penalty
            z[t] = z[t] / r if z[t] > 0 else z[t] * r
        z[t] -= params.frequency_penalty * counts[t] + params.presence_penalty * (counts[t] > 0)
    return z


def _allowed(logits: torch.Tensor, params: SamplingParams) -> set[int]:
    """Reference filters in float64: temperature, top-k, top-p (smallest most likely set with mass
    >= top_p), min-p (probability >= min_p * the largest)."""
    z = logits.double() / params.temperature
    order = torch.argsort(z, descending=True).tolist()
    if params.top_k > 0:
        kth = z[order[params.top_k - 1]]
        order = [t for t in order if z[t] >= kth]
    probs = torch.softmax(z[order], dim=0).tolist()
    kept, mass = [], 0.0
    for t, p in zip(order, probs):
        kept.append(t)
        mass += p
        if mass >= params.top_p:
            break
    z_max = max(z[t] for t in kept)
    return {t for t in kept if torch.exp(z[t] - z_max) >= params.min_p}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_greedy_is_argmax(dtype: torch.dtype) -> None:
    sampler = Sampler(8, V, CPU, seed=0)
    for row in range(8):
        params = SamplingParams(temperature=0.0 if row % 2 else 1.0, top_k=3)
        sampler.bind_row(row, params, [1, 2], [], [0])
    logits = (torch.randn(8, V) * 3).to(dtype)
    tokens = _sample(sampler, logits, list(range(8)))
    argmax = logits.float().argmax(dim=-1).tolist()
    assert tokens[1::2] == argmax[1::2]


def test_penalties_match_reference() -> None:
    rng = random.Random(0)
    sampler = Sampler(8, V, CPU, seed=0)
    for _ in range(60):
        logits = torch.randn(8, V) * 3
        expected = []
        for row in range(8):
            # History drawn from the most likely tokens, where penalties decide the argmax.
            top = torch.topk(logits[row], 6).indices.tolist()
            prompt = rng.sample(top, rng.randint(0, 3)) + [rng.randrange(V)]
            outputs = [rng.choice(top) for _ in range(rng.randint(0, 5))]
            params = SamplingParams(
                temperature=0.0,
                repetition_penalty=rng.choice([1.0, 0.7, 1.3, 2.0]),
                presence_penalty=rng.choice([0.0, -0.5, 1.0]),
                frequency_penalty=rng.choice([0.0, 0.4, -0.3]),
            )
            sampler.bind_row(row, params, prompt, outputs, [])
            expected.append(int(_penalized(logits[row], prompt, outputs, params).argmax()))
        assert _sample(sampler, logits, list(range(8))) == expected


def test_sampled_tokens_feed_the_penalties() -> None:
    logits = torch.randn(1, V) * 2
    params = SamplingParams(temperature=0.0, frequency_penalty=0.7, repetition_penalty=1.2)
    prompt = torch.topk(logits[0], 3).indices.tolist()[:1]
    sampler = Sampler(4, V, CPU, seed=0)
    sampler.bind_row(3, params, prompt, [], [])
    outputs: list[int] = []
    for _ in range(25):
        expected = int(_penalized(logits[0], prompt, outputs, params).argmax())
        assert _sample(sampler, logits, [3]) == [expected]
        outputs.append(expected)
    assert len(set(outputs)) > 3  # the penalties did rotate the argmax


def test_min_tokens_masks_stop_ids() -> None:
    sampler = Sampler(4, V, CPU, seed=0)
    logits = torch.zeros(3, V)
    logits[:, 5] = 10.0  # eos
    logits[:, 9] = 9.0  # a stop_token_id
    sampler.bind_row(0, SamplingParams(temperature=0.0, min_tokens=4), [1], [], [5, 9])
    sampler.bind_row(1, SamplingParams(min_tokens=3, seed=7), [1], [], [9, 5, 9])
    sampler.bind_row(2, SamplingParams(temperature=0.0), [1], [], [5])
    steps = [_sample(sampler, logits, [0, 1, 2]) for _ in range(5)]
    assert all(s[0] not in (5, 9) for s in steps[:4]) and steps[4][0] == 5
    assert all(s[1] not in (5, 9) for s in steps[:3])
    assert all(s[2] == 5 for s in steps)
    # Re-bound after a preemption with 3 outputs: one more masked step.
    sampler.bind_row(0, SamplingParams(temperature=0.0, min_tokens=4), [1], [0, 0, 0], [5, 9])
    assert _sample(sampler, logits[:1], [0]) != [5]
    assert _sample(sampler, logits[:1], [0]) == [5]


def test_filters_never_sample_outside_allowed_set() -> None:
    grid = list(
        itertools.product([0.5, 1.0, 2.0], [0, -1, 1, 5, 20], [1.0, 0.9, 0.5], [0.0, 0.05, 0.3])
    )
    sampler = Sampler(len(grid), V, CPU, seed=0)
    logits = torch.randn(len(grid), V) * 2
    allowed = []
    for row, (t, k, p, m) in enumerate(grid):
        params = SamplingParams(temperature=t, top_k=k, top_p=p, min_p=m)
        sampler.bind_row(row, params, [], [], [])
        allowed.append(_allowed(logits[row], params))
    rows = list(range(len(grid)))
    seen: list[set[int]] = [set() for _ in rows]
    for _ in range(200):
        for row, token in enumerate(_sample(sampler, logits, rows)):
            assert token in allowed[row], grid[row]
            seen[row].add(token)
    # Filtering is not overly strict either: top-1 style rows saw one token, others several.
    assert all(len(s) == 1 for s, a in zip(seen, allowed) if len(a) == 1)
    assert sum(len(s) > 1 for s in seen) > len(grid) // 2


def test_sampled_frequencies_match_filtered_softmax() -> None:
    params = SamplingParams(temperature=0.8, top_k=10, top_p=0.9)
    n_rows, n_calls = 500, 40
    sampler = Sampler(n_rows, V, CPU, seed=3)
    for row in range(n_rows):
        sampler.bind_row(row, params, [], [], [])
    logits = torch.randn(V) * 1.5
    allowed = sorted(_allowed(logits, params))
    probs = torch.zeros(V, dtype=torch.float64)
    probs[allowed] = torch.softmax(logits.double()[allowed] / params.temperature, dim=0)
    counts = torch.zeros(V, dtype=torch.float64)
    for _ in range(n_calls):
        tokens = sampler.sample(logits.expand(n_rows, V), torch.arange(n_rows)).token_ids
        counts += torch.bincount(tokens.long(), minlength=V)
    n = n_rows * n_calls
    freq = counts / n
    sigma = (probs * (1 - probs) / n).sqrt()
    assert torch.all((freq - probs).abs() <= 5 * sigma + 1e-9)


SEEDED = SamplingParams(
    temperature=0.9, top_p=0.95, min_p=0.02, repetition_penalty=1.1, seed=1234, min_tokens=3
)


def _seeded_alone(logits_seq: list[torch.Tensor], device: torch.device = CPU) -> list[int]:
    sampler = Sampler(4, V, device, seed=0)
    sampler.bind_row(1, SEEDED, [3, 4], [], [0])
    return [_sample(sampler, lg[None].to(device), [1])[0] for lg in logits_seq]


def _neighbours(rng: random.Random) -> list[SamplingParams]:
    return [
        SamplingParams(temperature=0.0),
        SamplingParams(seed=rng.randrange(100)),
        SamplingParams(top_k=3, logprobs=2),
        SamplingParams(presence_penalty=1.0, min_p=0.2),
        SamplingParams(top_p=0.3, temperature=1.5, min_tokens=2),
    ]


def _seeded_in_traffic(
    logits_seq: list[torch.Tensor], device: torch.device = CPU, preempt_at: int | None = None
) -> list[int]:
    """The same request among other rows, in a shuffled order; optionally preempted and
    resumed on another row (re-bound with its outputs so far) after `preempt_at` steps."""
    rng = random.Random(5)
    sampler = Sampler(12, V, device, seed=99)
    row, prompt, outputs = 7, [3, 4], []
    sampler.bind_row(row, SEEDED, prompt, [], [0])
    others = dict(zip([0, 2, 3, 5, 9], _neighbours(rng)))
    for r, params in others.items():
        sampler.bind_row(r, params, [1, 2, 3], [], [0])
    for step, logits in enumerate(logits_seq):
        if step == preempt_at:
            sampler.bind_row(row, SamplingParams(seed=5), [8], [], [0])  # someone else's now
            _sample(sampler, torch.randn(1, V, device=device), [row])
            row = 11
            sampler.bind_row(row, SEEDED, prompt, outputs, [0])
        rows = [row] + rng.sample(list(others), rng.randint(0, len(others)))
        rng.shuffle(rows)
        batch = torch.randn(len(rows), V) * 2
        batch[rows.index(row)] = logits
        tokens = _sample(sampler, batch.to(device), rows)
        outputs.append(tokens[rows.index(row)])
    return outputs


def test_seeded_sampling_is_reproducible_and_batch_independent() -> None:
    logits_seq = [torch.randn(V) for _ in range(40)]
    alone = _seeded_alone(logits_seq)
    # Each output index gets fresh randomness: identical logits still give varied tokens.
    assert len(set(_seeded_alone([logits_seq[0] * 0.3] * 40))) > 5
    assert _seeded_alone(logits_seq) == alone
    assert _seeded_in_traffic(logits_seq) == alone


def test_seeded_sampling_survives_preemption() -> None:
    logits_seq = [torch.randn(V) for _ in range(40)]
    assert _seeded_in_traffic(logits_seq, preempt_at=13) == _seeded_alone(logits_seq)


def test_unseeded_rows_follow_the_sampler_seed() -> None:
    logits = torch.zeros(16, V)

    def run(seed: int) -> list[int]:
        sampler = Sampler(16, V, CPU, seed=seed)
        for row in range(16):
            sampler.bind_row(row, SamplingParams(), [], [], [])
        return _sample(sampler, logits, list(range(16)))

    assert run(1) == run(1) != run(2)


def test_logprobs_are_raw_log_softmax() -> None:
    sampler = Sampler(4, V, CPU, seed=0)
    penalised = SamplingParams(logprobs=5, temperature=0.5, repetition_penalty=1.5)
    sampler.bind_row(0, penalised, [1], [], [])
    sampler.bind_row(1, SamplingParams(logprobs=0, temperature=0.0), [], [], [])
    sampler.bind_row(2, SamplingParams(), [], [], [])
    logits = (torch.randn(3, V) * 4).to(torch.bfloat16)
    result = sampler.sample(logits, torch.tensor([0, 1, 2]))
    raw = torch.log_softmax(logits.float(), dim=-1)
    tokens = result.token_ids.long()
    assert result.logprobs is not None and result.top_ids is not None
    assert result.top_logprobs is not None
    torch.testing.assert_close(result.logprobs, raw.gather(1, tokens[:, None]).squeeze(1))
    top = raw.topk(5, dim=-1)
    assert result.top_ids.shape == (3, 5) and result.top_ids.dtype == torch.int32
    assert result.top_ids.tolist() == top.indices.tolist()
    torch.testing.assert_close(result.top_logprobs, top.values)
    # No row asking for logprobs: none computed.
    assert sampler.sample(logits[2:], torch.tensor([2])).logprobs is None


def test_rejects_bad_input() -> None:
    sampler = Sampler(2, V, CPU, seed=0)
    with pytest.raises(ValueError, match="stop_ids"):
        sampler.bind_row(0, SamplingParams(), [], [], [V])
    with pytest.raises(ValueError, match="prompt_ids"):
        sampler.bind_row(0, SamplingParams(presence_penalty=1.0), [-1], [], [])
    sampler.bind_row(0, SamplingParams(), [], [], [])
    with pytest.raises(ValueError, match="logits must be"):
        sampler.sample(torch.zeros(1, V + 1), torch.tensor([0]))


def test_penalty_slots_are_reused() -> None:
    sampler = Sampler(6, V, CPU, seed=0)
    pen = SamplingParams(temperature=0.0, frequency_penalty=2.0)
    logits = torch.zeros(1, V)
    logits[0, 4] = 1.0
    for request in range(20):
        row = request % 6
        sampler.bind_row(row, pen, [], [], [])
        # A fresh request's history is empty: the first token is the plain argmax.
        assert _sample(sampler, logits, [row]) == [4]
        assert _sample(sampler, logits, [row]) != [4]  # its own output now counts
        if request % 3 == 0:
            sampler.release_row(row)
    assert sampler._out_counts.shape[0] <= 6


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    cuda = torch.device("cuda")
    logits_seq = [torch.randn(V) for _ in range(40)]
    on_gpu = _seeded_alone(logits_seq, cuda)
    assert _seeded_in_traffic(logits_seq, cuda, preempt_at=9) == on_gpu
    # Same uniforms on both devices: only float rounding at a cdf boundary could differ.
    assert on_gpu == _seeded_alone(logits_seq)
    sampler = Sampler(4, V, cuda, seed=0)
    params = SamplingParams(top_k=5, top_p=0.8, min_p=0.1, temperature=0.7)
    sampler.bind_row(2, params, [], [], [])
    logits = torch.randn(1, V) * 2
    allowed = _allowed(logits[0], params)
    for _ in range(300):
        assert _sample(sampler, logits.to(cuda), [2])[0] in allowed


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_sampling_never_waits_for_the_device() -> None:
    """With async scheduling the host samples step n while the device still computes it: any
    blocking copy (from pageable host memory) in the sampler makes the host wait for the device
    at every step. Greedy, filtered, penalised, seeded and min_tokens rows together, so that
    every branch that moves host data to the device runs under torch's sync check."""
    cuda = torch.device("cuda")
    sampler = Sampler(4, V, cuda, seed=0)
    sampler.bind_row(0, SamplingParams(temperature=0.0), [3, 4], [], [])
    penalised = SamplingParams(
        temperature=0.8,
        top_k=8,
        top_p=0.9,
        min_p=0.05,
        repetition_penalty=1.2,
        frequency_penalty=0.3,
        presence_penalty=0.2,
    )
    sampler.bind_row(1, penalised, [5, 6], [7], [])
    sampler.bind_row(2, SamplingParams(temperature=1.0, seed=7, min_tokens=4), [1], [], [9, 10])
    logits = torch.randn(3, V, device=cuda)
    rows = torch.tensor([0, 1, 2])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        results = [sampler.sample(logits, rows).to_host() for _ in range(2)]
        # Binding happens mid-run too (admission, resumption after a preemption).
        sampler.bind_row(1, penalised, [5, 6], [7, 8], [])
        results.append(sampler.sample(logits, rows).to_host())
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    for result in results:
        assert result.token_ids.shape == (3,)
        assert int(result.token_ids[2]) not in (9, 10)  # min_tokens masks the stop ids
