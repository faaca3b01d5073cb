"""The shipped model directory: HF `config.json`, fp16 safetensors, tokenizer files, model card.

The layout is what `LlamaForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` read, so
the engine loads it like any downloaded Llama checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from .model import LlamaLM, ModelConfig
from .tokenizer import BOS_ID, EOS_ID, PAD_ID, save_tokenizer

WEIGHTS = "model.safetensors"


def hf_config(cfg: ModelConfig) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,  # transformers 5 reads this legacy key into rope_parameters
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": True,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
        "torch_dtype": "float16",
        "initializer_range": 0.02,
        "use_cache": True,
    }


def model_config_from_hf(config: dict) -> ModelConfig:
    return ModelConfig(
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_layers=config["num_hidden_layers"],
        num_heads=config["num_attention_heads"],
        num_kv_heads=config["num_key_value_heads"],
        head_dim=config["head_dim"],
        max_position_embeddings=config["max_position_embeddings"],
        rope_theta=config["rope_theta"],
        rms_norm_eps=config["rms_norm_eps"],
    )


def export_model(model: LlamaLM, tok: Tokenizer, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {
        name: p.detach().to("cpu", torch.float16).contiguous()
        for name, p in model.state_dict().items()
    }
    save_file(tensors, str(directory / WEIGHTS), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(hf_config(model.cfg), indent=2) + "\n")
    generation = {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID}
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    save_tokenizer(tok, directory, model.cfg.max_position_embeddings)


def load_exported(directory: Path, device: torch.device, dtype: torch.dtype) -> LlamaLM:
    """The shipped checkpoint as our module, so evaluation measures exactly the fp16 weights shipped."""
    cfg = model_config_from_hf(json.loads((directory / "config.json").read_text()))
    model = LlamaLM(cfg)
    model.load_state_dict(load_file(str(directory / WEIGHTS)), strict=True)
    return model.to(device=device, dtype=dtype).eval()


def _percent_grid(accuracy: list[list[float]], lengths: list, depths: list) -> str:
    rows = [
        f"| {L} | " + " | ".join(f"{a:.0%}" for a in row) + " |"
        for L, row in zip(lengths, accuracy)
    ]
    header = "| context | " + " | ".join(f"depth {d:g}" for d in depths) + " |"
    return "\n".join([header, "| --- |" + " --- |" * len(depths), *rows])


def write_model_card(directory: Path, log: dict) -> None:
    m, d, t, h, sel, ref = (
        log["model"],
        log["data"],
        log["training"],
        log["held_out"],
        log["selection"],
        log["reference"],
    )
    niah_rows = []
    for filler, res in log["niah"].items():
        cells = " | ".join(f"{acc:.0%}" for acc in res["by_length"].values())
        niah_rows.append(f"| {filler} | {cells} | {res['overall']:.1%} |")
    lengths = list(next(iter(log["niah"].values()))["by_length"])
    samples = "\n\n".join(
        f"Prompt:\n```python\n{s['prompt']}\n```\nGreedy completion:\n```python\n{s['prompt']}{s['completion']}\n```"
        for s in log["samples"]
    )
    sources = "\n".join(
        f"| {s['name']} | {s['version']} | {s['licence']} | {s['files']} | {s['bytes'] / 1e6:.2f} |"
        for s in d["sources"]
    )
    skipped = ", ".join(
        f"{s['name']} ({s['declared'] or 'none declared'})" for s in d["skipped_distributions"]
    )
    stdlib_loss = (
        ""
        if h.get("stdlib") is None
        else (
            f" On the stdlib's held-out files alone (the yardstick of earlier, stdlib-only models): loss "
            f"{h['stdlib']['loss']:.3f}, perplexity {h['stdlib']['perplexity']:.2f}."
        )
    )
    rp, rn = ref["perplexity"], ref["niah"]
    card = f"""# omniserve-small-code-{m["parameters"] / 1e6:.1f}M

A small Llama-architecture model trained by omniserve's own script, shipped inside the package as
the default model of `omniserve generate` and as the accuracy yardstick for quantization and sparse
attention. It writes Python and retrieves a passkey hidden in long filler text; it is not a chat or
general-purpose model. Its chat template (so that `/v1/chat/completions` works on it) renders a
conversation as Python comment lines and lets the model continue with code.

## Model

Llama decoder ({m["num_layers"]} layers, hidden {m["hidden_size"]}, SwiGLU intermediate {m["intermediate_size"]},
{m["num_heads"]} query heads / {m["num_kv_heads"]} KV heads of dim {m["head_dim"]} (GQA), RMSNorm, RoPE theta
{m["rope_theta"]:g}, tied embeddings), {m["parameters"]:,} parameters, fp16 safetensors, context
{m["max_position_embeddings"]} tokens. Byte-level BPE tokenizer of {m["vocab_size"]} tokens trained with `tokenizers` on
the first {d["tokenizer_sample_bytes"] / 1e6:.0f} MB of the training split; digits are single tokens; `<s>` (added
when encoding), `</s>`, `<pad>`.

## Data

- Python source, {d["train_files"] + d["held_out_files"]:,} files within a {d["max_corpus_mb"]:g} MB budget: the whole Python
  {d["python_version"]} standard library, then `.py` files of the installed distributions whose metadata declares a
  permissive licence (SPDX `License-Expression` naming only MIT, BSD, Apache-2.0, PSF, ISC, 0BSD, Zlib,
  BSL-1.0, CC0-1.0 or CNRI-Python licences; without one, trove classifiers and a short `License` field
  naming only the MIT, BSD, Apache, PSF or ISC families), in SHA-1-of-path order. Left out: vendored
  directories (`_vendor`, `third_party`, ...), which carry other projects' licences; files over 1 MB or
  with very long lines (generated tables); exact duplicates of a file already taken.
- {d["train_files"]:,} files ({d["train_bytes"] / 1e6:.1f} MB, {d["train_tokens"]:,} tokens) for training;
  {d["held_out_files"]:,} files ({d["held_out_bytes"] / 1e6:.2f} MB, {d["held_out_tokens"]:,} tokens) held out, chosen by
  SHA-1 of the path relative to the stdlib or site-packages directory ({d["held_out_percent"]}%), so no held-out file
  (nor its exact text under another path) is trained on. `heldout.txt` holds {d["heldout_file"]["files"]} of them
  ({d["heldout_file"]["bytes"] / 1e3:.0f} KB, whole files in corpus order, one blank line between files).
- Synthetic passkey documents in {d["passkey_fraction"]:.0%} of rows: the standard passkey layout
  (task line, filler, "The pass key is N. Remember it. N is the pass key.", filler, "What is the pass
  key? The pass key is N."), filler `classic` (grass/sky/sun sentences), `sentences` (random plain
  sentences) or `code` (training source), needle at a uniform depth, 3 to 7 digits, documents of 1/2 to
  1 times a row length of {", ".join(map(str, t["sequence_lengths"]))} tokens (short rows first). The
  prompt builder is `omniserve.training.needles.PasskeyBuilder`.

| source | version | licence | files | MB |
| --- | --- | --- | --- | --- |
{sources}

Distributions left out for their licence (declared licence): {skipped or "none"}.

## Training

{t["steps"]} steps, {t["tokens"] / 1e6:.0f}M tokens ({t["tokens_per_step"]:,} per step), {t["wall_s"]:.0f} s on
{log["device"]} (torch {log["torch_version"]}, seed {log["seed"]}); AdamW (peak lr {t["lr"]:g}, warmup
{t["warmup_steps"]} steps, cosine to {t["min_lr_ratio"]:g}x over the time budget, weight decay {t["weight_decay"]:g}),
bf16 autocast on GPU, loss on every token but the needle's random digits, the passkey answer
weighted x{t["answer_weight"]:g}. Final train loss on code rows {t["final_code_loss"]:.3f}; passkey answer token accuracy
{t["final_answer_token_accuracy"]:.1%}.

Exported checkpoint: step {sel["chosen_step"]} of {sel["final_step"]}, chosen by the {sel["rule"]}.
Quick held-out loss during training: {", ".join(f"{e['loss']:.3f} (step {e['step']})" for e in sel["heldout_curve"])}.

Held-out loss {h["loss"]:.3f} (perplexity {h["perplexity"]:.2f}, per token of this tokenizer, {h["tokens"]:,} tokens in
{h["window"]}-token windows, fp16 weights).{stdlib_loss}

## Passkey retrieval

Greedy decoding of fresh 5-digit keys (seed {log["niah_seed"]}, distinct from training), prompt plus
answer within each context length, depths {", ".join(map(str, log["niah_depths"]))}, {log["niah_samples"]} keys per cell:

| filler | {" | ".join(lengths)} | all |
| --- | {" | ".join("---" for _ in lengths)} | --- |
{chr(10).join(niah_rows)}

## Reference numbers for the engine (`eval_reference.json`)

Computed after export by `omniserve.training.reference` with the training model code on the shipped
fp16 weights upcast to fp32 ({ref["computed_with"]["device"]}), by the definitions of `omniserve eval`, so that the
engine in fp32 must reproduce them (`tests/test_bundled_model.py`):

- `omniserve eval ppl --seq-len {rp["seq_len"]} --max-windows {rp["max_windows"]}` on `heldout.txt`: perplexity
  {rp["perplexity"]:.3f} (mean NLL {rp["mean_nll"]:.4f}, {rp["tokens_scored"]:,} tokens in {rp["windows"]} windows of
  {rp["seq_len"]}, each led by `<s>`).
- `omniserve eval niah --lengths {",".join(map(str, rn["lengths"]))} --depths {",".join(f"{x:g}" for x in rn["depths"])} --samples {rn["samples"]}`
  (filler `{rn["filler"]}`, seed {rn["seed"]}): overall {rn["overall"]:.1%}.

{_percent_grid(rn["accuracy"], rn["lengths"], rn["depths"])}

## Samples

{samples}

## Reproduce

```
python python/omniserve/training/train_small_model.py --output python/omniserve/assets/model --time-budget-s {t["time_budget_s"]:g} --seed {log["seed"]}
```
(or `python -m omniserve.training.train_small_model ...`). One GPU; the run's wall time, data
preparation included, is `total_wall_s` in `training_log.json`. The run is seeded, but it stops on
a wall-clock budget and GPU kernels are not bitwise deterministic, so another run gives a model of
the same quality, not the same bits; `--max-steps`
fixes the step count. The corpus is the stdlib and site-packages of the interpreter that runs the
script, so it follows that machine's installed distributions (listed above).
All numbers here come from `training_log.json` and `eval_reference.json` next to this card.
"""
    (directory / "MODEL_CARD.md").write_text(card)
