"""A real byte-level BPE tokenizer, trained in a moment on fixed text, saved as standard HF files.

Tests use it beside tiny random checkpoints so that text goes through the same tokenizer code a
real model uses (special tokens, chat template, incremental detokenization of multi-byte text).
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog. Hello world!",
    "import os\nimport sys\nfor i in range(10):\n    print(i, os.sep, sys.argv)\n",
    "Ünïcödé text: naïve café, 東京, 你好世界, emoji 🙂🚀 and math ∑∫≈.",
    "class Engine:\n    '''Serve models.'''\n    def step(self) -> list[int]:\n        pass\n",
    "stop strings, STOP, ### end, <|user|> <|assistant|> <|system|>",
] * 4


def build_tokenizer(directory: str | Path, vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """Train and save into `directory`; returns the loaded HF tokenizer."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(str(directory))
    return hf
