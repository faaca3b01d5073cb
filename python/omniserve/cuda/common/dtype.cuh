// 16-bit float types of the engine (fp16, bf16): conversions, 16-byte vectors, dtype dispatch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <ATen/ATen.h>

#include "common/check.h"

#include <cstdint>

namespace omniserve {

template <typename T>
struct Float16Traits;

template <>
struct Float16Traits<__half> {
  using Pair = __half2;
  __device__ __forceinline__ static float to_float(__half x) { return __half2float(x); }
  __device__ __forceinline__ static __half from_float(float x) { return __float2half_rn(x); }
  __device__ __forceinline__ static float2 to_float2(__half2 x) { return __half22float2(x); }
};

template <>
struct Float16Traits<__nv_bfloat16> {
  using Pair = __nv_bfloat162;
  __device__ __forceinline__ static float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  __device__ __forceinline__ static __nv_bfloat16 from_float(float x) {
    return __float2bfloat16_rn(x);
  }
  __device__ __forceinline__ static float2 to_float2(__nv_bfloat162 x) {
    return __bfloat1622float2(x);
  }
};

// Eight 16-bit floats: one 16-byte (vectorized) global access.
template <typename T>
struct alignas(16) Vec8 {
  T v[8];
};

// Pointer alignment for 16-byte vector accesses, checked on the host.
inline bool is_aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

}  // namespace omniserve

// Runs the body with `scalar_t` bound to the CUDA type of a float16/bfloat16 torch dtype.
#define OMNISERVE_DISPATCH_FLOAT16(DTYPE, WHAT, ...)                                      \
  [&] {                                                                                 \
    if ((DTYPE) == at::ScalarType::Half) {                                              \
      using scalar_t = __half;                                                          \
      return __VA_ARGS__();                                                             \
    } else if ((DTYPE) == at::ScalarType::BFloat16) {                                   \
      using scalar_t = __nv_bfloat16;                                                   \
      return __VA_ARGS__();                                                             \
    }                                                                                   \
    OMNI_CHECK(false, WHAT, ": expected float16 or bfloat16, got ", (DTYPE));           \
  }()
