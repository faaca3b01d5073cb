// Hopper warpgroup-MMA kernel for the quantized GEMMs (formats, K order, packed layout: qgemm.cuh).
//
// Operands swapped: each warpgroup computes Yᵀ tiles D[64 channels, 128 tokens] with
// wgmma.m64n128k32.s32.s8.s8, the weights as the register operand A and the activations as the
// shared-memory operand B. A warp's A registers for one k32 step are exactly the m16n8k32 A
// fragment of its 16 channels, i.e. the B fragments (b0, b1) the packed tiles already give the
// mma.sync kernels for two 8-channel tiles, so W4 codes are unpacked (and g128 dequantized) in
// registers and never written back to shared memory. The activations follow the same K order:
// virtual k h·16 + t·4 + i of step s holds physical k t·32 + s·8 + h·4 + i, copied into the
// canonical no-swizzle K-major layout (core matrices of 8 tokens × 16 bytes) with 4-byte cp.async.
//
// Block: 2 warpgroups (128 channels) × 128 tokens, 4-stage cp.async pipeline over 128-wide K
// blocks; each K block issues 4 wgmma per warpgroup and waits for them before the stage is reused.
#pragma once

#include "gemm/kernels.cuh"

namespace omniserve::gemm {

constexpr int kWgChannels = 128;  // per block: 2 warpgroups × 64
constexpr int kWgTokens = 128;    // per block: the wgmma N
constexpr int kWgThreads = 256;
constexpr int kWgStages = 4;

template <Format F>
struct WgSmem {
  static constexpr int kX = kWgTokens * kBlockK;             // activations, canonical layout
  static constexpr int kW = kWgChannels / 8 * kTileBytes<F>;  // packed weight tiles
  static constexpr int kGroups = F == Format::kW4A8G128 ? kWgChannels * 2 : 0;
  static constexpr int kStage = kX + kW + kGroups;
  static constexpr int kTotal = kStage * kWgStages;
  // Activation layout of one stage: [step s][token / 8][half h][token % 8][16 bytes].
  static constexpr int kStepBytes = kWgTokens * 32;
  static constexpr int kCoreStrideK = 128;  // adjacent core matrices along K (the two halves)
  static constexpr int kCoreStrideN = 256;  // adjacent core matrices along N (8-token groups)
};

__device__ __forceinline__ void cp_async4(void* smem, const void* global, bool valid) {
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(global),
               "r"(valid ? 4 : 0));
}

// Shared-memory matrix descriptor: no swizzle, K-major, strides of the layout above.
template <Format F>
__device__ __forceinline__ uint64_t activation_descriptor(const void* smem) {
  using S = WgSmem<F>;
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  return uint64_t((addr & 0x3FFFF) >> 4) | (uint64_t(S::kCoreStrideK >> 4) << 16) |
         (uint64_t(S::kCoreStrideN >> 4) << 32);
}

// Keeps the compiler from moving accumulator registers across the asynchronous wgmma.
__device__ __forceinline__ void fence_operand(int& r) { asm volatile("" : "+r"(r)::"memory"); }

__device__ __forceinline__ void wgmma_m64n128k32(int (&d)[64], uint32_t a0, uint32_t a1,
                                                 uint32_t a2, uint32_t a3, uint64_t desc_b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "{%64, %65, %66, %67}, %68, p;\n}\n"
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
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(desc_b), "r"(1)
      : "memory");
}

template <Format F>
__device__ __forceinline__ void wg_load_stage(const GemmParams& p, uint8_t* stage, int tok0,
                                              int ch0, int kb) {
  using S = WgSmem<F>;
  // Activations, 4 bytes per copy. Each warp copies one (step, half) slice of 8 tokens: lane →
  // token tok0 + 8·group + lane / 4, t = lane % 4, so that the 32 destinations (token % 8, t) hit
  // 32 distinct banks; the global reads of the 8 slices of a row share L1 lines (cp.async.ca).
  constexpr int copies = kWgTokens * kBlockK / 4;
  static_assert(copies % kWgThreads == 0);
#pragma unroll
  for (int i = 0; i < copies / kWgThreads; ++i) {
    const int idx = threadIdx.x + i * kWgThreads;
    const int lane = idx % 32, slice = idx / 32;  // slice: (8-token group, step, half)
    const int group = slice / 8, s = (slice % 8) / 2, h = slice % 2;
    const int token = group * 8 + lane / 4, t = lane % 4;
    const bool valid = tok0 + token < p.m;
    const int8_t* src = p.a + size_t(valid ? tok0 + token : 0) * p.k + kb * kBlockK + t * 32 +
                        s * 8 + h * 4;
    uint8_t* dst = stage + s * S::kStepBytes + group * S::kCoreStrideN + h * S::kCoreStrideK +
                   (token % 8) * 16 + t * 4;
    cp_async4(dst, src, valid);
  }
  const int k_blocks = p.k / kBlockK;
  constexpr int w_chunks = S::kW / 16, chunks_per_tile = kTileBytes<F> / 16;
  static_assert(w_chunks % kWgThreads == 0);
#pragma unroll
  for (int i = 0; i < w_chunks / kWgThreads; ++i) {
    const int idx = threadIdx.x + i * kWgThreads;
    const int tile = idx / chunks_per_tile, c = idx % chunks_per_tile;
    const uint8_t* src = p.b + (size_t(ch0 / 8 + tile) * k_blocks + kb) * kTileBytes<F> + c * 16;
    cp_async16(stage + S::kX + tile * kTileBytes<F> + c * 16, src, true);
  }
  if constexpr (F == Format::kW4A8G128) {
    if (threadIdx.x < S::kGroups / 16) {
      const uint8_t* src =
          reinterpret_cast<const uint8_t*>(p.groups + size_t(kb) * p.n + ch0) + threadIdx.x * 16;
      cp_async16(stage + S::kX + S::kW + threadIdx.x * 16, src, true);
    }
  }
}

// out[token, channel] from one accumulator.
template <Format F, typename OutT>
__device__ __forceinline__ void store_one(const GemmParams& p, int token, int channel, int acc) {
  OutT* out = static_cast<OutT*>(p.out) + size_t(token) * p.n + channel;
  if constexpr (std::is_same_v<OutT, int32_t>) {
    *out = acc;
  } else {
    float wz = 0.f;
    int a_sum = 0;
    if constexpr (F == Format::kW4A8PerChannel) {
      wz = __half2float(p.w_szero[channel]);
      a_sum = p.a_sum[token];
    }
    const float y = epilogue<F>(acc, __half2float(p.w_scale[channel]), wz,
                                __half2float(p.a_scale[token]), a_sum);
    if constexpr (std::is_same_v<OutT, float>) {
      *out = y;
    } else if constexpr (std::is_same_v<OutT, __half>) {
      *out = __float2half_rn(y);
    } else {
      *out = __float2bfloat16_rn(y);
    }
  }
}

template <Format F, typename OutT>
__global__ void __launch_bounds__(kWgThreads) wgmma_kernel(const GemmParams p) {
  using S = WgSmem<F>;
  extern __shared__ __align__(128) uint8_t smem[];

  const int tiles_tok = (p.m + kWgTokens - 1) / kWgTokens, tiles_ch = p.n / kWgChannels;
  const int per_group = kRasterGroupM * tiles_ch;
  const int first = blockIdx.x / per_group * kRasterGroupM;
  const int group_tok = min(tiles_tok - first, kRasterGroupM);
  const int in_group = blockIdx.x % per_group;
  const int tok0 = (first + in_group % group_tok) * kWgTokens;
  const int ch0 = in_group / group_tok * kWgChannels;

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int g = lane / 4, t = lane % 4;
  const int wg = warp / 4, wg_warp = warp % 4;
  // The warp's 16 channels are the 8-channel tiles tile0 (rows g) and tile0 + 1 (rows g + 8).
  const int tile0 = wg * 8 + wg_warp * 2;
  const int k_blocks = p.k / kBlockK;

  int acc[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) acc[i] = 0;

#pragma unroll
  for (int s = 0; s < kWgStages - 1; ++s) {
    if (s < k_blocks) wg_load_stage<F>(p, smem + s * S::kStage, tok0, ch0, s);
    cp_async_commit();
  }

  for (int kb = 0; kb < k_blocks; ++kb) {
    cp_async_wait<kWgStages - 2>();
    // The stage was written through the generic proxy; wgmma reads it through the async proxy.
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    __syncthreads();  // stage kb is complete for all; every wgmma of stage kb - 1 has retired
    const int next = kb + kWgStages - 1;
    if (next < k_blocks) wg_load_stage<F>(p, smem + (next % kWgStages) * S::kStage, tok0, ch0, next);
    cp_async_commit();

    const uint8_t* stage = smem + (kb % kWgStages) * S::kStage;
    const uint8_t* w_tiles = stage + S::kX + tile0 * kTileBytes<F> + lane * 16;
    GroupDequant d0{}, d1{};
    if constexpr (F == Format::kW4A8G128) {
      const uint16_t* groups = reinterpret_cast<const uint16_t*>(stage + S::kX + S::kW);
      d0 = group_dequant(groups[tile0 * 8 + g]);
      d1 = group_dequant(groups[tile0 * 8 + 8 + g]);
    }
    uint32_t a[4][4];  // [step][a0..a3]
#pragma unroll
    for (int pair = 0; pair < 2; ++pair) {
      const int offset = kIsW4<F> ? 0 : pair * 512;
      const uint4 raw0 = lds128(w_tiles + offset);
      const uint4 raw1 = lds128(w_tiles + kTileBytes<F> + offset);
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int s = pair * 2 + half;
        b_fragment<F>(raw0, s, d0, a[s][0], a[s][2]);
        b_fragment<F>(raw1, s, d1, a[s][1], a[s][3]);
      }
    }
#pragma unroll
    for (int i = 0; i < 64; ++i) fence_operand(acc[i]);
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      wgmma_m64n128k32(acc, a[s][0], a[s][1], a[s][2], a[s][3],
                       activation_descriptor<F>(stage + s * S::kStepBytes));
    }
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
    asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
#pragma unroll
    for (int i = 0; i < 64; ++i) fence_operand(acc[i]);
  }
  cp_async_wait<0>();

  // acc[4j + r]: channel 16·wg_warp + g + 8·(r / 2) of the warpgroup, token 8j + 2t + r % 2.
  const int channel = ch0 + wg * 64 + wg_warp * 16 + g;
#pragma unroll
  for (int j = 0; j < 16; ++j) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int token = tok0 + j * 8 + 2 * t + (r % 2);
      if (token < p.m) store_one<F, OutT>(p, token, channel + 8 * (r / 2), acc[4 * j + r]);
    }
  }
}

template <Format F, typename OutT>
void launch_wgmma(const GemmParams& p, cudaStream_t stream) {
  constexpr int smem = WgSmem<F>::kTotal;
  auto kernel = wgmma_kernel<F, OutT>;
  static const cudaError_t attr =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (attr != cudaSuccess) {
    throw std::runtime_error(std::string("omniserve gemm: cannot reserve ") +
                             std::to_string(smem) + " B of shared memory: " +
                             cudaGetErrorString(attr));
  }
  const int blocks = (p.m + kWgTokens - 1) / kWgTokens * (p.n / kWgChannels);
  kernel<<<blocks, kWgThreads, smem, stream>>>(p);
  check_launch("wgmma_kernel");
}

}  // namespace omniserve::gemm
