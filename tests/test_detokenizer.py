"""IncrementalDetokenizer against full decodes, on real tokenizers trained here (no network).

Four tokenizers cover the decoding styles that matter: GPT-2-style byte-level BPE (characters split
across tokens at any byte), a sentencepiece-like Unigram with Metaspace (leading "▁" spaces), a
Llama-2-style BPE with byte fallback (characters outside the vocabulary spelled as <0xXX> tokens)
and ByT5, a slow (pure Python) byte tokenizer.
"""

from __future__ import annotations

import json
import random

import pytest
from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    trainers,
)
from transformers import ByT5Tokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from omniserve.engine.detokenizer import DetokResult, IncrementalDetokenizer

TEXTS = [
    "The quick brown fox jumps over the lazy dog. Stop here, or don't stop at all!",
    "Incremental detokenization must never split a character: café, naïve, Ålesund, Straße.",
    "中文文本也需要正确处理，包括标点符号。日本語のテキストもあります。한국어 문장도 있습니다.",
    "Emoji are four bytes long: 😀 😃 😄 🚀 🎉 👍🏽 and flags 🇫🇷 🇯🇵 mixed with words.",
    "Numbers 12345 and symbols #$%^&*() ... plus    multiple   spaces and\nnew lines\ttabs.",
    "Σὲ γνωρίζω ἀπὸ τὴν κόψη τοῦ σπαθιοῦ τὴν τρομερή. Привет, мир! مرحبا بالعالم",
    "Hello world, hello there. END of text; <end> marks and ### headers appear too.",
]


def _byte_level_bpe() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,  # few merges: most non-ASCII characters stay split into bytes
        special_tokens=["<|endoftext|>", "<|im_start|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TEXTS * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def _unigram_metaspace() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=400,
        special_tokens=["<unk>", "<s>", "</s>"],
        unk_token="<unk>",
        show_progress=False,
    )
    tok.train_from_iterator(TEXTS * 20, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def _llama_byte_fallback_bpe() -> PreTrainedTokenizerFast:
    # Trained on ASCII text only, so every other character falls back to <0xXX> byte tokens.
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    tok.train_from_iterator([t for t in TEXTS if t.isascii()] * 20, trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
    )


TOKENIZERS = {
    "byte_level_bpe": _byte_level_bpe,
    "unigram_metaspace": _unigram_metaspace,
    "llama_byte_fallback": _llama_byte_fallback_bpe,
    "byt5_slow": ByT5Tokenizer,
}


@pytest.fixture(scope="module", params=list(TOKENIZERS))
def tokenizer(request: pytest.FixtureRequest) -> PreTrainedTokenizerBase:
    return TOKENIZERS[request.param]()


def _decode(tok: PreTrainedTokenizerBase, ids: list[int], skip: bool) -> str:
    return tok.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)


def _encode(tok: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def _expected(tok: PreTrainedTokenizerBase, prompt: list[int], out: list[int], skip: bool) -> str:
    """The output's text as a full decode shows it: decode(prompt + out) minus the prompt's."""
    full = _decode(tok, prompt + out, skip)
    prompt_text = _decode(tok, prompt, skip)
    assert full.startswith(prompt_text)
    return full[len(prompt_text) :]


def _random_text(rng: random.Random) -> str:
    text = rng.choice(TEXTS)
    start = rng.randrange(len(text))
    return text[start : start + rng.randint(1, 40)]


def _random_output(tok: PreTrainedTokenizerBase, rng: random.Random) -> list[int]:
    """Output ids: byte-level BPE and Metaspace take any id, including special and partial-byte
    tokens. Byte-fallback and ByT5 decoders turn a whole run of bytes into U+FFFD when one byte
    is invalid, which no incremental decoder can reproduce, so their outputs are real text
    (split anywhere into byte tokens) mixed with non-byte tokens."""
    if isinstance(tok, ByT5Tokenizer) or "<0x41>" in tok.get_vocab():
        out: list[int] = []
        byte_ids = set(tok.convert_tokens_to_ids([f"<0x{b:02X}>" for b in range(256)]))
        non_byte = [i for i in range(len(tok)) if i not in byte_ids]
        for _ in range(rng.randint(1, 4)):
            out += _encode(tok, _random_text(rng))
            if rng.random() < 0.5 and not isinstance(tok, ByT5Tokenizer):
                out.append(rng.choice(non_byte))
            elif rng.random() < 0.3:
                out.append(rng.choice(tok.all_special_ids))
        return out
    return [rng.randrange(len(tok)) for _ in range(rng.randint(1, 30))]


def _stream(
    tok: PreTrainedTokenizerBase,
    prompt: list[int],
    out: list[int],
    rng: random.Random,
    *,
    skip: bool = True,
    stop: tuple[str, ...] = (),
    include_stop: bool = False,
    min_tokens: int = 0,
) -> tuple[list[str], str | None, IncrementalDetokenizer]:
    """Push `out` in random chunks (single tokens for the slow tokenizer, whose decode drops
    incomplete bytes instead of marking them); returns the deltas (flush last) and the reason."""
    det = IncrementalDetokenizer(tok, prompt, skip, stop, include_stop, min_tokens=min_tokens)
    max_chunk = 1 if isinstance(tok, ByT5Tokenizer) else 3
    deltas, reason, i = [], None, 0
    while i < len(out):
        n = rng.randint(1, max_chunk)
        result = det.push(out[i : i + n])
        deltas.append(result.delta_text)
        if result.stop_reason is not None:
            reason = result.stop_reason
            break
        i += n
    if reason is None:
        deltas.append(det.flush())
    return deltas, reason, det


@pytest.mark.parametrize("skip", [True, False])
def test_incremental_text_equals_full_decode(
    tokenizer: PreTrainedTokenizerBase, skip: bool
) -> None:
    rng = random.Random(1234)
    for trial in range(150):
        prompt = [] if trial % 5 == 0 else _encode(tokenizer, _random_text(rng))
        out = _random_output(tokenizer, rng)
        expected = _expected(tokenizer, prompt, out, skip)
        deltas, reason, det = _stream(tokenizer, prompt, out, rng, skip=skip)
        assert reason is None
        assert "".join(deltas) == expected == det.text, (prompt, out)
        if "\ufffd" not in expected:
            # Multi-byte characters are held back until complete, never shown half-done.
            assert not any("\ufffd" in d for d in deltas)


def test_leading_space_kept_after_prompt() -> None:
    tok = _unigram_metaspace()
    ids = _encode(tok, "Hello world")
    split = tok.convert_ids_to_tokens(ids).index("▁wor")
    det = IncrementalDetokenizer(tok, ids[:split], True, (), False)
    assert "".join(det.push([i]).delta_text for i in ids[split:]) == " world"
    # Without a prompt the first token's space is stripped, as a full decode strips it.
    det = IncrementalDetokenizer(tok, [], True, (), False)
    assert det.push(ids).delta_text == "Hello world"


def test_split_emoji_held_until_complete() -> None:
    tok = _llama_byte_fallback_bpe()
    ids = _encode(tok, "ok 😀")
    emoji = tok.convert_ids_to_tokens(ids[-4:])
    assert emoji == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    det = IncrementalDetokenizer(tok, ids[:-4], True, (), False)
    assert [det.push([i]).delta_text for i in ids[-4:]] == ["", "", "", "😀"]


def test_prompt_ending_inside_byte_run() -> None:
    """The first window must not start inside the prompt's last character's bytes, or a byte
    fallback decoder garbles the output's bytes that continue the same run."""
    tok = _llama_byte_fallback_bpe()
    prompt = _encode(tok, "中文")  # eight tokens: "▁" and six byte tokens
    out = _encode(tok, "中文")[1:]
    assert _expected(tok, prompt, out, True) == "中文"
    deltas, _, _ = _stream(tok, prompt, out, random.Random(0))
    assert "".join(deltas) == "中文"


def test_window_stays_bounded() -> None:
    tok = _byte_level_bpe()
    det = IncrementalDetokenizer(tok, [], True, (), False)
    ids = _encode(tok, " ".join(TEXTS) * 5)
    for i in ids:
        det.push([i])
        assert len(det._ids) <= 8  # the decoded window, not the whole output
    det.flush()
    assert det.text == tok.decode(ids)


def _expected_stop(text: str, stops: tuple[str, ...], include: bool) -> tuple[str, str | None]:
    hits = [(text.find(s), i, s) for i, s in enumerate(stops) if s in text]
    if not hits:
        return text, None
    start, _, stop = min(hits)
    return text[: start + len(stop) if include else start], stop


@pytest.mark.parametrize("include", [False, True])
def test_stop_strings_never_leak(tokenizer: PreTrainedTokenizerBase, include: bool) -> None:
    rng = random.Random(99)
    for trial in range(150):
        prompt = _encode(tokenizer, _random_text(rng))
        text = " ".join(_random_text(rng) for _ in range(3))
        out = _encode(tokenizer, text)
        full = _expected(tokenizer, prompt, out, True)
        # A substring of the output, so it usually spans token boundaries; sometimes an absent one.
        start = rng.randrange(len(full))
        stops = (full[start : start + rng.randint(1, 6)], "never-appears")
        if trial % 4 == 0:
            stops = ("never-appears", "#%&")
        expected, expected_reason = _expected_stop(full, stops, include)
        deltas, reason, det = _stream(tokenizer, prompt, out, rng, stop=stops, include_stop=include)
        assert reason == expected_reason
        assert "".join(deltas) == expected == det.text
        shown = ""
        for delta in deltas:
            shown += delta
            assert expected.startswith(shown)  # nothing past the cut is ever shown


def test_stop_string_spanning_tokens_is_held_back() -> None:
    tok = _byte_level_bpe()
    ids = _encode(tok, "Hello world, hello there")
    det = IncrementalDetokenizer(tok, [], True, ("lo the",), False)
    shown, result = "", DetokResult("")
    for i in ids:
        result = det.push([i])
        shown += result.delta_text
        assert "Hello world, hel".startswith(shown)
        if result.stop_reason is not None:
            break
    assert (shown, result.stop_reason) == ("Hello world, hel", "lo the")
    assert det.push(ids[:2]) == DetokResult("", "lo the")
    assert det.flush() == ""


def test_partial_stop_released_by_flush() -> None:
    tok = _byte_level_bpe()
    det = IncrementalDetokenizer(tok, [], True, ("xyz", "STOP"), False)
    shown = "".join(det.push([i]).delta_text for i in _encode(tok, "ab STO"))
    assert shown == "ab "  # "STO" could still become "STOP"
    assert det.flush() == "STO"
    assert det.text == "ab STO" and det.stop_reason is None


def test_earliest_stop_wins() -> None:
    tok = _byte_level_bpe()
    det = IncrementalDetokenizer(tok, [], True, ("there", "hello"), True)
    result = det.push(_encode(tok, "well hello there"))
    assert result == DetokResult("well hello", "hello")


def test_min_tokens_ignores_early_stop_strings() -> None:
    tok = _byte_level_bpe()
    ids = _encode(tok, "stop one stop two")
    n_first = len(_encode(tok, "stop one"))
    det = IncrementalDetokenizer(tok, [], True, ("stop",), False, min_tokens=n_first + 1)
    shown = ""
    for i in ids:
        result = det.push([i])
        shown += result.delta_text
        if result.stop_reason:
            break
    assert (shown, result.stop_reason) == ("stop one ", "stop")


def test_special_tokens_skipped_or_kept() -> None:
    tok = _unigram_metaspace()
    ids = _encode(tok, "Hello world") + [tok.eos_token_id] + _encode(tok, " again")
    for skip in (True, False):
        deltas, _, _ = _stream(tok, [tok.bos_token_id], ids, random.Random(3), skip=skip)
        assert "".join(deltas) == _expected(tok, [tok.bos_token_id], ids, skip)
        assert ("</s>" in "".join(deltas)) is not skip
