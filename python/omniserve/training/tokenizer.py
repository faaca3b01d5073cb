"""Byte-level BPE tokenizer trained with `tokenizers` on the corpus, saved as standard HF files.

Digits are split into single tokens before BPE, so every passkey tokenizes the same way (one
token per digit) whatever digits it has; retrieval then means copying a fixed-shape token span.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2  # order of `special_tokens` in the trainer below


def train_tokenizer(texts: Sequence[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # Llama convention: encoding a text prepends <s>, as every training document starts with it.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, BOS_ID)]
    )
    assert [tok.token_to_id(t) for t in (PAD, BOS, EOS)] == [PAD_ID, BOS_ID, EOS_ID]
    return tok


def encode_plain(tok: Tokenizer, text: str) -> np.ndarray:
    """Ids of `text` alone (no <s>), for assembling documents piece by piece."""
    return np.asarray(tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)


def encode_documents(
    tok: Tokenizer, texts: Sequence[str], chunk_chars: int = 16_000_000
) -> np.ndarray:
    """`<s> text </s>` for each text, concatenated (the batch encode runs on all cores).

    Texts go to the tokenizer in chunks of about `chunk_chars` characters: each `Encoding` keeps its
    token strings, so one batch of a few hundred MB of source would hold tens of GB at once.
    """
    # encode_batch_fast (tokenizers >= 0.21) skips character offsets, which we never use.
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    parts: list[np.ndarray] = []
    chunk: list[str] = []
    size = 0
    for i, text in enumerate(texts):
        chunk.append(text)
        size += len(text)
        if size >= chunk_chars or i == len(texts) - 1:
            for enc in encode(chunk, add_special_tokens=False):
                parts.append(np.asarray([BOS_ID, *enc.ids, EOS_ID], dtype=np.int32))
            chunk, size = [], 0
    return np.concatenate(parts)


CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "# {{ message['role'] }}: {{ message['content'] | replace('\\n', '\\n# ') }}\n"
    "{% endfor %}{% if add_generation_prompt %}# assistant:\n{% endif %}"
)
"""The chat template the model ships with. It was trained on Python, not on conversations, so a
conversation becomes what it knows: comment lines (`# user: ...`), then `# assistant:` and the
code it writes."""


def save_tokenizer(tok: Tokenizer, directory: Path, model_max_length: int) -> None:
    """`tokenizer.json` + `tokenizer_config.json`, loadable by `AutoTokenizer` in transformers 4.x/5.x.

    Written by hand instead of `PreTrainedTokenizerFast.save_pretrained` so the files do not depend
    on the transformers version of the machine that trains.
    """
    tok.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
        "added_tokens_decoder": {
            str(i): {
                "content": t,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for i, t in enumerate((PAD, BOS, EOS))
        },
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
