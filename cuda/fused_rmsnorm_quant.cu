// RMSNorm then per-token int8 quantization (+ code sums): omniserve.quant.activation.
// rmsnorm_quant. y = w * (T)(x * rsqrt(mean(x²) + eps)), with the roundings of layers/norm.py.
#include "common/act_quant.cuh"
#include "common/check.h"

namespace omniserve {
namespace {

template <typename T>
struct RMSNormRow {
  const T* x;
  const T* weight;
  int64_t row_stride;
  int K;
  float eps;

  __device__ float operator()(int64_t token, T* row, float* scratch) const {
    using Tr = Float16Traits<T>;
    const Vec8<T>* src = reinterpret_cast<const Vec8<T>*>(x + token * row_stride);
    float sumsq = 0.f;
    for (int v = threadIdx.x; v < K / 8; v += blockDim.x) {
      const Vec8<T> xv = src[v];
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const float f = Tr::to_float(xv.v[i]);
        sumsq += __fmul_rn(f, f);  // torch rounds x² before summing: no fused multiply-add
      }
    }
    sumsq = block_reduce(sumsq, SumOp<float>(), scratch);
    // torch's mean multiplies the sum by 1/K; rsqrtf is the function torch's rsqrt calls.
    const float r = rsqrtf(__fmul_rn(sumsq, 1.f / static_cast<float>(K)) + eps);  // no FMA either
    const Vec8<T>* w = reinterpret_cast<const Vec8<T>*>(weight);
    float absmax = 0.f;
    for (int v = threadIdx.x; v < K / 8; v += blockDim.x) {
      const Vec8<T> xv = src[v], wv = w[v];
      Vec8<T> y;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const T normed = Tr::from_float(Tr::to_float(xv.v[i]) * r);
        y.v[i] = Tr::from_float(Tr::to_float(wv.v[i]) * Tr::to_float(normed));
        absmax = fmaxf(absmax, fabsf(Tr::to_float(y.v[i])));
      }
      reinterpret_cast<Vec8<T>*>(row)[v] = y;
    }
    return absmax;
  }
};

}  // namespace

std::vector<at::Tensor> rmsnorm_quant(const at::Tensor& x, const at::Tensor& weight,
                                         double eps) {
  check_activation(x, "x");
  OMNI_CHECK(weight.is_cuda() && weight.device() == x.device(), "weight must be on ", x.device());
  OMNI_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1), "weight must have shape [",
             x.size(1), "], got ", weight.sizes());
  OMNI_CHECK(weight.scalar_type() == x.scalar_type(), "weight dtype ", weight.scalar_type(),
             " differs from x dtype ", x.scalar_type());
  OMNI_CHECK(weight.is_contiguous() && is_aligned16(weight.data_ptr()),
             "weight must be contiguous and 16-byte aligned");
  const c10::cuda::CUDAGuard guard(x.device());
  return OMNISERVE_DISPATCH_FLOAT16(x.scalar_type(), "rmsnorm_quant x", [&] {
    const RMSNormRow<scalar_t> producer{reinterpret_cast<const scalar_t*>(x.data_ptr()),
                                        reinterpret_cast<const scalar_t*>(weight.data_ptr()),
                                        x.stride(0), static_cast<int>(x.size(1)),
                                        static_cast<float>(eps)};
    return launch_fused_quant<scalar_t>(producer, x.size(0), x.size(1), x);
  });
}

}  // namespace omniserve
