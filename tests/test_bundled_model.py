"""The bundled model through the engine on CPU: it is the default model, it generates, and
`omniserve eval` reproduces the reference numbers that the training code computed for it
(`eval_reference.json`, written by `omniserve.training.reference`).

The reference is the training model's own forward pass on the same fp16 weights upcast to fp32, and
the engine runs fp32 on CPU too, so the two differ only in the order of floating-point operations
(paged attention, chunked prefill, fused projections): ~1e-6 relative on logits, far below 1e-3 on
perplexity. A 1% tolerance on perplexity is therefore loose for arithmetic noise, yet tight against
real engine errors (a missing <s>, an off-by-one position, a wrong RoPE or GQA mapping move the
perplexity of a code model by tens of percent). Passkey retrieval is greedy decoding, where an
argmax near a tie may flip: each cell may differ by one needle.
"""

from __future__ import annotations

import hashlib
import json

import pytest

from omniserve import Engine, SamplingParams
from omniserve.cli.main import main as cli_main
from omniserve.engine.engine import bundled_model_path

MODEL = bundled_model_path()
REFERENCE = json.loads((MODEL / "eval_reference.json").read_text())
# Small KV cache and step budget: quick to allocate, and plenty for 2048-token prompts on 2 cores.
ENGINE_ARGS = [
    "--device",
    "cpu",
    "--dtype",
    "float32",
    "--num-kv-pages",
    "160",
    "--max-num-batched-tokens",
    "4096",
]
PPL_TOLERANCE = 0.01


def test_reference_belongs_to_the_shipped_weights():
    digest = hashlib.sha256((MODEL / REFERENCE["weights"]).read_bytes()).hexdigest()
    assert digest == REFERENCE["weights_sha256"], (
        "eval_reference.json is stale: rerun omniserve.training.reference"
    )


def test_default_engine_is_the_bundled_model_and_generates():
    engine = Engine.from_pretrained(device="cpu", num_kv_pages=16)
    assert engine.config.model == str(MODEL)
    [out] = engine.generate(["def add(a, b):\n"], SamplingParams(max_tokens=12, temperature=0.0))
    assert 1 <= len(out.token_ids) <= 12 and isinstance(out.text, str)


def test_eval_ppl_matches_the_reference(tmp_path):
    ref = REFERENCE["perplexity"]
    out = tmp_path / "ppl.json"
    argv = [
        "eval",
        "ppl",
        "--seq-len",
        str(ref["seq_len"]),
        "--max-windows",
        str(ref["max_windows"]),
        "--output-json",
        str(out),
        *ENGINE_ARGS,
    ]
    assert cli_main(argv) == 0
    got = json.loads(out.read_text())
    assert got["data"] == str(
        MODEL / ref["data"]
    )  # the bundled held-out sample is the default data
    assert (got["windows"], got["tokens_scored"]) == (ref["windows"], ref["tokens_scored"])
    assert got["perplexity"] == pytest.approx(ref["perplexity"], rel=PPL_TOLERANCE)


def test_eval_niah_matches_the_reference(tmp_path):
    ref = REFERENCE["niah"]
    out_json, out_png = tmp_path / "niah.json", tmp_path / "niah.png"
    argv = [
        "eval",
        "niah",
        "--lengths",
        ",".join(map(str, ref["lengths"])),
        "--depths",
        ",".join(map(str, ref["depths"])),
        "--samples",
        str(ref["samples"]),
        "--filler",
        ref["filler"],
        "--output-json",
        str(out_json),
        "--output-png",
        str(out_png),
        *ENGINE_ARGS,
    ]
    assert cli_main(argv) == 0
    got = json.loads(out_json.read_text())
    assert (got["lengths"], got["depths"], got["samples"]) == (
        ref["lengths"],
        ref["depths"],
        ref["samples"],
    )
    one_needle = 1 / ref["samples"]
    for got_row, ref_row in zip(got["accuracy"], ref["accuracy"], strict=True):
        for got_cell, ref_cell in zip(got_row, ref_row, strict=True):
            assert abs(got_cell - ref_cell) <= one_needle + 1e-9, (got["accuracy"], ref["accuracy"])
    assert got["overall"] >= 0.9
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
