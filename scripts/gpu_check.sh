#!/usr/bin/env bash
# One call on a GPU host: install the offline bundle, run the GPU tests, build the kernels, then
# the throughput benchmark (bf16 and the quantized precisions) against HF transformers.
# Results (logs, JSON, PNG) go to $OUT (default ./gpu-results).
#
#   scripts/offline_bundle.sh .bundle 3.12      # on a machine with network and Rust
#   scripts/gpu_check.sh [BATCH ...]            # on the GPU host, from the repository root
set -uo pipefail

out=${OUT:-gpu-results}
mkdir -p "$out"
site=/tmp/omniserve-site
# The package runs from this checkout (python/), so the kernels find their sources in cuda/: the
# bundle's omniserve wheel only lends its compiled scheduler; the other wheels are dependencies.
deps=(); for w in .bundle/wheels/*.whl; do [[ $(basename "$w") == omniserve-* ]] || deps+=("$w"); done
[ ${#deps[@]} -eq 0 ] || python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" "${deps[@]}" || exit 1
python3 - <<'PY' || exit 1
import glob, zipfile
wheel = glob.glob(".bundle/wheels/omniserve-*.whl")[0]
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith("omniserve/_scheduler") and name.endswith(".so"):
            z.extract(name, "python")
PY
export PYTHONPATH="$site:python" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"

python3 -m pytest -q -m gpu -p no:cacheprovider --continue-on-collection-errors tests 2>&1 | tee "$out/pytest-gpu.log" | tail -n 25
batches=("$@")
[ ${#batches[@]} -gt 0 ] || batches=(256)
python3 -m omniserve.cli.main build-kernels 2>&1 | tee "$out/build-kernels.log" | tail -n 4
python3 -m omniserve.cli.main bench throughput --model-config llama-3-8b --batch "${batches[@]}" \
    --input-len 1024 --output-len 512 --dtype bfloat16 \
    --precisions bf16 w4a8kv4 w4a8kv4:g128 w8a8kv8 \
    --output-json "$out/bench-throughput.json" --output-png "$out/bench-throughput.png" \
    2>&1 | tee "$out/bench-throughput.log" | tail -n 12
