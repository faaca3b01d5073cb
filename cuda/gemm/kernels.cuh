// The two mma.sync quantized-GEMM kernels (qgemm.cuh: formats, K order, packed layout) and their
// launchers; gemm/dispatch.cuh chooses between them.
//
// small_m_kernel (M ≤ 64): memory-bound; reads each packed weight byte once, straight from global
//   memory into registers (one 16-byte load per lane per tile, several tiles in flight per warp),
//   activations from L2. A block owns 32 output channels; its 8 warps split K and reduce through
//   shared memory, so N = 4096 already gives 128 blocks.
// tensor_core_kernel (any M): compute-bound; BM × 128 block tile, 8 warps, 4-stage cp.async
//   pipeline over 128-wide K blocks. A is staged with a row-parity xor swizzle so that the 16-byte
//   fragment loads of 8 consecutive lanes hit 8 distinct bank groups; packed B tiles are read
//   lane-contiguous (conflict-free by construction). W4 codes are unpacked in registers.
// Both are mma.sync (Ampere-style) designs, short of wgmma's peak on Hopper: where that peak
// matters (large M) the CUTLASS path (gemm/cutlass_int8.cuh) runs instead.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "gemm/qgemm.cuh"

namespace omniserve::gemm {

// ------------------------------------------------------------------------------------------------
// Memory-bound kernel.

constexpr int kSmallWarps = 8;
constexpr int kSmallTilesN = 4;  // 8-channel tiles per block: 32 channels

template <Format F, typename OutT, int MT, int UNROLL>
__global__ void __launch_bounds__(kSmallWarps * 32)
    small_m_kernel(const GemmParams p) {
  constexpr int NT = kSmallTilesN;
  constexpr int BVEC = kIsW4<F> ? 1 : 2;  // 16-byte vectors per lane per tile
  constexpr int FRAG = MT * NT * 4;       // accumulators per lane
  __shared__ int partial[kSmallWarps / 2][FRAG][32];

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int g = lane / 4, t = lane % 4;
  const int k_blocks = p.k / kBlockK;
  const int tile_n0 = blockIdx.x * NT;  // first 8-channel tile of this block

  int acc[MT][NT][4] = {};
  for (int kb0 = warp; kb0 < k_blocks; kb0 += kSmallWarps * UNROLL) {
    uint4 braw[UNROLL][NT][BVEC];
    uint4 araw[UNROLL][MT][2][2];  // [m16 tile][row g, g + 8][step pair]
    uint16_t grp[UNROLL][NT];
    // Issue every load of the UNROLL blocks before the first mma, to keep many bytes in flight.
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int kb = kb0 + u * kSmallWarps;
      if (kb >= k_blocks) break;
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const uint8_t* tile =
            p.b + (size_t(tile_n0 + j) * k_blocks + kb) * kTileBytes<F> + lane * 16;
#pragma unroll
        for (int v = 0; v < BVEC; ++v) braw[u][j][v] = __ldg(reinterpret_cast<const uint4*>(tile + v * 512));
        if constexpr (F == Format::kW4A8G128) {
          grp[u][j] = __ldg(p.groups + size_t(kb) * p.n + (tile_n0 + j) * 8 + g);
        }
      }
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int row = mt * 16 + r * 8 + g;
          const int8_t* src = p.a + size_t(row) * p.k + kb * kBlockK + t * 32;
#pragma unroll
          for (int q = 0; q < 2; ++q) {
            araw[u][mt][r][q] = row < p.m ? __ldg(reinterpret_cast<const uint4*>(src + q * 16))
                                          : make_uint4(0, 0, 0, 0);
          }
        }
      }
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      if (kb0 + u * kSmallWarps >= k_blocks) break;
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        GroupDequant d{};
        if constexpr (F == Format::kW4A8G128) d = group_dequant(grp[u][j]);
#pragma unroll
        for (int s = 0; s < 4; ++s) {
          uint32_t b0, b1;
          b_fragment<F>(braw[u][j][kIsW4<F> ? 0 : s / 2], s, d, b0, b1);
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            const uint4& lo = araw[u][mt][0][s / 2];
            const uint4& hi = araw[u][mt][1][s / 2];
            // Step s of pair s / 2: words 2·(s % 2) (half 0) and 2·(s % 2) + 1 (half 1).
            const bool odd = s & 1;
            mma_s8(acc[mt][j], odd ? lo.z : lo.x, odd ? hi.z : hi.x, odd ? lo.w : lo.y,
                   odd ? hi.w : hi.y, b0, b1);
          }
        }
      }
    }
  }

  // Tree reduction of the warps' K slices (halving the shared memory a one-shot reduction needs),
  // then warp 0 applies the epilogue to its fragments.
#pragma unroll
  for (int active = kSmallWarps / 2; active >= 1; active /= 2) {
    if (warp >= active && warp < 2 * active) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
          for (int r = 0; r < 4; ++r) partial[warp - active][(mt * NT + j) * 4 + r][lane] = acc[mt][j][r];
    }
    __syncthreads();
    if (warp < active) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
          for (int r = 0; r < 4; ++r) acc[mt][j][r] += partial[warp][(mt * NT + j) * 4 + r][lane];
    }
    __syncthreads();
  }
  if (warp != 0) return;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    const int row = mt * 16 + g;
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const int col = (tile_n0 + j) * 8 + 2 * t;
      if (row < p.m) store_pair<F, OutT>(p, row, col, acc[mt][j][0], acc[mt][j][1]);
      if (row + 8 < p.m) store_pair<F, OutT>(p, row + 8, col, acc[mt][j][2], acc[mt][j][3]);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Tensor-core kernel.

constexpr int kBlockN = 128;
constexpr int kWarpsM = 2, kWarpsN = 4;
constexpr int kTcThreads = kWarpsM * kWarpsN * 32;
constexpr int kStages = 4;
constexpr int kRasterGroupM = 8;  // block rows that sweep N together (L2 reuse of B)

template <Format F, int BM>
struct TcSmem {
  static constexpr int kA = BM * kBlockK;                         // int8, swizzled rows
  static constexpr int kB = kBlockN / 8 * kTileBytes<F>;          // packed tiles
  static constexpr int kGroups = F == Format::kW4A8G128 ? kBlockN * 2 : 0;
  static constexpr int kStage = kA + kB + kGroups;
  static constexpr int kTotal = kStage * kStages;
};

// Byte offset of 16-byte chunk c of row `row` in a swizzled 128-byte-row A tile.
__device__ __forceinline__ int a_offset(int row, int c) { return row * kBlockK + ((c ^ (row & 1)) * 16); }

template <Format F, int BM>
__device__ __forceinline__ void load_stage(const GemmParams& p, uint8_t* stage, int m0, int n0,
                                           int kb) {
  using S = TcSmem<F, BM>;
  const int k_blocks = p.k / kBlockK;
  constexpr int a_chunks = BM * kBlockK / 16;
  static_assert(a_chunks % kTcThreads == 0);
#pragma unroll
  for (int i = 0; i < a_chunks / kTcThreads; ++i) {
    const int idx = threadIdx.x + i * kTcThreads;
    const int row = idx / 8, c = idx % 8;
    const bool valid = m0 + row < p.m;
    const int8_t* src = p.a + size_t(valid ? m0 + row : 0) * p.k + kb * kBlockK + c * 16;
    cp_async16(stage + a_offset(row, c), src, valid);
  }
  constexpr int b_chunks = S::kB / 16;
  constexpr int chunks_per_tile = kTileBytes<F> / 16;
  static_assert(b_chunks % kTcThreads == 0);
#pragma unroll
  for (int i = 0; i < b_chunks / kTcThreads; ++i) {
    const int idx = threadIdx.x + i * kTcThreads;
    const int tile = idx / chunks_per_tile, c = idx % chunks_per_tile;
    const uint8_t* src =
        p.b + (size_t(n0 / 8 + tile) * k_blocks + kb) * kTileBytes<F> + c * 16;
    cp_async16(stage + S::kA + tile * kTileBytes<F> + c * 16, src, true);
  }
  if constexpr (F == Format::kW4A8G128) {
    if (threadIdx.x < S::kGroups / 16) {
      const uint8_t* src =
          reinterpret_cast<const uint8_t*>(p.groups + size_t(kb) * p.n + n0) + threadIdx.x * 16;
      cp_async16(stage + S::kA + S::kB + threadIdx.x * 16, src, true);
    }
  }
}

template <Format F, typename OutT, int BM>
__global__ void __launch_bounds__(kTcThreads) tensor_core_kernel(const GemmParams p) {
  using S = TcSmem<F, BM>;
  constexpr int WTM = BM / kWarpsM, WTN = kBlockN / kWarpsN;
  constexpr int MT = WTM / 16, NT = WTN / 8;
  extern __shared__ __align__(128) uint8_t smem[];

  // Grouped raster: kRasterGroupM block rows walk N together, so concurrent blocks share B tiles.
  const int tiles_m = (p.m + BM - 1) / BM, tiles_n = p.n / kBlockN;
  const int per_group = kRasterGroupM * tiles_n;
  const int first_m = blockIdx.x / per_group * kRasterGroupM;
  const int group_m = min(tiles_m - first_m, kRasterGroupM);
  const int in_group = blockIdx.x % per_group;
  const int m0 = (first_m + in_group % group_m) * BM;
  const int n0 = in_group / group_m * kBlockN;

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int g = lane / 4, t = lane % 4;
  const int warp_m = warp / kWarpsN, warp_n = warp % kWarpsN;
  const int k_blocks = p.k / kBlockK;

  int acc[MT][NT][4] = {};

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < k_blocks) load_stage<F, BM>(p, smem + s * S::kStage, m0, n0, s);
    cp_async_commit();
  }

  for (int kb = 0; kb < k_blocks; ++kb) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // stage kb is visible to all; stage kb - 1 is free for reuse
    const int next = kb + kStages - 1;
    if (next < k_blocks) load_stage<F, BM>(p, smem + (next % kStages) * S::kStage, m0, n0, next);
    cp_async_commit();

    const uint8_t* stage = smem + (kb % kStages) * S::kStage;
    const uint8_t* a_tile = stage;
    const uint8_t* b_tiles = stage + S::kA + warp_n * NT * kTileBytes<F> + lane * 16;

    GroupDequant d[NT];
    uint4 b_w4[NT];
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      d[j] = GroupDequant{};
      if constexpr (F == Format::kW4A8G128) {
        const uint16_t* groups = reinterpret_cast<const uint16_t*>(stage + S::kA + S::kB);
        d[j] = group_dequant(groups[warp_n * WTN + j * 8 + g]);
      }
      if constexpr (kIsW4<F>) b_w4[j] = lds128(b_tiles + j * kTileBytes<F>);
    }

#pragma unroll
    for (int pair = 0; pair < 2; ++pair) {
      uint4 a_lo[MT], a_hi[MT];  // rows g and g + 8 of each m16 tile
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        const int row = warp_m * WTM + mt * 16 + g;
        a_lo[mt] = lds128(a_tile + a_offset(row, 2 * t + pair));
        a_hi[mt] = lds128(a_tile + a_offset(row + 8, 2 * t + pair));
      }
      uint4 b_raw[NT];
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        b_raw[j] = kIsW4<F> ? b_w4[j] : lds128(b_tiles + j * kTileBytes<F> + pair * 512);
      }
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int s = pair * 2 + half;
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          uint32_t b0, b1;
          b_fragment<F>(b_raw[j], s, d[j], b0, b1);
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            mma_s8(acc[mt][j], half ? a_lo[mt].z : a_lo[mt].x, half ? a_hi[mt].z : a_hi[mt].x,
                   half ? a_lo[mt].w : a_lo[mt].y, half ? a_hi[mt].w : a_hi[mt].y, b0, b1);
          }
        }
      }
    }
  }
  cp_async_wait<0>();

#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    const int row = m0 + warp_m * WTM + mt * 16 + g;
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const int col = n0 + warp_n * WTN + j * 8 + 2 * t;
      if (row < p.m) store_pair<F, OutT>(p, row, col, acc[mt][j][0], acc[mt][j][1]);
      if (row + 8 < p.m) store_pair<F, OutT>(p, row + 8, col, acc[mt][j][2], acc[mt][j][3]);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Launch.

inline void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("omniserve gemm: launching ") + what + " failed: " +
                             cudaGetErrorString(err));
  }
}

template <Format F, typename OutT>
void launch_small_m(const GemmParams& p, cudaStream_t stream) {
  const dim3 grid(p.n / (kSmallTilesN * 8)), block(kSmallWarps * 32);
  // W4 keeps two K blocks in flight per warp, W8 (twice the bytes per block) one.
  constexpr int U = kIsW4<F> ? 2 : 1;
  if (p.m <= 16) {
    small_m_kernel<F, OutT, 1, U><<<grid, block, 0, stream>>>(p);
  } else if (p.m <= 32) {
    small_m_kernel<F, OutT, 2, U><<<grid, block, 0, stream>>>(p);
  } else {
    small_m_kernel<F, OutT, 4, 1><<<grid, block, 0, stream>>>(p);
  }
  check_launch("small_m_kernel");
}

template <Format F, typename OutT, int BM>
void launch_tensor_core_bm(const GemmParams& p, cudaStream_t stream) {
  constexpr int smem = TcSmem<F, BM>::kTotal;
  auto kernel = tensor_core_kernel<F, OutT, BM>;
  static const cudaError_t attr =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (attr != cudaSuccess) {
    throw std::runtime_error(std::string("omniserve gemm: cannot reserve ") +
                             std::to_string(smem) + " B of shared memory: " +
                             cudaGetErrorString(attr));
  }
  const int blocks = (p.m + BM - 1) / BM * (p.n / kBlockN);
  kernel<<<blocks, kTcThreads, smem, stream>>>(p);
  check_launch("tensor_core_kernel");
}

template <Format F, typename OutT>
void launch_tensor_core(const GemmParams& p, cudaStream_t stream) {
  // 128-row tiles once they fill a wave of the 132 SMs of an H100; 64-row tiles below that.
  constexpr int kWave = 132;
  if ((p.m + 127) / 128 * (p.n / kBlockN) >= kWave) {
    launch_tensor_core_bm<F, OutT, 128>(p, stream);
  } else {
    launch_tensor_core_bm<F, OutT, 64>(p, stream);
  }
}

}  // namespace omniserve::gemm
