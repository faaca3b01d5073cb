"""Measurements of a trained model: held-out loss, passkey retrieval, greedy code completions.

Retrieval is checked by teacher forcing, which is exactly greedy decoding: greedy decoding emits
" <key>" and then stops the number iff, at each answer position, the argmax given the correct
prefix is the next answer token, and after the last digit the argmax is not a digit. One forward
pass per prompt instead of one per generated token.
"""

from __future__ import annotations

import numpy as np
import torch
from tokenizers import Tokenizer

from .corpus import TokenStream
from .model import LlamaLM
from .needles import PasskeyBuilder, random_key
from .tokenizer import BOS_ID, EOS_ID, encode_plain


def text_windows(
    token_ids: list[int], seq_len: int, bos_id: int | None, max_windows: int | None
) -> list[list[int]]:
    """Consecutive, non-overlapping windows of a text's tokens, each led by <s> when the model has
    one: every text token is scored once, given at most seq_len - 1 tokens before it; a last
    partial window is dropped. `max_windows` keeps that many, spread evenly from the first to the
    last: a sample of the whole text (the first windows of a file of concatenated sources would
    measure one or two files). The one definition of `omniserve eval ppl` and of the reference
    numbers shipped with the bundled model, so the two measure the same thing."""
    lead = [] if bos_id is None else [bos_id]
    step = seq_len - len(lead)
    if step < 1:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    out = [lead + token_ids[i : i + step] for i in range(0, len(token_ids) - step + 1, step)]
    if not out:
        raise ValueError(f"the text has {len(token_ids)} tokens, fewer than one window of {step}")
    if max_windows is None or max_windows >= len(out):
        return out
    if max_windows < 1:
        raise ValueError(f"max_windows must be >= 1, got {max_windows}")
    last = len(out) - 1
    return [out[i * last // max(max_windows - 1, 1)] for i in range(max_windows)]


@torch.no_grad()
def heldout_loss(
    model: LlamaLM, stream: TokenStream, window: int, max_windows: int | None = None, batch: int = 8
) -> tuple[float, int]:
    """Mean next-token cross-entropy over consecutive `window`-token pieces of the stream, each fed
    as `<s> piece` like the code rows of training; `max_windows` takes that many pieces spread
    evenly over the stream (a quick estimate). Returns (loss, tokens scored)."""
    device = next(model.parameters()).device
    n = (len(stream) - 1) // window
    if n == 0:
        raise ValueError(
            f"held-out stream of {len(stream)} tokens is shorter than one {window}-token window"
        )
    pieces = np.arange(n)
    if max_windows is not None and max_windows < n:
        pieces = np.linspace(0, n - 1, max_windows).round().astype(int)
    total, count = 0.0, 0
    for first in range(0, len(pieces), batch):
        rows = [
            np.concatenate([[BOS_ID], stream.ids[i * window : (i + 1) * window]])
            for i in pieces[first : first + batch]
        ]
        ids = torch.from_numpy(np.stack(rows).astype(np.int64)).to(device)
        logits = model.logits(model(ids[:, :-1])).float()
        total += torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum"
        ).item()
        count += ids[:, 1:].numel()
    return total / count, count


@torch.no_grad()
def passkey_accuracy(
    model: LlamaLM,
    tok: Tokenizer,
    builder: PasskeyBuilder,
    lengths: list[int],
    depths: list[float],
    fillers: list[str],
    samples: int,
    seed: int,
) -> dict:
    """Greedy retrieval accuracy per filler, context length and depth, on fresh 5-digit keys.

    Prompts go through text and the tokenizer, as a user's prompt would. Returns
    {filler: {"by_length": {L: acc}, "grid": {L: {depth: acc}}}, "overall": acc}.
    """
    device = next(model.parameters()).device
    digit_ids = torch.tensor(builder.digit_ids, device=device)
    rng = np.random.default_rng(seed)
    result: dict = {}
    for filler in fillers:
        grid: dict[str, dict[str, float]] = {}
        for length in lengths:
            grid[str(length)] = {}
            for depth in depths:
                hits = 0
                for _ in range(samples):
                    key = random_key(rng, 5)
                    prompt = tok.encode(builder.prompt(length, depth, key, filler, rng)).ids
                    answer = encode_plain(tok, " " + key).tolist()
                    ids = torch.tensor([prompt + answer], device=device)
                    hidden = model(ids)[0, len(prompt) - 1 :]
                    pred = model.logits(hidden).argmax(-1)
                    hits += bool(
                        pred[:-1].tolist() == answer and not torch.isin(pred[-1], digit_ids)
                    )
                grid[str(length)][str(depth)] = hits / samples
        by_length = {L: sum(row.values()) / len(row) for L, row in grid.items()}
        result[filler] = {
            "by_length": by_length,
            "grid": grid,
            "overall": sum(by_length.values()) / len(by_length),
        }
    return result


@torch.no_grad()
def greedy_complete(model: LlamaLM, tok: Tokenizer, prompt: str, max_new_tokens: int) -> str:
    """Greedy continuation (no KV cache: prompts here are short), stopping at </s>."""
    device = next(model.parameters()).device
    ids = tok.encode(prompt).ids
    new: list[int] = []
    for _ in range(max_new_tokens):
        hidden = model(torch.tensor([ids + new], device=device))[0, -1]
        nxt = int(model.logits(hidden).argmax())
        if nxt == EOS_ID:
            break
        new.append(nxt)
    return tok.decode(new)
