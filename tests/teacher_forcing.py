"""Greedy decoding through two numerically different paths, compared position by position.

Two correct implementations of the same model (a kernel and its torch reference, CUDA and CPU)
round differently, so where a step's two best logits are nearly equal their greedy choices may
differ, and from there on free-running generations share nothing. So path A generates, both
paths then score A's sequences (teacher forcing, through the decode path each serves with), and
at every position the paths' logits must agree and B must choose A's token, except at numerical
ties, of which only a few may occur."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from omniserve import Engine, SamplingParams
from omniserve.outputs import RequestOutput
from omniserve.runner.model_runner import ModelRunner
from tiny_models import PagedRequests


def teacher_forced_logits(
    runner: ModelRunner, prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]]
) -> list[torch.Tensor]:
    """fp32 CPU logits [len(continuation), vocab] of each continuation token given the tokens
    before it. The first step prefills every prompt, as the engine's first step does; each later
    step feeds every sequence its next continuation token, one token per request, so that each
    position after the first runs the runner's decode path, as in generation. Streaming heads
    get their tables and their prompt lengths (which choose their windows), as the engine gives
    them; page selection, which the scheduler's cadence drives, is not driven here."""
    assert runner.selection is None, "teacher forcing does not drive page selection"
    stream = runner.kv_cache.stream
    requests = PagedRequests(
        runner.config.page_size,
        runner.num_kv_pages,
        stream=None if stream is None else (stream.num_pages, stream.table.width),
    )
    for row, prompt in enumerate(prompts):
        runner.bind_row(row, SamplingParams(temperature=0.0), prompt, [], [])
    logits: list[list[torch.Tensor]] = [[] for _ in prompts]
    chunks = [(row, list(prompt)) for row, prompt in enumerate(prompts)]
    step = 0
    while chunks:
        idx, step_logits = runner.compute_logits(requests.step(chunks))
        for i, row_logits in zip(idx.tolist(), step_logits.float().cpu()):
            logits[chunks[i][0]].append(row_logits)
        step += 1
        chunks = [
            (row, [tokens[step - 1]])
            for row, tokens in enumerate(continuations)
            if step < len(tokens)
        ]
    return [torch.stack(row) for row in logits]


def assert_greedy_agreement(
    tokens: Sequence[Sequence[int]],
    logits_a: Sequence[torch.Tensor],
    logits_b: Sequence[torch.Tensor],
    *,
    logit_tolerance: float,
    max_tie_rate: float,
) -> None:
    """`tokens` are path A's greedy tokens, `logits_a` and `logits_b` both paths' teacher-forced
    logits of them [len(tokens[i]), vocab]. At every position, with d the largest |a - b| over
    the vocabulary and m the margin between a's two largest logits:
    - the logits agree: d <= logit_tolerance * max|a|;
    - a and b each rank A's token first, unless m <= 2 d: a numerical tie, since moving every
      logit by at most d can swap the first two only if they were within 2 d;
    - b ranks another token first at no more than max_tie_rate of the positions."""
    positions = ties = 0
    for seq, (want, a, b) in enumerate(zip(tokens, logits_a, logits_b)):
        assert a.shape == b.shape == (len(want), a.shape[-1]), f"sequence {seq}"
        token = torch.tensor(want)
        diff = (a - b).abs().amax(-1)
        scale = a.abs().amax(-1)
        bad = (diff > logit_tolerance * scale).nonzero().flatten().tolist()
        assert not bad, (
            f"sequence {seq}: logits differ by {diff[bad].tolist()} at positions {bad}, above "
            f"{logit_tolerance} of the largest |logit| {scale[bad].tolist()}"
        )
        top2 = a.topk(2, -1).values
        tie = top2[:, 0] - top2[:, 1] <= 2 * diff
        for name, logits in (("path A's scoring", a), ("path B", b)):
            differs = logits.argmax(-1) != token
            wrong = (differs & ~tie).nonzero().flatten().tolist()
            assert not wrong, (
                f"sequence {seq}: {name} ranks another token than A's greedy token first at "
                f"positions {wrong} (top-2 margins {(top2[wrong, 0] - top2[wrong, 1]).tolist()}, "
                f"logit differences {diff[wrong].tolist()}): not a numerical tie"
            )
        ties += int((b.argmax(-1) != token).sum())
        positions += len(want)
    assert positions > 0
    assert ties <= math.floor(max_tie_rate * positions), (
        f"path B chose another token at {ties} numerical ties of {positions} positions"
    )


def assert_engines_agree(
    generating: Engine,
    scoring: Engine,
    prompts: Sequence[str],
    params: SamplingParams,
    *,
    logit_tolerance: float,
    max_tie_rate: float,
) -> list[RequestOutput]:
    """Path A (`generating`) decodes `prompts` greedily; both engines then score A's sequences
    through their own decode paths, and `assert_greedy_agreement` compares them. Returns A's
    outputs."""
    outputs = generating.generate(prompts, params, use_tqdm=False)
    prompt_ids = [o.prompt_token_ids for o in outputs]
    tokens = [o.token_ids for o in outputs]
    assert_greedy_agreement(
        tokens,
        teacher_forced_logits(generating.runner, prompt_ids, tokens),
        teacher_forced_logits(scoring.runner, prompt_ids, tokens),
        logit_tolerance=logit_tolerance,
        max_tie_rate=max_tie_rate,
    )
    return outputs
