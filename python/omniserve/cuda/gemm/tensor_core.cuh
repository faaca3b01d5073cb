// The compute-bound quantized GEMM on Hopper's warpgroup MMA (qgemm.cuh: formats, K order, packed
// layout), for M above the memory-bound kernel's range (and every M where CUTLASS is absent).
//
// Both wgmma operands come from shared memory as plain K-major int8 under the 128-byte swizzle:
// the activation tile is cp.async-ed there as is, and the packed weight tile is expanded there
// once per K block by the block's own threads. That expansion is cheap because the packed K order
// gives lane (g, t) of a tile channel g's 32 *consecutive* inputs [t·32, t·32 + 32): the four
// `b_fragment` register pairs of a K block, written back to back, are those bytes in natural
// order, so every format (W4 codes, g128's level-1 w8, W8 codes) becomes two 16-byte stores per
// lane, conflict-free under the swizzle. The wgmma then runs an ordinary int8 GEMM.
//
// Block: 1, 2 or 4 warpgroups, each 64 tokens × 128 channels (wgmma.m64n128k32.s32.s8.s8, 64
// int32 accumulators per thread); the warpgroups of a block share the expanded weight tile. K
// blocks of 128 stream through a cp.async ring; the wgmma of block kb stays in flight while the
// threads wait for, prefetch and expand block kb + 1 (the expanded tile is double-buffered for
// it). A stage is refilled two iterations after its wgmma was issued, when every warpgroup has
// retired it (each waits for all but its newest wgmma group before the next iteration's barrier).
//
// Tile and K split: every K block moves the block's activation and weight tiles from L2 into
// shared memory, so a taller block (more warpgroups on one expanded weight tile) moves fewer bytes
// per product; at decode's M a tall block leaves a thin grid, which a K split fills again: a
// cluster of `split` blocks shares one output tile, each block runs its share of the K blocks,
// and the cluster adds the int32 accumulators through distributed shared memory before the
// epilogue (exact, no workspace, no second launch). gemm/dispatch.cuh `choose_tile` picks both.
#pragma once

#include <cooperative_groups.h>

#include <algorithm>

#include "gemm/launch.h"
#include "gemm/qgemm.cuh"

namespace omniserve::gemm {

constexpr int kWgTokens = 64;      // tokens per warpgroup: the wgmma M
constexpr int kRasterGroupM = 8;   // block rows that sweep N together (L2 reuse of the weights)
constexpr int kSwizzleBytes = 1024;  // the 128-byte swizzle repeats every 8 rows of 128 bytes

// Byte offset of 16-byte chunk c of row `row` in a tile of 128-byte rows under the 128-byte
// swizzle (chunk xor row mod 8), the layout wgmma's descriptors below describe.
__device__ __forceinline__ int swizzled(int row, int c) { return row * kBlockK + ((c ^ (row & 7)) * 16); }

template <Format F, int WGS>
struct TcSmem {
  static constexpr int kBM = WGS * kWgTokens;
  static constexpr int kA = kBM * kBlockK;                        // int8 activations, swizzled
  static constexpr int kB = kBlockN / 8 * kTileBytes<F>;          // packed weight tiles
  static constexpr int kGroups = F == Format::kW4A8G128 ? kBlockN * 2 : 0;
  static constexpr int kStage = (kA + kB + kGroups + kSwizzleBytes - 1) / kSwizzleBytes * kSwizzleBytes;
  static constexpr int kExpanded = kBlockN * kBlockK;             // one expanded weight tile
  // As many stages (at most 8) as fit next to the two expanded tiles, in half the SM's 227 KiB
  // where that still leaves 4, so that two blocks share an SM; else in all of it.
  static constexpr int stages_in(int bytes) {
    return std::min(8, (bytes - 2 * kExpanded - kSwizzleBytes) / kStage);
  }
  static constexpr int kStages = stages_in(113 * 1024) >= 4 ? stages_in(113 * 1024) : stages_in(227 * 1024);
  static constexpr int kTotal = kStage * kStages + 2 * kExpanded + kSwizzleBytes;  // + alignment slack
  static_assert(kStages >= 3, "the ring needs a stage in flight beside the two being used");
};

// The cp.async copies of one K block into a stage, per thread. Source pointers and the stage
// offsets are computed once per block, so that a stage costs one add per copy.
template <Format F, int WGS>
struct StageLoader {
  using S = TcSmem<F, WGS>;
  static constexpr int kThreads = WGS * 128;
  static constexpr int kACopies = S::kA / 16 / kThreads;
  static constexpr int kBCopies = S::kB / 16 / kThreads;
  static constexpr int kRowsPerCopy = kThreads / 8;  // activation rows between a thread's copies
  static_assert(S::kA % (16 * kThreads) == 0 && S::kB % (16 * kThreads) == 0);
  static_assert(kRowsPerCopy % 8 == 0, "a thread's activation chunks share one swizzle phase");

  const int8_t* a[kACopies];  // at K block 0
  uint32_t a_valid = 0;       // bit i: copy i's row is below M (else it zero-fills)
  int a_dst;                  // offset of copy 0 in the stage
  const uint8_t* b;           // copy 0 at K block 0
  int64_t b_step;             // between copies
  const uint16_t* groups = nullptr;  // g128: this thread's 16 bytes of the group row, K block 0
  int64_t groups_step = 0;           // g128: between K blocks' group rows

  __device__ __forceinline__ StageLoader(const GemmParams& p, int m0, int n0) {
    const int row = threadIdx.x / 8, c = threadIdx.x % 8;
#pragma unroll
    for (int i = 0; i < kACopies; ++i) {
      const int m = m0 + row + i * kRowsPerCopy;
      a[i] = p.a + size_t(m < p.m ? m : 0) * p.k + c * 16;
      a_valid |= uint32_t(m < p.m) << i;
    }
    a_dst = swizzled(row, c);
    // Weight copy i is 16-byte chunk threadIdx.x + i·kThreads of the stage's packed tiles.
    constexpr int chunks_per_tile = kTileBytes<F> / 16;
    const int k_blocks = p.k / kBlockK;
    const int tile = threadIdx.x / chunks_per_tile, chunk = threadIdx.x % chunks_per_tile;
    b = p.b + size_t(n0 / 8 + tile) * k_blocks * kTileBytes<F> + chunk * 16;
    b_step = int64_t(kThreads / chunks_per_tile) * k_blocks * kTileBytes<F>;
    if constexpr (F == Format::kW4A8G128) {
      groups = p.groups + n0 + threadIdx.x * 8;
      groups_step = p.n;
    }
  }

  __device__ __forceinline__ void load(uint8_t* stage, int kb) const {
#pragma unroll
    for (int i = 0; i < kACopies; ++i) {
      cp_async16(stage + a_dst + i * kRowsPerCopy * kBlockK, a[i] + kb * kBlockK, (a_valid >> i) & 1);
    }
#pragma unroll
    for (int i = 0; i < kBCopies; ++i) {
      cp_async16(stage + S::kA + (threadIdx.x + i * kThreads) * 16,
                 b + i * b_step + int64_t(kb) * kTileBytes<F>);
    }
    if constexpr (F == Format::kW4A8G128) {
      if (threadIdx.x < S::kGroups / 16) {
        cp_async16(stage + S::kA + S::kB + threadIdx.x * 16, groups + kb * groups_step);
      }
    }
  }
};

// The packed weight tiles of one stage → int8 [kBlockN channels][kBlockK], swizzled.
template <Format F, int THREADS>
__device__ __forceinline__ void expand_weights(const uint8_t* packed, const uint16_t* groups,
                                               uint8_t* out) {
  constexpr int jobs = kBlockN / 8 * 32;  // (8-channel tile, lane)
  static_assert(jobs % THREADS == 0);
#pragma unroll
  for (int i = 0; i < jobs / THREADS; ++i) {
    const int job = threadIdx.x + i * THREADS;
    const int tile = job / 32, lane = job % 32, g = lane / 4, t = lane % 4;
    const uint8_t* src = packed + tile * kTileBytes<F> + lane * 16;
    GroupDequant d{};
    if constexpr (F == Format::kW4A8G128) d = group_dequant(groups[tile * 8 + g]);
    uint4 raw[kIsW4<F> ? 1 : 2];
    raw[0] = lds128(src);
    if constexpr (!kIsW4<F>) raw[1] = lds128(src + 512);
    uint32_t w[8];  // bytes [t·32, t·32 + 32) of the channel's K block, in order
#pragma unroll
    for (int s = 0; s < 4; ++s) b_fragment<F>(raw[kIsW4<F> ? 0 : s / 2], s, d, w[2 * s], w[2 * s + 1]);
    const int row = tile * 8 + g;
    *reinterpret_cast<uint4*>(out + swizzled(row, 2 * t)) = make_uint4(w[0], w[1], w[2], w[3]);
    *reinterpret_cast<uint4*>(out + swizzled(row, 2 * t + 1)) = make_uint4(w[4], w[5], w[6], w[7]);
  }
}

// Shared-memory matrix descriptor of a K-major tile of 128-byte rows under the 128-byte swizzle:
// 8-row core-matrix groups 1024 bytes apart; the leading offset is unused for this layout.
__device__ __forceinline__ uint64_t swizzled_descriptor(const void* smem) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  return uint64_t((addr & 0x3FFFF) >> 4) | (uint64_t(1) << 16) |
         (uint64_t(kSwizzleBytes >> 4) << 32) | (uint64_t(1) << 62);
}

// Keeps the compiler from moving accumulator registers across the asynchronous wgmma.
__device__ __forceinline__ void fence_operand(int& r) { asm volatile("" : "+r"(r)::"memory"); }

__device__ __forceinline__ void wgmma_m64n128k32(int (&d)[64], uint64_t desc_a, uint64_t desc_b) {
  asm volatile(
      "{\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "%64, %65, 1;\n"
      "}\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]),
        "+r"(d[7]), "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]),
        "+r"(d[14]), "+r"(d[15]), "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]),
        "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23]), "+r"(d[24]), "+r"(d[25]),
        "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]), "+r"(d[30]), "+r"(d[31]),
        "+r"(d[32]), "+r"(d[33]), "+r"(d[34]), "+r"(d[35]), "+r"(d[36]), "+r"(d[37]),
        "+r"(d[38]), "+r"(d[39]), "+r"(d[40]), "+r"(d[41]), "+r"(d[42]), "+r"(d[43]),
        "+r"(d[44]), "+r"(d[45]), "+r"(d[46]), "+r"(d[47]), "+r"(d[48]), "+r"(d[49]),
        "+r"(d[50]), "+r"(d[51]), "+r"(d[52]), "+r"(d[53]), "+r"(d[54]), "+r"(d[55]),
        "+r"(d[56]), "+r"(d[57]), "+r"(d[58]), "+r"(d[59]), "+r"(d[60]), "+r"(d[61]),
        "+r"(d[62]), "+r"(d[63])
      : "l"(desc_a), "l"(desc_b)
      : "memory");
}

// (first row, first column) of this block's output tile. Grouped raster: kRasterGroupM block rows
// walk N together, so concurrent blocks share weight tiles in L2.
__device__ __forceinline__ int2 raster_tile(const GemmParams& p, int bm, int index) {
  const int tiles_m = (p.m + bm - 1) / bm, tiles_n = p.n / kBlockN;
  const int per_group = kRasterGroupM * tiles_n;
  const int first_m = index / per_group * kRasterGroupM;
  const int group_m = min(tiles_m - first_m, kRasterGroupM);
  const int in_group = index % per_group;
  return make_int2((first_m + in_group % group_m) * bm, in_group / group_m * kBlockN);
}

// `split` > 1: launched in clusters of `split` consecutive blocks, which share one output tile.
template <Format F, typename OutT, int WGS>
__global__ void __launch_bounds__(WGS * 128) tensor_core_kernel(const GemmParams p, int split) {
  using S = TcSmem<F, WGS>;
  constexpr int THREADS = WGS * 128;
  extern __shared__ __align__(kSwizzleBytes) uint8_t smem_raw[];
  // Offsetting the declared array (rather than rounding an integer) keeps the compiler's
  // knowledge that these are shared-memory addresses.
  uint8_t* smem =
      smem_raw + (-static_cast<int>(__cvta_generic_to_shared(smem_raw)) & (kSwizzleBytes - 1));
  uint8_t* expanded = smem + S::kStage * S::kStages;

  const int rank = blockIdx.x % split;  // this block's share of K within its cluster
  const int2 tile = raster_tile(p, S::kBM, blockIdx.x / split);
  const int m0 = tile.x, n0 = tile.y;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int g = lane / 4, t = lane % 4, wg = warp / 4, wg_warp = warp % 4;
  const int k_blocks = p.k / kBlockK;
  const int kb0 = rank * k_blocks / split, my_blocks = (rank + 1) * k_blocks / split - kb0;
  const StageLoader<F, WGS> loader(p, m0, n0);

  int acc[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) acc[i] = 0;

  // Stages in flight ahead of the one being expanded; one slot is held by the wgmma in flight.
  constexpr int kAhead = S::kStages - 2;
#pragma unroll
  for (int s = 0; s < kAhead; ++s) {
    if (s < my_blocks) loader.load(smem + s * S::kStage, kb0 + s);
    cp_async_commit();
  }

  for (int i = 0; i < my_blocks; ++i) {
    cp_async_wait<kAhead - 1>();
    // Stage i has landed for every thread, and every warpgroup has retired the wgmma of i - 2:
    // its stage and its expanded weight buffer may be overwritten.
    __syncthreads();
    const int next = i + kAhead;
    if (next < my_blocks) loader.load(smem + (next % S::kStages) * S::kStage, kb0 + next);
    cp_async_commit();

    const uint8_t* stage = smem + (i % S::kStages) * S::kStage;
    uint8_t* weights = expanded + (i % 2) * S::kExpanded;
    expand_weights<F, THREADS>(stage + S::kA,
                               reinterpret_cast<const uint16_t*>(stage + S::kA + S::kB), weights);
    // The expanded tile was written through the generic proxy; wgmma reads it through the async
    // proxy.
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    __syncthreads();

#pragma unroll
    for (int i = 0; i < 64; ++i) fence_operand(acc[i]);
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
    for (int s = 0; s < 4; ++s) {  // k32 steps: 32 bytes along the (swizzled) rows
      wgmma_m64n128k32(acc, swizzled_descriptor(stage + wg * kWgTokens * kBlockK + s * 32),
                       swizzled_descriptor(weights + s * 32));
    }
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
    asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory");
#pragma unroll
    for (int i = 0; i < 64; ++i) fence_operand(acc[i]);
  }
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
#pragma unroll
  for (int i = 0; i < 64; ++i) fence_operand(acc[i]);
  cp_async_wait<0>();

  // acc[4j + r]: token 16·wg_warp + g + 8·(r / 2) of the warpgroup, channel 8j + 2t + r % 2.
  const int row = m0 + wg * kWgTokens + wg_warp * 16 + g;
  if (split == 1) {
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      const int col = n0 + j * 8 + 2 * t;
      if (row < p.m) store_pair<F, OutT>(p, row, col, acc[4 * j], acc[4 * j + 1]);
      if (row + 8 < p.m) store_pair<F, OutT>(p, row + 8, col, acc[4 * j + 2], acc[4 * j + 3]);
    }
    return;
  }
  // K split: every block parks its accumulators in its (now idle) ring, thread-minor so that the
  // stores and the peers' loads are conflict-free; block `rank` then sums and stores the column
  // groups j ≡ rank (mod split) of every block's share, so the epilogue is spread over the cluster.
  static_assert(THREADS * 64 * 4 <= S::kStage * S::kStages, "the ring holds the accumulators");
  namespace cg = cooperative_groups;
  const cg::cluster_group cluster = cg::this_cluster();
  int* parked = reinterpret_cast<int*>(smem);
  __syncthreads();  // every warp is done with the ring
#pragma unroll
  for (int i = 0; i < 64; ++i) parked[i * THREADS + threadIdx.x] = acc[i];
  cluster.sync();
#pragma unroll
  for (int j = 0; j < 16; ++j) {
    if (j % split != rank) continue;
    int sum[4] = {0, 0, 0, 0};
    for (int q = 0; q < split; ++q) {
      const int* peer = cluster.map_shared_rank(parked, q);
#pragma unroll
      for (int r = 0; r < 4; ++r) sum[r] += peer[(4 * j + r) * THREADS + threadIdx.x];
    }
    const int col = n0 + j * 8 + 2 * t;
    if (row < p.m) store_pair<F, OutT>(p, row, col, sum[0], sum[1]);
    if (row + 8 < p.m) store_pair<F, OutT>(p, row + 8, col, sum[2], sum[3]);
  }
  cluster.sync();  // no block leaves while a peer still reads its shared memory
}

// The launch of a grid of `blocks` blocks in clusters of `split`; `cluster` is the attribute that
// `config.attrs` points to, so it lives with the config.
template <Format F, int WGS>
struct TensorCoreLaunch {
  cudaLaunchConfig_t config{};
  cudaLaunchAttribute cluster{};

  TensorCoreLaunch(int blocks, int split, cudaStream_t stream) {
    config.gridDim = dim3(blocks);
    config.blockDim = dim3(WGS * 128);
    config.dynamicSmemBytes = TcSmem<F, WGS>::kTotal;
    config.stream = stream;
    cluster.id = cudaLaunchAttributeClusterDimension;
    cluster.val.clusterDim.x = split;
    cluster.val.clusterDim.y = 1;
    cluster.val.clusterDim.z = 1;
    config.attrs = &cluster;
    config.numAttrs = split > 1 ? 1 : 0;
  }
};

template <Format F, typename OutT, int WGS>
void launch_tensor_core_wgs(const GemmParams& p, int split, cudaStream_t stream) {
  constexpr auto kernel = tensor_core_kernel<F, OutT, WGS>;
  reserve_shared_memory<kernel>(TcSmem<F, WGS>::kTotal);
  const int tiles = (p.m + WGS * kWgTokens - 1) / (WGS * kWgTokens) * (p.n / kBlockN);
  TensorCoreLaunch<F, WGS> launch(tiles * split, split, stream);
  check_launch("tensor_core_kernel", cudaLaunchKernelEx(&launch.config, kernel, p, split));
}

template <Format F, typename OutT>
void launch_tensor_core(const GemmParams& p, Tile tile, cudaStream_t stream) {
  switch (tile.tokens) {
    case 64: return launch_tensor_core_wgs<F, OutT, 1>(p, tile.split, stream);
    case 128: return launch_tensor_core_wgs<F, OutT, 2>(p, tile.split, stream);
    case 256: return launch_tensor_core_wgs<F, OutT, 4>(p, tile.split, stream);
    default: throw std::invalid_argument("omniserve gemm: tensor-core tiles are 64, 128 or 256 tokens");
  }
}

}  // namespace omniserve::gemm
