"""Passkey retrieval documents ("needle in a haystack"): for training, and the prompts to test it.

The layout is the standard passkey test (Mohtashami & Jaggi 2023; LongLoRA's passkey script),
lines joined by newlines:

    There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. ...
    <filler before>
    The pass key is 48213. Remember it. 48213 is the pass key.
    <filler after>
    What is the pass key? The pass key is 48213.

Filler comes in three kinds, so the model learns to retrieve rather than to spot one template:
`classic` (the standard grass/sky/sun sentences, repeated), `sentences` (random plain sentences),
`code` (stdlib source). Documents are assembled from pre-encoded pieces (the hot path of data
generation), split only where the tokenizer splits anyway, so for `classic` and `sentences` the
ids equal the tokenization of the document's text; `prompt()` gives that text for evaluation, and
`omniserve eval niah` uses the same builder so that it measures the format the model learned.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer

from .corpus import TokenStream
from .tokenizer import BOS_ID, EOS_ID, encode_plain

TASK = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
CLASSIC_FILLER = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
FILLERS = ("classic", "sentences", "code")
# Evaluation grids (`omniserve eval niah`, the bundled model's reference numbers) draw keys and
# filler from this seed; training draws from seeds below 2**20, so evaluation keys are fresh.
EVAL_SEED = 20_261_127
EVAL_KEY_DIGITS = 5

_SUBJECTS = (
    "The old fisherman",
    "A young teacher",
    "My neighbour",
    "The little dog",
    "A tired traveller",
    "The baker",
    "Our team",
    "The city council",
    "A curious child",
    "The gardener",
    "An old friend",
    "The musician",
    "A quiet student",
    "The farmer",
    "The pilot",
    "A stray cat",
    "The librarian",
    "The doctor",
    "My sister",
    "The captain",
)
_VERBS = (
    "painted",
    "repaired",
    "found",
    "carried",
    "sold",
    "watched",
    "described",
    "forgot",
    "cleaned",
    "borrowed",
    "opened",
    "visited",
    "counted",
    "admired",
    "built",
    "lost",
    "planted",
    "measured",
    "wrapped",
    "followed",
)
_OBJECTS = (
    "a wooden boat",
    "the blue door",
    "an empty basket",
    "the long letter",
    "a small garden",
    "the heavy box",
    "a red umbrella",
    "the broken clock",
    "a warm coat",
    "the narrow bridge",
    "an old map",
    "the quiet river",
    "a bright lamp",
    "the stone wall",
    "a paper kite",
    "the morning train",
    "a silver spoon",
    "the tall tree",
    "a green bottle",
    "the last page",
)
_PLACES = (
    "near the harbour",
    "after the rain",
    "before lunch",
    "in the village",
    "on a cold morning",
    "behind the station",
    "during the summer",
    "at the market",
    "by the lake",
    "without a word",
    "under the bridge",
    "in the evening",
    "along the road",
    "for the first time",
    "at the end of the day",
    "with great care",
    "next to the school",
    "in the spring",
    "after a long walk",
    "on the hill",
)


def random_sentences(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    parts = [
        rng.integers(0, len(words), size=n) for words in (_SUBJECTS, _VERBS, _OBJECTS, _PLACES)
    ]
    return [f"{_SUBJECTS[a]} {_VERBS[b]} {_OBJECTS[c]} {_PLACES[d]}." for a, b, c, d in zip(*parts)]


def random_key(rng: np.random.Generator, digits: int) -> str:
    return str(int(rng.integers(1, 10))) + "".join(
        str(d) for d in rng.integers(0, 10, size=digits - 1)
    )


@dataclass(frozen=True)
class PasskeyDoc:
    ids: np.ndarray  # <s> task, filler, needle, filler, question, answer "." </s>
    key: str
    key_positions: np.ndarray  # where the key first appears: unpredictable digits, not trained on
    answer_start: int  # ids[answer_start:answer_end] is " " + key, one token per digit
    answer_end: int

    @property
    def prompt_ids(self) -> np.ndarray:
        return self.ids[: self.answer_start]


class _Sentences:
    """Pre-encoded sentences, in two forms: first on a line, and after a space (mid-line)."""

    def __init__(self, tok: Tokenizer, sentences: list[str]) -> None:
        self.first = [encode_plain(tok, s) for s in sentences]
        self.cont = [encode_plain(tok, " " + s) for s in sentences]
        self.first_len = np.array([len(x) for x in self.first])
        self.cont_len = np.array([len(x) for x in self.cont])

    def line(self, idx: np.ndarray) -> np.ndarray:
        return np.concatenate([self.first[idx[0]], *(self.cont[i] for i in idx[1:])])

    def line_len(self, idx: np.ndarray) -> int:
        return 0 if len(idx) == 0 else int(self.first_len[idx[0]] + self.cont_len[idx[1:]].sum())


class PasskeyBuilder:
    """Builds passkey documents of an exact token budget, as ids (training) or text (evaluation)."""

    def __init__(
        self, tok: Tokenizer, code: TokenStream | None = None, sentence_bank: int = 4096
    ) -> None:
        self.tok = tok
        self.code = code
        self.nl = encode_plain(tok, "\n")
        self.task = encode_plain(tok, TASK)
        self.question = encode_plain(tok, QUESTION)
        self.period = encode_plain(tok, ".")
        self.digit_ids = np.array([tok.token_to_id(str(d)) for d in range(10)])
        if any(i is None for i in self.digit_ids):
            raise ValueError("tokenizer lacks single-digit tokens")
        self.classic = _Sentences(tok, list(CLASSIC_FILLER))
        # Fixed seed: the bank is part of the document format, the same in training and evaluation.
        self.sentences = _Sentences(tok, random_sentences(sentence_bank, seed=0))

    def build(
        self, length: int, depth: float, key: str, filler: str, rng: np.random.Generator
    ) -> PasskeyDoc:
        """A document of at most `length` tokens (<s> to </s>), filler up to the budget, needle at
        `depth` (0 = right after the task line, 1 = right before the question)."""
        needle = encode_plain(self.tok, NEEDLE.format(key=key))
        answer = encode_plain(self.tok, " " + key)
        fixed = self._fixed_length(needle, answer)
        budget = length - fixed - 2 * len(self.nl)  # two more breaks around the filler lines
        if length < fixed:
            raise ValueError(
                f"a passkey document needs at least {fixed} tokens, asked for {length}"
            )
        before, after = self._filler(max(budget, 0), depth, filler, rng)
        pieces: list[np.ndarray] = [np.array([BOS_ID], dtype=np.int32)]
        pos, needle_start = 1, 0
        for line in (x for x in (self.task, before, needle, after, self.question) if len(x)):
            if len(pieces) > 1:
                pieces.append(self.nl)
                pos += len(self.nl)
            if line is needle:
                needle_start = pos
            pieces.append(line)
            pos += len(line)
        ids = np.concatenate(
            [*pieces, answer, self.period, np.array([EOS_ID], dtype=np.int32)]
        ).astype(np.int32)
        key_positions = needle_start + np.flatnonzero(np.isin(needle, self.digit_ids))[: len(key)]
        return PasskeyDoc(ids, key, key_positions, pos, pos + len(answer))

    def min_length(self, key_digits: int) -> int:
        """Tokens of a document without filler (the shortest `build` accepts)."""
        key = "1" * key_digits  # every digit is one token: the value does not change the count
        return self._fixed_length(
            encode_plain(self.tok, NEEDLE.format(key=key)), encode_plain(self.tok, " " + key)
        )

    def _fixed_length(self, needle: np.ndarray, answer: np.ndarray) -> int:
        # <s> </s>, the lines other than filler, their two line breaks, the answer and its period
        return (
            2
            + len(self.task)
            + len(needle)
            + len(self.question)
            + 2 * len(self.nl)
            + len(answer)
            + len(self.period)
        )

    def prompt(
        self, length: int, depth: float, key: str, filler: str, rng: np.random.Generator
    ) -> str:
        """The prompt text (without <s>, which the tokenizer adds) of a document of `length` tokens:
        prompt plus answer fit in `length` positions. Greedy decoding should continue with " {key}"."""
        doc = self.build(length, depth, key, filler, rng)
        return self.tok.decode(doc.prompt_ids[1:].tolist(), skip_special_tokens=False)

    def _filler(
        self, budget: int, depth: float, filler: str, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        if filler == "code":
            if self.code is None:
                raise ValueError("code filler needs a token stream")
            crop = self.code.text_crop(rng, budget).astype(np.int32)
            split = round(depth * len(crop))
            return crop[:split], crop[split:]
        if filler == "classic":
            bank = self.classic
            idx = np.arange(budget // int(bank.cont_len.min()) + 1) % len(CLASSIC_FILLER)
        elif filler == "sentences":
            bank = self.sentences
            idx = rng.integers(0, len(bank.first), size=budget // int(bank.cont_len.min()) + 1)
        else:
            raise ValueError(f"unknown filler {filler!r}; one of {FILLERS}")
        n = int(np.searchsorted(np.cumsum(bank.cont_len[idx]), budget, side="right"))
        # A line's first sentence has no leading space and may encode to a different length: drop
        # whole sentences until the two lines fit the budget.
        while True:
            split = round(depth * n)
            if bank.line_len(idx[:split]) + bank.line_len(idx[split:n]) <= budget:
                break
            n -= 1
        empty = np.zeros(0, dtype=np.int32)
        before = bank.line(idx[:split]) if split else empty
        after = bank.line(idx[split:n]) if n > split else empty
        return before, after


@dataclass(frozen=True)
class Needle:
    length_index: int
    depth_index: int
    key: str
    prompt: str  # text without <s>; greedy decoding should continue with " {key}"


def eval_needles(
    builder: PasskeyBuilder,
    lengths: list[int],
    depths: list[float],
    samples: int,
    filler: str,
    seed: int = EVAL_SEED,
) -> list[Needle]:
    """The prompts of an evaluation grid, `samples` per (length, depth) cell, in a fixed order: the
    engine's `omniserve eval niah` and the training code's reference numbers use these same prompts."""
    rng = np.random.default_rng(seed)
    needles = []
    for i, length in enumerate(lengths):
        for j, depth in enumerate(depths):
            for _ in range(samples):
                key = random_key(rng, EVAL_KEY_DIGITS)
                needles.append(Needle(i, j, key, builder.prompt(length, depth, key, filler, rng)))
    return needles


def retrieved(completion: str, key: str) -> bool:
    """Whether a completion of a needle prompt answers with the key: its first number is the key."""
    found = re.match(r"\s*(\d+)", completion)
    return bool(found and found.group(1) == key)
