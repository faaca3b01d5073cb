#!/usr/bin/env bash
# One call on a GPU host: install the offline bundle, run the GPU tests against the installed
# package, build the kernels, then the throughput benchmark (bf16 and the quantized precisions)
# against HF transformers.
# Results (logs, JSON, PNG) go to $OUT (default ./gpu-results).
#
#   scripts/offline_bundle.sh .bundle 3.12      # on a machine with network and Rust
#   scripts/gpu_check.sh [BATCH ...]            # on the GPU host, from the repository root
set -uo pipefail

out=${OUT:-gpu-results}
mkdir -p "$out"
# The bundle installed as a user would: a fresh virtualenv over the image's torch, the omniserve
# wheel (which carries the CUDA sources) and its dependencies. Everything below runs that
# installed package, not the checkout's python/.
venv=${VENV:-/tmp/omniserve-venv}
rm -rf "$venv"
# Where the image's torch, transformers and pytest live: the system site, or a venv of the image's
# own (then --system-site-packages alone does not see them, so a .pth file names the place).
image_sites=$(python3 -c 'import os, pytest, torch, transformers
print(*sorted({os.path.dirname(os.path.dirname(m.__file__)) for m in (torch, transformers, pytest)}), sep="\n")') || exit 1
python3 -m venv --system-site-packages --without-pip "$venv" || exit 1
echo "$image_sites" > "$(echo "$venv"/lib/python3*/site-packages)/_image_packages.pth"
# shellcheck disable=SC1091
source "$venv/bin/activate"
# The image's pip (seen through the system site) installs into the active venv.
python3 -m pip install -q --no-index --no-deps --no-compile .bundle/wheels/*.whl || exit 1
python3 -P -c 'import omniserve, sys; sys.exit(not omniserve.__file__.startswith(sys.prefix))' ||
    { echo "omniserve is not imported from $venv" >&2; exit 1; }
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"

python3 -m pytest -q -m gpu -p no:cacheprovider --continue-on-collection-errors tests 2>&1 | tee "$out/pytest-gpu.log" | tail -n 25
batches=("$@")
[ ${#batches[@]} -gt 0 ] || batches=(256)
omniserve build-kernels 2>&1 | tee "$out/build-kernels.log" | tail -n 4
omniserve bench throughput --model-config llama-3-8b --batch "${batches[@]}" \
    --input-len 1024 --output-len 512 --dtype bfloat16 \
    --precisions bf16 w4a8kv4 w4a8kv4:g128 w8a8kv8 \
    --output-json "$out/bench-throughput.json" --output-png "$out/bench-throughput.png" \
    2>&1 | tee "$out/bench-throughput.log" | tail -n 12
