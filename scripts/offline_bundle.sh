#!/usr/bin/env bash
# Build an offline install bundle for an air-gapped GPU host that already has torch.
#
#   scripts/offline_bundle.sh [OUT_DIR] [PYTHON_VERSION] [EXTRA_PACKAGE ...]
#
# OUT_DIR (default .bundle) gets wheels/: the omniserve wheel (abi3: one build serves every
# CPython >= 3.10) and binary wheels of the runtime dependencies that GPU images usually lack,
# for the target's Python version (default 3.12) and manylinux x86_64. On the host, into a
# virtualenv that sees the image's torch:
#
#   python3 -m venv --system-site-packages /opt/omniserve && source /opt/omniserve/bin/activate
#   pip install --no-index --no-deps OUT_DIR/wheels/*.whl
#   omniserve build-kernels            # optional: otherwise each kernel builds on first use
#   omniserve generate "def fib(n):"
#
# The omniserve wheel carries the CUDA sources (omniserve/cuda/), so the installed package builds
# its kernels with the host's nvcc and caches them per user (~/.cache/omniserve/kernels).
# scripts/gpu_check.sh does exactly this and runs the GPU tests against the installed package.
set -euo pipefail

out=${1:-.bundle}
pyver=${2:-3.12}
shift $(( $# > 2 ? 2 : $# ))
root=$(cd "$(dirname "$0")/.." && pwd)

mkdir -p "$out/wheels"
rm -f "$out"/wheels/*.whl
( cd "$root" && maturin build --release --quiet --out "$out/wheels" )

platforms=()
for tag in manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_28_x86_64 manylinux_2_24_x86_64; do
    platforms+=(--platform "$tag")
done
# Pure-Python or binary packages omniserve imports that GPU images often do not carry.
python3 -m pip download --quiet --no-deps --only-binary=:all: --implementation cp \
    --python-version "$pyver" "${platforms[@]}" -d "$out/wheels" msgspec "$@"
# CUTLASS's C++ headers for the large-M GEMM (kernels/gemm_cutlass.py); install it --no-deps:
# only the headers inside it are used, not its Python tooling's dependencies.
python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$out/wheels" "nvidia-cutlass>=4.2"
echo "bundle ready: $(ls "$out"/wheels | wc -l) wheels in $out/wheels"
