// Per-token symmetric int8 quantization of one row held in shared memory, the last stage of every
// fused activation op (omniserve/formats/activation.py, formats/rtn.py):
//   s = fp16_ceil(max|y| / 127)    q = clamp(rint(y / s), -127, 127)    sum = Σ q
// computed with IEEE division and round-half-to-even, so codes equal the torch reference's. The
// fused ops differ only in how they produce y (in the activation dtype), so each is a "producer"
// plugged into `fused_quant_kernel`.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common/check.h"
#include "common/dtype.cuh"
#include "common/reduce.cuh"

namespace omniserve {

constexpr int kActQmax = 127;
constexpr float kMinScale = 6.103515625e-05f;  // 2^-14, fp16's smallest normal (rtn.MIN_SCALE)

// The smallest fp16 value >= max(ratio, 2^-14): quantization then sees the scale dequantization
// uses, and |y| / s <= 127 holds without clamping.
__device__ __forceinline__ __half fp16_ceil(float ratio) {
  const float r = fmaxf(ratio, kMinScale);
  __half h = __float2half_rn(r);
  if (__half2float(h) < r) h = __ushort_as_half(static_cast<unsigned short>(__half_as_ushort(h) + 1));
  return h;
}

struct RowQuantOutputs {
  int8_t* q;        // [rows, K]
  __half* scales;   // [rows]
  int32_t* sums;    // [rows]
};

// Quantizes the row y = `row` (shared memory, K values, max |y| = absmax) of `token`.
template <typename T>
__device__ __forceinline__ void quantize_row(const T* row, int K, int64_t token, float absmax,
                                             const RowQuantOutputs& out, int* scratch_i) {
  using Tr = Float16Traits<T>;
  const __half scale = fp16_ceil(absmax / static_cast<float>(kActQmax));
  const float s = __half2float(scale);
  int sum = 0;
  int8_t* q_row = out.q + token * K;
  for (int v = threadIdx.x; v < K / 8; v += blockDim.x) {
    const Vec8<T> y = reinterpret_cast<const Vec8<T>*>(row)[v];
    alignas(8) int8_t q[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const float c = fminf(fmaxf(rintf(Tr::to_float(y.v[i]) / s), -kActQmax), kActQmax);
      q[i] = static_cast<int8_t>(c);
      sum += q[i];
    }
    reinterpret_cast<int2*>(q_row)[v] = *reinterpret_cast<const int2*>(q);
  }
  sum = block_reduce(sum, SumOp<int>(), scratch_i);
  if (threadIdx.x == 0) {
    out.scales[token] = scale;
    out.sums[token] = sum;
  }
}

// One block per token row. `producer(token, row, scratch)` writes y (activation dtype, K values)
// into the shared `row` and returns the max |y| over the values this thread wrote; `scratch`
// (32 floats) serves its own block reductions.
template <typename T, typename Producer>
__global__ void fused_quant_kernel(Producer producer, int K, RowQuantOutputs out) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ float scratch_f[32];
  __shared__ int scratch_i[32];
  T* row = reinterpret_cast<T*>(smem_raw);
  const int64_t token = blockIdx.x;
  float absmax = producer(token, row, scratch_f);  // per-thread max |y| over what it wrote
  absmax = block_reduce(absmax, MaxOp(), scratch_f);  // its barrier also publishes `row`
  quantize_row(row, K, token, absmax, out, scratch_i);
}

// Threads per block for rows of K values (K / 8 vectors, one or more per thread).
inline int fused_quant_threads(int64_t K) {
  const int64_t vectors = K / 8;
  const int64_t warps = (vectors + 31) / 32;
  return static_cast<int>(std::min<int64_t>(32 * warps, 1024));
}

// Launches `fused_quant_kernel` for `tokens` rows of K values; returns (q, scales, sums).
template <typename T, typename Producer>
std::vector<at::Tensor> launch_fused_quant(const Producer& producer, int64_t tokens, int64_t K,
                                              const at::Tensor& like) {
  auto q = at::empty({tokens, K}, like.options().dtype(at::kChar));
  auto scales = at::empty({tokens}, like.options().dtype(at::kHalf));
  auto sums = at::empty({tokens}, like.options().dtype(at::kInt));
  if (tokens == 0) return {q, scales, sums};
  const size_t smem = static_cast<size_t>(K) * sizeof(T);
  auto kernel = fused_quant_kernel<T, Producer>;
  if (smem > 48 * 1024) {
    int max_optin = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&max_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                          like.get_device()));
    OMNI_CHECK(smem + 256 <= static_cast<size_t>(max_optin), "rows of ", K,
               " values need more shared memory (", smem, " bytes) than a block may have");
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
  }
  RowQuantOutputs out{q.data_ptr<int8_t>(), reinterpret_cast<__half*>(scales.data_ptr()),
                      sums.data_ptr<int32_t>()};
  const auto stream = at::cuda::getCurrentCUDAStream(like.get_device());
  kernel<<<static_cast<unsigned>(tokens), fused_quant_threads(K), smem, stream>>>(
      producer, static_cast<int>(K), out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {q, scales, sums};
}

// Host checks shared by the fused ops: a CUDA, 16-byte aligned, row-contiguous 2-D activation
// whose last dimension is a multiple of 8.
inline void check_activation(const at::Tensor& x, const char* name) {
  OMNI_CHECK(x.is_cuda(), name, " must be a CUDA tensor, got device ", x.device());
  OMNI_CHECK(x.dim() == 2, name, " must be 2-D [tokens, features], got shape ", x.sizes());
  OMNI_CHECK(x.stride(1) == 1, name, " must be contiguous in its last dimension");
  OMNI_CHECK(x.size(1) % 8 == 0 && x.size(1) > 0, name,
             ": the feature size must be a positive multiple of 8, got ", x.size(1));
  OMNI_CHECK(x.stride(0) % 8 == 0, name, ": the row stride must be a multiple of 8 elements");
  OMNI_CHECK(is_aligned16(x.data_ptr()), name, " must be 16-byte aligned");
  OMNI_CHECK(x.size(0) <= 0x7fffffff, name, ": too many tokens for one launch");
}

}  // namespace omniserve
