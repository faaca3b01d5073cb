"""The small-model training script: data, passkey documents, and an end-to-end toy run on CPU.

The toy run goes through the same file-path entry point the GPU command uses, from a copy of the
training package whose parent `omniserve/__init__.py` refuses to import: the script must not need
the rest of omniserve (Rust extension, msgspec) on a bare training machine.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))

from omniserve.training.corpus import TokenStream, load_corpus, stdlib_dir  # noqa: E402
from omniserve.training.export import load_exported  # noqa: E402
from omniserve.training.needles import FILLERS, PasskeyBuilder, random_key  # noqa: E402
from omniserve.training.tokenizer import BOS_ID, EOS_ID, PAD_ID, encode_documents, train_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def small_corpus():
    corpus = load_corpus(stdlib_dir(), 1_500_000, held_out_percent=10)
    tok = train_tokenizer([f.text for f in corpus.train], vocab_size=1024)
    stream = TokenStream(encode_documents(tok, [f.text for f in corpus.train]), (PAD_ID, BOS_ID, EOS_ID))
    return corpus, tok, stream


def test_corpus_split_depends_only_on_the_path(small_corpus):
    corpus, _, _ = small_corpus
    bigger = load_corpus(stdlib_dir(), 3_000_000, held_out_percent=10)
    assert {f.rel_path for f in corpus.train}.isdisjoint(f.rel_path for f in corpus.held_out)
    # A file keeps its side of the split whatever else is in the corpus (another Python version).
    assert {f.rel_path for f in corpus.held_out} <= {f.rel_path for f in bigger.held_out}
    assert {f.rel_path for f in corpus.train} <= {f.rel_path for f in bigger.train}
    assert all("site-packages" not in f.rel_path for f in bigger.train + bigger.held_out)


def test_digits_are_single_tokens(small_corpus):
    _, tok, _ = small_corpus
    assert tok.encode("key 90210.", add_special_tokens=False).tokens[-7:] == ["Ġ", "9", "0", "2", "1", "0", "."]
    assert tok.encode("x").ids[0] == BOS_ID


@pytest.mark.parametrize("filler", FILLERS)
def test_passkey_documents(small_corpus, filler):
    _, tok, stream = small_corpus
    builder = PasskeyBuilder(tok, stream)
    rng = np.random.default_rng(0)
    for length in (builder.min_length(7), 300, 1500):
        for depth in (0.0, 0.25, 0.5, 1.0):
            key = random_key(rng, int(rng.integers(3, 8)))
            doc = builder.build(length, depth, key, filler, rng)
            assert len(doc.ids) <= length and doc.ids[0] == BOS_ID and doc.ids[-1] == EOS_ID
            assert tok.decode(doc.ids[doc.key_positions].tolist()) == key
            assert tok.decode(doc.ids[doc.answer_start : doc.answer_end].tolist()) == " " + key
            text = tok.decode(doc.prompt_ids[1:].tolist())
            assert text.endswith("What is the pass key? The pass key is")
            if filler != "code":  # sentence filler is assembled at tokenizer boundaries: exact text
                assert tok.encode(text).ids == doc.prompt_ids.tolist()
                # Filled to within a sentence (plus one dropped to fit a line's first sentence).
                longest = max(builder.classic.cont_len.max(), builder.sentences.cont_len.max())
                assert len(doc.ids) >= length - 2 * longest - 2
            if depth == 0.0:
                assert text.split("\n")[1] == f"The pass key is {key}. Remember it. {key} is the pass key."


def test_smoke_training_writes_a_loadable_hf_llama(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    pkg = tmp_path / "src" / "omniserve"
    shutil.copytree(ROOT / "python" / "omniserve" / "training", pkg / "training",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (pkg / "__init__.py").write_text("raise ImportError('the engine is not available here')\n")
    out = tmp_path / "model"
    proc = subprocess.run(
        [sys.executable, str(pkg / "training" / "train_small_model.py"), "--smoke", "--output", str(out)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "passkey [classic]" in proc.stdout

    names = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
             "tokenizer_config.json", "MODEL_CARD.md", "training_log.json"}
    assert names == {p.name for p in out.iterdir()}

    config = AutoConfig.from_pretrained(out)
    assert config.model_type == "llama" and config.head_dim == 64 and config.tie_word_embeddings
    raw = json.loads((out / "config.json").read_text())
    assert raw["architectures"] == ["LlamaForCausalLM"] and raw["torch_dtype"] == "float16"

    tok = AutoTokenizer.from_pretrained(out)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (BOS_ID, EOS_ID, PAD_ID)
    ids = tok("def f():\n    return 42").input_ids
    assert ids[0] == BOS_ID and tok.decode(ids, skip_special_tokens=True) == "def f():\n    return 42"

    tensors = load_file(str(out / "model.safetensors"))
    assert all(t.dtype == torch.float16 for t in tensors.values())
    hf = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    # Tied embeddings: the checkpoint is HF's state dict without lm_head.
    assert set(tensors) == set(hf.state_dict()) - {"lm_head.weight"}

    ours = load_exported(out, torch.device("cpu"), torch.float32)
    x = torch.randint(3, config.vocab_size, (2, 200), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(x).logits
        got = ours.logits(ours(x))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)

    log = json.loads((out / "training_log.json").read_text())
    assert log["training"]["steps"] == 4 and log["training"]["tokens"] > 0
    assert np.isfinite(log["held_out"]["loss"]) and log["held_out"]["perplexity"] > 1
    grid = log["niah"]["classic"]["grid"]
    assert list(grid) == ["256", "512"] and list(grid["256"]) == ["0.0", "0.25", "0.5", "0.75", "1.0"]
    assert {"seed", "torch_version", "samples", "total_wall_s"} <= set(log)
    assert "## Passkey retrieval" in (out / "MODEL_CARD.md").read_text()
