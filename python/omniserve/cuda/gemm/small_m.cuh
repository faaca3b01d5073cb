// The memory-bound quantized GEMM for decode-sized M (qgemm.cuh: formats, K order, packed
// layout).
//
// small_m_kernel (M ≤ 64): reads each packed weight byte once, straight from global memory into
//   registers (one 16-byte load per lane per tile, several tiles in flight per warp), activations
//   from L2, mma.sync on tensor cores. A block owns 32 output channels; its 8 warps split K and
//   reduce through shared memory, so N = 4096 already gives 128 blocks.
#pragma once

#include <cuda_runtime.h>

#include "gemm/launch.h"
#include "gemm/qgemm.cuh"

namespace omniserve::gemm {

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

}  // namespace omniserve::gemm
