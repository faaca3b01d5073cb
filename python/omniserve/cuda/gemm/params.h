// Host-visible interface of the quantized GEMMs: formats, parameters and the per-format launchers
// (kernels in gemm/small_m.cuh and gemm/tensor_core.cuh, instantiated by gemm_<format>.cu; torch
// binding in gemm_ops.cpp).
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace omniserve::gemm {

enum class Format : int { kW8A8 = 0, kW4A8PerChannel = 1, kW4A8G128 = 2 };

constexpr int kBlockK = 128;  // K per main-loop block: one g128 group, four m16n8k32 steps
constexpr int kBlockN = 128;  // N per tensor-core block: the wgmma N (N has no tail)

template <Format F>
constexpr bool kIsW4 = F != Format::kW8A8;

// Bytes of one packed 8 × 128 weight tile.
template <Format F>
constexpr int kTileBytes = kIsW4<F> ? 512 : 1024;

struct GemmParams {
  const int8_t* a;           // [M, K] row-major activation codes
  const uint8_t* b;          // packed weight tiles (layout: gemm/qgemm.cuh)
  const uint16_t* groups;    // g128: [K/128, N] s2 | (s2_zeros << 8); else nullptr
  const __half* w_scale;     // [N] s1_scales or dequant_scale
  const __half* w_szero;     // [N] s1_szeros (W4A8 per-channel); else nullptr
  const __half* a_scale;     // [M]
  const int32_t* a_sum;      // [M] Σ_k x_q (W4A8 per-channel); else nullptr
  void* out;                 // [M, N] row-major, OutT
  int m, n, k;
};

// Which kernel runs: the dispatcher's choice, or one forced by tests and benchmarks.
enum class Path : int { kAuto = 0, kSmallM = 1, kTensorCore = 2 };

constexpr int kSmallMMax = 64;  // the memory-bound kernel holds at most 4 m16 tiles

// The tensor-core kernel's tile: tokens per block (64, 128 or 256: 1, 2 or 4 warpgroups) and
// blocks per output tile (the K split, 1 to kMaxSplit). {0, 0}: the dispatcher's choice.
struct Tile {
  int tokens;
  int split;
};

constexpr int kMaxSplit = 4;

// Host-side launchers, one translation unit per format (gemm_<format>.cu).
template <Format F>
void launch_gemm(const GemmParams& p, int out_kind, Path path, Tile tile, cudaStream_t stream);
// The tile the automatic path runs for p's shape on the current device; {0, 0}: the small-M kernel.
template <Format F>
Tile auto_tile(const GemmParams& p, int out_kind);
// Clusters of `split` blocks of the `tokens`-token tensor-core kernel the current device holds at
// once: the waves of the tile cost model.
template <Format F>
int resident_clusters(int tokens, int split, int out_kind);

// out_kind values shared by the launchers and the host wrapper.
enum OutKind : int { kOutInt32 = 0, kOutFloat = 1, kOutHalf = 2, kOutBFloat16 = 3 };

}  // namespace omniserve::gemm
