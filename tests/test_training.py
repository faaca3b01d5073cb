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
from email.message import Message
from pathlib import Path

import numpy as np
import pytest
import torch

from omniserve.training.corpus import (
    STDLIB,
    TokenStream,
    load_corpus,
    permissive_licence,
    stdlib_dir,
)
from omniserve.training.evaluate import text_windows
from omniserve.training.export import load_exported
from omniserve.training.needles import FILLERS, PasskeyBuilder, random_key
from omniserve.training.reference import write_heldout
from omniserve.training.tokenizer import (
    BOS_ID,
    CHAT_TEMPLATE,
    EOS_ID,
    PAD_ID,
    encode_documents,
    save_tokenizer,
    train_tokenizer,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small_corpus():
    corpus = load_corpus(stdlib_dir(), 1_500_000, held_out_percent=10)
    tok = train_tokenizer([f.text for f in corpus.train], vocab_size=1024)
    stream = TokenStream(
        encode_documents(tok, [f.text for f in corpus.train]), (PAD_ID, BOS_ID, EOS_ID)
    )
    return corpus, tok, stream


def test_corpus_split_depends_only_on_the_path(small_corpus):
    corpus, _, _ = small_corpus
    bigger = load_corpus(stdlib_dir(), 3_000_000, held_out_percent=10)
    assert {f.rel_path for f in corpus.train}.isdisjoint(f.rel_path for f in corpus.held_out)
    # A file keeps its side of the split whatever else is in the corpus (another Python version).
    assert {f.rel_path for f in corpus.held_out} <= {f.rel_path for f in bigger.held_out}
    assert {f.rel_path for f in corpus.train} <= {f.rel_path for f in bigger.train}
    assert all(
        "site-packages" not in f.rel_path
        for f in bigger.train + bigger.held_out
        if f.source == STDLIB
    )


def _metadata(**fields: str | list[str]) -> Message:
    meta = Message()
    for name, value in fields.items():
        for v in value if isinstance(value, list) else [value]:
            meta[name.replace("_", "-")] = v
    return meta


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"License_Expression": "BSD-3-Clause"}, "BSD-3-Clause"),
        (
            {"License_Expression": "Apache-2.0 WITH LLVM-exception AND MIT"},
            "Apache-2.0 WITH LLVM-exception AND MIT",
        ),
        ({"License_Expression": "MPL-2.0 AND MIT"}, None),
        ({"License_Expression": "LicenseRef-NVIDIA-Proprietary"}, None),
        # PEP 639: the expression wins over classifiers.
        (
            {
                "License_Expression": "GPL-3.0-only",
                "Classifier": "License :: OSI Approved :: MIT License",
            },
            None,
        ),
        (
            {"Classifier": ["License :: OSI Approved", "License :: OSI Approved :: BSD License"]},
            "BSD",
        ),
        (
            {
                "License": "Apache 2.0",
                "Classifier": "License :: OSI Approved :: Apache Software License",
            },
            "Apache",
        ),
        ({"License": "ISC license"}, "ISC"),
        ({"License": "Simplified BSD"}, "BSD"),  # "mpl" inside a word is not the MPL
        ({"License": "LGPLv3+"}, None),
        (
            {
                "License": "GNU General Public License",
                "Classifier": "License :: OSI Approved :: MIT License",
            },
            None,
        ),
        (
            {
                "License": "Dual License",
                "Classifier": [
                    "License :: OSI Approved :: BSD License",
                    "License :: OSI Approved :: Apache Software License",
                ],
            },
            "Apache, BSD",
        ),
        ({"License": "public domain, Python, 2-Clause BSD, GPL 3"}, None),
        (
            {
                "Classifier": [
                    "License :: OSI Approved :: BSD License",
                    "License :: OSI Approved :: GNU General Public License (GPL)",
                ]
            },
            None,
        ),
        ({"Classifier": "License :: Other/Proprietary License"}, None),
        ({"License": "UNKNOWN"}, None),
        ({}, None),
        # A licence's full text is for people to read: it is not interpreted, so this one is unknown.
        (
            {
                "License": "Permission is hereby granted, free of charge,\nto any person obtaining a copy"
            },
            None,
        ),
    ],
)
def test_permissive_licence(fields, expected):
    assert permissive_licence(_metadata(**fields)) == expected


def test_corpus_adds_permissive_packages_after_the_stdlib(tmp_path):
    (tmp_path / "pkg").mkdir()
    for i in range(40):  # a toy stdlib: the packages fill the rest of the budget
        (tmp_path / "pkg" / f"mod{i}.py").write_text(f"def f{i}(x):\n    return x + {i}\n")
    (tmp_path / "pkg" / "copy.py").write_text(
        "def f0(x):\n    return x + 0\n"
    )  # same text as mod0.py
    budget = 2_000_000
    corpus = load_corpus(tmp_path, budget, held_out_percent=10)
    assert corpus == load_corpus(tmp_path, budget, held_out_percent=10)  # deterministic
    files = corpus.train + corpus.held_out
    assert sum(len(f.text.encode()) for f in files) <= budget
    assert (
        corpus.sources[0].name == STDLIB and corpus.sources[0].files == 40
    )  # one of the two copies
    packages = {s.name: s for s in corpus.sources[1:]}
    assert packages and all(s.licence and s.files and s.bytes for s in packages.values())
    skipped = {s["name"] for s in corpus.skipped}
    assert not skipped & set(packages)
    assert {f.source for f in files} == {STDLIB, *packages}
    for f in files:
        if f.source != STDLIB:
            parts = f.rel_path.split("/")
            assert parts[0] == "site-packages" and not {"_vendor", "third_party"} & set(parts), (
                f.rel_path
            )
    # Held-out files, by path and by text, never reach training.
    assert {f.rel_path for f in corpus.train}.isdisjoint(f.rel_path for f in corpus.held_out)
    assert {f.text for f in corpus.train}.isdisjoint(f.text for f in corpus.held_out)
    assert len({f.text for f in files}) == len(files)


def test_text_windows_spread_over_the_text():
    ids = list(range(100, 150))  # 50 tokens: 5 windows of 1 <s> + 9 tokens (+ 5 left over)
    every = text_windows(ids, 10, 1, None)
    assert every == [[1, *range(100 + 9 * i, 109 + 9 * i)] for i in range(5)]
    assert text_windows(ids, 10, 1, 3) == [every[0], every[2], every[4]]
    assert text_windows(ids, 10, 1, 1) == [every[0]]
    assert text_windows(ids, 10, None, 2) == [list(range(100, 110)), list(range(140, 150))]
    with pytest.raises(ValueError):
        text_windows(ids[:5], 10, 1, None)


def test_heldout_sample_takes_whole_files_within_its_cap(tmp_path, small_corpus):
    corpus, _, _ = small_corpus
    info = write_heldout(tmp_path, corpus.held_out, max_bytes=20_000)
    text = (tmp_path / "heldout.txt").read_text()
    assert len(text.encode()) == info["bytes"] <= 20_000 and info["files"] == len(info["paths"]) > 0
    held = {f.rel_path: f.text for f in corpus.held_out}
    assert all(held[p].rstrip("\n") in text for p in info["paths"])


def test_digits_are_single_tokens(small_corpus):
    _, tok, _ = small_corpus
    assert tok.encode("key 90210.", add_special_tokens=False).tokens[-7:] == [
        "Ġ",
        "9",
        "0",
        "2",
        "1",
        "0",
        ".",
    ]
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
                assert (
                    text.split("\n")[1]
                    == f"The pass key is {key}. Remember it. {key} is the pass key."
                )


def test_smoke_training_writes_a_loadable_hf_llama(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    pkg = tmp_path / "src" / "omniserve"
    shutil.copytree(
        ROOT / "python" / "omniserve" / "training",
        pkg / "training",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    (pkg / "__init__.py").write_text("raise ImportError('the engine is not available here')\n")
    out = tmp_path / "model"
    proc = subprocess.run(
        [
            sys.executable,
            str(pkg / "training" / "train_small_model.py"),
            "--smoke",
            "--output",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "passkey [classic]" in proc.stdout

    names = {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "MODEL_CARD.md",
        "training_log.json",
        "heldout.txt",
        "eval_reference.json",
    }
    assert names == {p.name for p in out.iterdir()}

    config = AutoConfig.from_pretrained(out)
    assert config.model_type == "llama" and config.head_dim == 64 and config.tie_word_embeddings
    raw = json.loads((out / "config.json").read_text())
    assert raw["architectures"] == ["LlamaForCausalLM"] and raw["torch_dtype"] == "float16"

    tok = AutoTokenizer.from_pretrained(out)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (BOS_ID, EOS_ID, PAD_ID)
    ids = tok("def f():\n    return 42").input_ids
    assert (
        ids[0] == BOS_ID and tok.decode(ids, skip_special_tokens=True) == "def f():\n    return 42"
    )

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
    assert list(grid) == ["256", "512"] and list(grid["256"]) == [
        "0.0",
        "0.25",
        "0.5",
        "0.75",
        "1.0",
    ]
    assert {"seed", "torch_version", "samples", "total_wall_s"} <= set(log)
    assert (
        log["data"]["sources"][0]["name"] == "stdlib" and log["data"]["heldout_file"]["bytes"] > 0
    )
    # The toy model cannot pass the passkey check, so the final weights are exported.
    assert (
        log["selection"]["chosen_step"] == 4
        and log["selection"]["heldout_curve"][-1]["candidate"] is False
    )
    card = (out / "MODEL_CARD.md").read_text()
    assert "## Passkey retrieval" in card and "## Reference numbers for the engine" in card

    reference = json.loads((out / "eval_reference.json").read_text())
    assert reference == log["reference"]
    assert (
        reference["perplexity"]["windows"] == 16
        and reference["perplexity"]["tokens_scored"] == 16 * 511
    )
    assert reference["niah"]["lengths"] == [256, 512] and len(reference["niah"]["accuracy"]) == 2


def test_selector_exports_the_lowest_loss_checkpoint_that_retrieves(monkeypatch):
    from omniserve.training import train_small_model as tsm
    from omniserve.training.model import LlamaLM, ModelConfig

    # (progress, quick held-out loss, passkey at the longest rows): the passkey check only runs once
    # the curriculum has reached them (35%); the lowest loss overall (1.0) comes before that.
    script = [(0.2, 1.0, None), (0.4, 2.0, 0.5), (0.6, 1.5, 1.0), (0.8, 1.8, 0.95), (1.0, 2.5, 1.0)]
    losses = iter(s[1] for s in script)
    passkeys = iter(s[2] for s in script if s[2] is not None)
    monkeypatch.setattr(tsm, "heldout_loss", lambda *a, **k: (next(losses), 0))
    monkeypatch.setattr(
        tsm, "passkey_accuracy", lambda *a, **k: {"classic": {"overall": next(passkeys)}}
    )
    model = LlamaLM(
        ModelConfig(
            vocab_size=32,
            hidden_size=16,
            intermediate_size=32,
            num_layers=1,
            num_heads=2,
            num_kv_heads=1,
            head_dim=8,
            max_position_embeddings=64,
        )
    )
    args = tsm.parse_args(["--output", "unused", "--smoke"])
    selector = tsm.Selector(model, None, None, None, args, torch.autocast("cpu", enabled=False))
    for step, (progress, _, _) in enumerate(script, start=1):
        with torch.no_grad():
            model.model.norm.weight.fill_(step)  # marks the weights of this step
        selector.evaluate(step, 0.0, progress)
    assert [e["candidate"] for e in selector.curve] == [False, False, True, True, True]
    chosen = selector.restore_best()
    assert chosen["step"] == 3 and chosen["loss"] == 1.5
    assert torch.equal(model.model.norm.weight, torch.full((16,), 3.0))


def test_the_bundled_chat_template_is_the_one_training_writes(tmp_path: Path) -> None:
    """The training script records the chat template; the shipped tokenizer carries that one,
    and it renders a conversation as comment lines the code model continues."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from omniserve.engine.engine import bundled_model_path

    bundled = bundled_model_path()
    shipped = json.loads((bundled / "tokenizer_config.json").read_text())
    assert shipped["chat_template"] == CHAT_TEMPLATE
    save_tokenizer(Tokenizer.from_file(str(bundled / "tokenizer.json")), tmp_path, 8192)
    written = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert written == shipped
    chat = [{"role": "user", "content": "Write fib\nin Python"}]
    text = AutoTokenizer.from_pretrained(tmp_path).apply_chat_template(
        chat, tokenize=False, add_generation_prompt=True
    )
    assert text == "<s># user: Write fib\n# in Python\n# assistant:\n"
