// Kernel choice per call (gemm/params.h `Path`) and the per-format launcher the binding calls.
// Large M goes to the CUTLASS path (kernels/gemm_cutlass.py) before reaching this extension.
#pragma once

#include "gemm/small_m.cuh"
#include "gemm/tensor_core.cuh"

namespace omniserve::gemm {

// Auto: the memory-bound kernel up to M = 32, and up to kSmallMMax while the tensor-core grid
// would fill under a third of the SMs (such a grid leaves most SMs idle, and the memory-bound
// kernel, which splits K over its warps, is then faster; with a fuller grid the tensor-core kernel
// is); the tensor-core kernel above. Retune by timing both paths:
// `python -m omniserve.bench.kernels_gemm --paths small_m tensor_core`.
constexpr int kSms = 132;  // an H100's (or H200's) SMs

inline bool small_m_wins(const GemmParams& p) {
  const int tensor_core_blocks = (p.m + kWgTokens - 1) / kWgTokens * (p.n / kBlockN);
  return p.m <= 32 || (p.m <= kSmallMMax && 3 * tensor_core_blocks < kSms);
}

// The tensor-core tile: 128-token blocks once they fill a wave; 64-token blocks (two per SM where
// W4 fits) below that; no K split. Forced tiles (tests, `kernels_gemm --tiles`) measure the
// others; a per-call choice among them waits for its GPU validation.
inline Tile choose_tile(const GemmParams& p) {
  if ((p.m + 127) / 128 * (p.n / kBlockN) >= kSms) return {128, 1};
  return {64, 1};
}

template <Format F, typename OutT>
void launch_typed(const GemmParams& p, Path path, Tile tile, cudaStream_t stream) {
  if (path == Path::kSmallM || (path == Path::kAuto && small_m_wins(p))) {
    launch_small_m<F, OutT>(p, stream);
  } else {
    launch_tensor_core<F, OutT>(p, tile.tokens ? tile : choose_tile(p), stream);
  }
}

template <Format F>
void launch_gemm(const GemmParams& p, int out_kind, Path path, Tile tile, cudaStream_t stream) {
  switch (out_kind) {
    case kOutInt32: return launch_typed<F, int32_t>(p, path, tile, stream);
    case kOutFloat: return launch_typed<F, float>(p, path, tile, stream);
    case kOutHalf: return launch_typed<F, __half>(p, path, tile, stream);
    case kOutBFloat16: return launch_typed<F, __nv_bfloat16>(p, path, tile, stream);
    default: throw std::invalid_argument("omniserve gemm: unknown output kind");
  }
}

}  // namespace omniserve::gemm
