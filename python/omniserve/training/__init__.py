"""Training of omniserve's own small Llama-architecture model (the embedded default model).

Self-contained on purpose: nothing here imports the rest of omniserve (engine, Rust extension,
msgspec), so the training script runs on a bare machine as a file path:
`python python/omniserve/training/train_small_model.py --output DIR`.

Modules, one job each: `corpus` (stdlib and permissively licensed package source, held-out
split, token streams), `tokenizer` (byte-level BPE and its HF files), `needles` (passkey documents
and prompts, evaluation grids), `model` (the plain-torch Llama and its HF tensor names), `evaluate`
(held-out loss, perplexity windows, passkey retrieval, code samples), `export` (the shipped model
directory), `reference` (`heldout.txt` and the numbers the engine must reproduce),
`train_small_model` (the CLI).
"""
