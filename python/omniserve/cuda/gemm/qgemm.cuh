// Quantized GEMMs y[M, N] = epilogue(x_q[M, K] · B[N, K]ᵀ) for W8A8, W4A8 per-channel and W4A8 g128
// (python/omniserve/formats/gemm.py is the specification; kernels/gemm.py packs the weights).
//
// Both kernels (gemm/small_m.cuh, gemm/tensor_core.cuh) compute int8 x int8 → int32 on tensor
// cores. Their shared idea is a K order chosen so that every operand fragment of the mma.sync
// m16n8k32 is one 16-byte vector per lane:
//
//   A sum over k is order-free, so inside each 128-wide K block (one g128 group) the m16n8k32 step
//   s ∈ [0, 4) and register half h ∈ {0, 1} of lane (g = lane / 4, t = lane % 4) take the physical
//   inputs  k = t·32 + s·8 + h·4 + i  (i = byte of the 32-bit register)  instead of the PTX order
//   k = h·16 + t·4 + i. A and B agree on it, so the product is unchanged, and lane t then needs
//   the 32 contiguous bytes [t·32, t·32 + 32) of each activation row: two 16-byte loads give the A
//   registers of all four steps, straight from row-major x_q, without ldmatrix or a repack. The
//   same order hands a lane channel g's bytes [t·32, t·32 + 32) in natural order, which is how the
//   wgmma kernel expands a packed tile into a plain int8 one.
//
// B is packed at load time in the same order, in tiles of 8 output channels × 128 inputs, tiles
// row-major over [N/8][K/128]; lane = g·4 + t owns channel g of the tile:
//   W4 (512 B): lane's 16 bytes at lane·16; word s, byte i holds k = t·32 + s·8 + i in the low
//               nibble (register half 0) and k + 4 in the high nibble (half 1), so
//               b0 = w & 0x0F0F0F0F and b1 = (w >> 4) & 0x0F0F0F0F unpack four codes per op.
//   W8 (1 KiB): pair p ∈ {0, 1} of steps at p·512 + lane·16, the row's bytes [t·32 + p·16, +16).
// g128 group scale and zero come as one uint16 per (group, channel): s2 | (s2_zeros << 8).
#pragma once

#include <cuda_bf16.h>

#include <type_traits>

#include "common/async_copy.cuh"
#include "gemm/params.h"

namespace omniserve::gemm {

__device__ __forceinline__ void mma_s8(int (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                       uint32_t a3, uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// g128 dequantization constants of one (group, channel): w8 = q · s2 + s2_zeros per byte lane.
struct GroupDequant {
  uint32_t s2;       // multiplier; q · s2 ≤ 15 · 17 < 256, so no lane carries into the next
  uint32_t zero_lo;  // s2_zeros byte broadcast, low 7 bits of each lane
  uint32_t zero_hi;  // ... and bit 7 of each lane
};

__device__ __forceinline__ GroupDequant group_dequant(uint16_t packed) {
  const uint32_t zero = (uint32_t(packed) >> 8) * 0x01010101u;
  return {uint32_t(packed) & 0xFFu, zero & 0x7F7F7F7Fu, zero & 0x80808080u};
}

// Four uint4 codes (one per byte lane, 0..15) → int8 lanes (q · s2 + s2_zeros) mod 256: the low
// seven bits add without crossing a lane, bit 7 is the xor of both operands' bit 7 and that carry.
__device__ __forceinline__ uint32_t dequant_g128(uint32_t codes, const GroupDequant& d) {
  const uint32_t x = codes * d.s2;
  return ((x & 0x7F7F7F7Fu) + d.zero_lo) ^ ((x & 0x80808080u) ^ d.zero_hi);
}

// The B registers (b0, b1) of m16n8k32 step `s` of a K block, for one 8-channel tile. `raw` is the
// lane's W4 vector (all four steps) or, for W8, the vector of the step pair s / 2.
template <Format F>
__device__ __forceinline__ void b_fragment(const uint4& raw, int s, const GroupDequant& d,
                                           uint32_t& b0, uint32_t& b1) {
  if constexpr (kIsW4<F>) {
    const uint32_t w = s == 0 ? raw.x : s == 1 ? raw.y : s == 2 ? raw.z : raw.w;
    b0 = w & 0x0F0F0F0Fu;
    b1 = (w >> 4) & 0x0F0F0F0Fu;
    if constexpr (F == Format::kW4A8G128) {
      b0 = dequant_g128(b0, d);
      b1 = dequant_g128(b1, d);
    }
  } else {
    b0 = (s & 1) ? raw.z : raw.x;
    b1 = (s & 1) ? raw.w : raw.y;
  }
}

// The float epilogue of formats/gemm.py in its exact operation order, each op rounded once (no FMA
// contraction), so that the fp32 result equals the reference bit for bit.
template <Format F>
__device__ __forceinline__ float epilogue(int acc, float w_scale, float w_szero, float a_scale,
                                          int a_sum) {
  const float y = __int2float_rn(acc);
  if constexpr (F == Format::kW4A8PerChannel) {
    const float correction = __fmul_rn(w_szero, __int2float_rn(a_sum));
    return __fmul_rn(a_scale, __fsub_rn(__fmul_rn(w_scale, y), correction));
  } else {
    return __fmul_rn(__fmul_rn(y, w_scale), a_scale);
  }
}

// Writes out[row, col], out[row, col + 1] (col even) from two accumulators. OutT = int32_t stores
// the raw accumulators (the exactness tests' debug entry).
template <Format F, typename OutT>
__device__ __forceinline__ void store_pair(const GemmParams& p, int row, int col, int acc0,
                                           int acc1) {
  OutT* out = static_cast<OutT*>(p.out) + size_t(row) * p.n + col;
  if constexpr (std::is_same_v<OutT, int32_t>) {
    *reinterpret_cast<int2*>(out) = make_int2(acc0, acc1);
  } else {
    const __half2 ws = *reinterpret_cast<const __half2*>(p.w_scale + col);
    float2 wz = make_float2(0.f, 0.f);
    int a_sum = 0;
    if constexpr (F == Format::kW4A8PerChannel) {
      wz = __half22float2(*reinterpret_cast<const __half2*>(p.w_szero + col));
      a_sum = p.a_sum[row];
    }
    const float as = __half2float(p.a_scale[row]);
    const float y0 = epilogue<F>(acc0, __low2float(ws), wz.x, as, a_sum);
    const float y1 = epilogue<F>(acc1, __high2float(ws), wz.y, as, a_sum);
    if constexpr (std::is_same_v<OutT, float>) {
      *reinterpret_cast<float2*>(out) = make_float2(y0, y1);
    } else if constexpr (std::is_same_v<OutT, __half>) {
      *reinterpret_cast<__half2*>(out) = __halves2half2(__float2half_rn(y0), __float2half_rn(y1));
    } else {
      static_assert(std::is_same_v<OutT, __nv_bfloat16>, "output is int32, fp32, fp16 or bf16");
      *reinterpret_cast<__nv_bfloat162*>(out) =
          __halves2bfloat162(__float2bfloat16_rn(y0), __float2bfloat16_rn(y1));
    }
  }
}

__device__ __forceinline__ uint4 lds128(const void* smem) {
  return *reinterpret_cast<const uint4*>(smem);
}

}  // namespace omniserve::gemm
