"""Streaming token ids to text, with stop strings, for Hugging Face tokenizers.

Decoding a token on its own is wrong in general: a sentencepiece token's leading "▁" becomes a
space only when text precedes it, a byte-level BPE token can hold part of a multi-byte UTF-8
character, and byte-fallback tokens spell one byte each. Decoding the whole output every step is
right but O(length) per token. So each push decodes a short window, as vLLM does: the window
starts at `prefix_offset`, a token boundary where the text so far ended with a complete
character; `read_offset` marks the first token whose text was not emitted yet. With

    prefix_text = decode(ids[prefix_offset:read_offset])
    window_text = decode(ids[prefix_offset:])
    delta       = window_text[len(prefix_text):]

the context-dependent effects of the window's first token (a stripped leading space) cancel out.
While `window_text` ends in U+FFFD the last character is incomplete, so nothing is emitted until a
later token completes it (or `flush` releases it at the end, as a full decode would show it). The
window only slides when text was emitted, so it always starts where decoding can restart, and it
always holds some visible text (a run of skipped special tokens does not empty it).

Stop strings are searched only in text not yet emitted: every push emits all but the longest tail
that could still grow into a stop string, so no stop string, or any part of one, ever reaches the
caller, and a match can only start in the held tail. The per-push cost is bounded by the new
tokens, the window and the stop strings' lengths, never by the output length.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

PROMPT_CONTEXT_TOKENS = 5
"""Prompt tokens that start the first window, so the first output token is decoded in context
(its leading space kept) as vLLM does (INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET)."""

_MAX_CONTEXT_EXTENSION = 8
"""How many more prompt tokens the first window may take to start on a character boundary (a
UTF-8 character has at most 4 bytes, so a few tokens always suffice for real text)."""

_INCOMPLETE = "\ufffd"


class DetokResult(NamedTuple):
    """What one `IncrementalDetokenizer.push` adds to the output text."""

    delta_text: str
    """Text to append to what was emitted before; may be empty while text is held back."""
    stop_reason: str | None = None
    """The stop string that ended generation, if one matched; later pushes add nothing."""


class IncrementalDetokenizer:
    """Turns one request's generated token ids into text, step by step; see the module docstring.

    The emitted text equals `decode(prompt_ids + output_ids)` minus the prompt's text (for an empty
    prompt: `decode(output_ids)`), cut before the first stop string. Tokenization clean-up (the
    WordPiece-era "a ." -> "a." rewrite) is not applied, as in vLLM's streaming output.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_ids: Sequence[int],
        skip_special_tokens: bool,
        stop: tuple[str, ...],
        include_stop_str_in_output: bool,
        *,
        min_tokens: int = 0,
    ) -> None:
        """`min_tokens`: stop strings that end within the text of the first `min_tokens - 1`
        tokens are ignored, as vLLM does (its check runs once `min_tokens` tokens exist)."""
        self._decode = _decoder(tokenizer, skip_special_tokens)
        # The window must start on a character boundary: cut inside a multi-byte character, its
        # first bytes decode as U+FFFD, and a byte-fallback decoder, which decodes a run of byte
        # tokens all or nothing, would then garble the bytes that follow in the same run too.
        start = max(len(prompt_ids) - PROMPT_CONTEXT_TOKENS, 0)
        lowest = max(start - _MAX_CONTEXT_EXTENSION, 0)
        while start > lowest and self._decode(list(prompt_ids[start:])).startswith(_INCOMPLETE):
            start -= 1
        self._ids = list(prompt_ids[start:])
        """The window: ids[prefix_offset:], so prefix_offset is always 0."""
        self._read_offset = len(self._ids)
        self._prefix_text: str | None = None
        """decode(ids[:read_offset]), cached until the window slides."""
        self._stop = stop
        self._include_stop = include_stop_str_in_output
        self._min_tokens = min_tokens
        self._num_tokens = 0
        self._pending = ""
        """Decoded text not emitted yet: at most the longest stop string minus one character
        between pushes."""
        self._emitted: list[str] = []
        self._stop_reason: str | None = None

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._emitted)

    @property
    def stop_reason(self) -> str | None:
        """The stop string that matched, once one did."""
        return self._stop_reason

    def push(self, new_token_ids: Sequence[int]) -> DetokResult:
        """Add newly generated tokens; returns the text that is now safe to show."""
        if self._stop_reason is not None:
            return DetokResult("", self._stop_reason)
        self._ids.extend(new_token_ids)
        self._num_tokens += len(new_token_ids)
        return self._append(self._decode_window(final=False), final=False)

    def flush(self) -> str:
        """Release the held-back text at the end of generation: an incomplete last character
        (shown as U+FFFD, as a full decode shows it) and a tail that only looked like the start of
        a stop string. A stop string completed by that text still ends the output (see
        `stop_reason`). Returns "" after a stop string matched."""
        if self._stop_reason is not None:
            return ""
        return self._append(self._decode_window(final=True), final=True).delta_text

    def _decode_window(self, final: bool) -> str:
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._ids[: self._read_offset])
        window_text = self._decode(self._ids)
        incomplete = len(window_text) <= len(self._prefix_text) or window_text.endswith(_INCOMPLETE)
        if incomplete and not final:
            return ""
        delta = window_text[len(self._prefix_text) :]
        del self._ids[: self._read_offset]
        self._read_offset = len(self._ids)
        self._prefix_text = None
        return delta

    def _append(self, new_text: str, final: bool) -> DetokResult:
        searched = len(self._pending)
        self._pending += new_text
        if self._stop and self._num_tokens >= self._min_tokens:
            match = self._find_stop(searched)
            if match is not None:
                start, stop = match
                delta = self._pending[: start + len(stop) if self._include_stop else start]
                self._emitted.append(delta)
                self._pending = ""
                self._stop_reason = stop
                return DetokResult(delta, stop)
        hold = 0 if final else self._stop_prefix_len()
        cut = len(self._pending) - hold
        delta, self._pending = self._pending[:cut], self._pending[cut:]
        if delta:
            self._emitted.append(delta)
        return DetokResult(delta)

    def _find_stop(self, searched: int) -> tuple[int, str] | None:
        """Earliest stop string in the pending text that ends past `searched` (matches ending
        before were ruled out or ignored by an earlier push)."""
        best: tuple[int, str] | None = None
        for stop in self._stop:
            start = self._pending.find(stop, max(0, searched - len(stop) + 1))
            if start >= 0 and (best is None or start < best[0]):
                best = (start, stop)
        return best

    def _stop_prefix_len(self) -> int:
        """Length of the longest tail of the pending text that is a proper prefix of a stop
        string: that tail may still become a stop string, so it must not be shown yet."""
        pending = self._pending
        hold = 0
        for stop in self._stop:
            # The earliest start of a tail that `stop` begins with gives the longest tail.
            pos = pending.find(stop[0], max(len(pending) - len(stop) + 1, 0))
            while pos >= 0:
                if stop.startswith(pending[pos:]):
                    hold = max(hold, len(pending) - pos)
                    break
                pos = pending.find(stop[0], pos + 1)
        return hold


def _decoder(
    tokenizer: PreTrainedTokenizerBase, skip_special_tokens: bool
) -> Callable[[list[int]], str]:
    """A fast tokenizer's Rust `decode` directly, since it runs twice per token and request and
    the transformers wrapper's per-call overhead dominates on such short windows; a slow
    tokenizer's own `decode` otherwise."""
    if isinstance(tokenizer, PreTrainedTokenizerFast):
        backend = tokenizer.backend_tokenizer
        return lambda ids: backend.decode(ids, skip_special_tokens=skip_special_tokens)
    # transformers types decode() as str | list[str]; a flat id list decodes to one str.
    return lambda ids: tokenizer.decode(  # type: ignore[return-value]
        ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False
    )
