// Kernel choice per call (gemm/params.h `Path`) and the per-format launcher the binding calls.
// Large M goes to the CUTLASS path (kernels/gemm_cutlass.py) before reaching this extension.
#pragma once

#include <limits>

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

// Modelled time of the tensor-core kernel at `tile`, with `resident` output tiles per wave:
//   waves · (fill + K blocks per block · time of one K block of a wave's tile).
// A K block of a 256-token tile costs 1.7× that of a 64-token one (two 64-token blocks share an
// SM) or a 128-token one, a split wave pays for the cluster's reduction. Fitted (within 7 %, and
// choosing within 3 % of the best tile) to every tile on the Llama-3-8B projections at M = 64 to
// 1024 on an H100; retune with `python -m omniserve.bench.kernels_gemm --tiles 64x1 ... 256x4`.
inline double tile_cost(const GemmParams& p, Tile tile, int resident) {
  const int tiles = (p.m + tile.tokens - 1) / tile.tokens * (p.n / kBlockN);
  const int waves = (tiles + resident - 1) / resident;
  const int k_blocks = (p.k / kBlockK + tile.split - 1) / tile.split;
  const double k_block = tile.tokens == 256 ? 1.70 : tile.tokens == 128 ? 0.97 : 1.0;
  return waves * (8.3 + (tile.split > 1 ? 3.9 : 0.0) + k_blocks * k_block);
}

template <Format F, typename OutT>
int resident(Tile tile) {
  switch (tile.tokens) {
    case 64: return resident_tiles<F, OutT, 1>(tile.split);
    case 128: return resident_tiles<F, OutT, 2>(tile.split);
    default: return resident_tiles<F, OutT, 4>(tile.split);
  }
}

template <Format F, typename OutT>
Tile choose_tile(const GemmParams& p) {
  Tile best{64, 1};
  double best_cost = std::numeric_limits<double>::infinity();
  for (const int tokens : {64, 128, 256}) {
    for (int split = 1; split <= std::min(kMaxSplit, p.k / kBlockK); ++split) {
      const Tile tile{tokens, split};
      const double cost = tile_cost(p, tile, resident<F, OutT>(tile));
      if (cost < best_cost) best = tile, best_cost = cost;
    }
  }
  return best;
}

template <Format F, typename OutT>
void launch_typed(const GemmParams& p, Path path, Tile tile, cudaStream_t stream) {
  if (path == Path::kSmallM || (path == Path::kAuto && small_m_wins(p))) {
    launch_small_m<F, OutT>(p, stream);
  } else {
    launch_tensor_core<F, OutT>(p, tile.tokens ? tile : choose_tile<F, OutT>(p), stream);
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
