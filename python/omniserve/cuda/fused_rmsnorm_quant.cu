// RMSNorm then per-token int8 quantization (+ code sums): omniserve.formats.activation.
// rmsnorm_quant, and the same fused with the residual add before it (add_rmsnorm_quant).
// y = w * (T)(h * rsqrt(mean(h²) + eps)), with the roundings of layers/norm.py, of h = x, or of
// h = (T)(x + delta) (torch's add, rounded once to T) which is also written out as the residual.
#include "common/act_quant.cuh"
#include "common/check.h"

namespace omniserve {
namespace {

template <typename T>
struct RMSNormRow {
  const T* x;
  const T* delta;  // nullptr: normalize x itself; else x + delta, written to `residual`
  T* residual;     // [tokens, K], contiguous
  const T* weight;
  int64_t x_stride;
  int64_t delta_stride;
  int K;
  float eps;

  // h goes through the shared `row` between the two passes (each thread reads back only what it
  // wrote), so x and delta are read from global memory once and the sum is never re-read.
  __device__ float operator()(int64_t token, T* row, float* scratch) const {
    using Tr = Float16Traits<T>;
    const Vec8<T>* src = reinterpret_cast<const Vec8<T>*>(x + token * x_stride);
    Vec8<T>* h_row = reinterpret_cast<Vec8<T>*>(row);
    float sumsq = 0.f;
    for (int v = threadIdx.x; v < K / 8; v += blockDim.x) {
      Vec8<T> h = src[v];
      if (delta != nullptr) {
        const Vec8<T> d = reinterpret_cast<const Vec8<T>*>(delta + token * delta_stride)[v];
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          h.v[i] = Tr::from_float(Tr::to_float(h.v[i]) + Tr::to_float(d.v[i]));
        }
        reinterpret_cast<Vec8<T>*>(residual + token * K)[v] = h;
      }
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const float f = Tr::to_float(h.v[i]);
        sumsq += __fmul_rn(f, f);  // torch rounds h² before summing: no fused multiply-add
      }
      h_row[v] = h;
    }
    sumsq = block_reduce(sumsq, SumOp<float>(), scratch);
    // torch's mean multiplies the sum by 1/K; rsqrtf is the function torch's rsqrt calls.
    const float r = rsqrtf(__fmul_rn(sumsq, 1.f / static_cast<float>(K)) + eps);  // no FMA either
    const Vec8<T>* w = reinterpret_cast<const Vec8<T>*>(weight);
    float absmax = 0.f;
    for (int v = threadIdx.x; v < K / 8; v += blockDim.x) {
      const Vec8<T> h = h_row[v], wv = w[v];
      Vec8<T> y;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const T normed = Tr::from_float(Tr::to_float(h.v[i]) * r);
        y.v[i] = Tr::from_float(Tr::to_float(wv.v[i]) * Tr::to_float(normed));
        absmax = fmaxf(absmax, fabsf(Tr::to_float(y.v[i])));
      }
      h_row[v] = y;
    }
    return absmax;
  }
};

void check_norm_weight(const at::Tensor& weight, const at::Tensor& x) {
  OMNI_CHECK(weight.is_cuda() && weight.device() == x.device(), "weight must be on ", x.device());
  OMNI_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1), "weight must have shape [",
             x.size(1), "], got ", weight.sizes());
  OMNI_CHECK(weight.scalar_type() == x.scalar_type(), "weight dtype ", weight.scalar_type(),
             " differs from x dtype ", x.scalar_type());
  OMNI_CHECK(weight.is_contiguous() && is_aligned16(weight.data_ptr()),
             "weight must be contiguous and 16-byte aligned");
}

// (q, scales, sums) of RMSNorm(x + delta) for a `delta` (`residual` then receives x + delta), or
// of RMSNorm(x) for an undefined one.
std::vector<at::Tensor> launch_rmsnorm_quant(const at::Tensor& x, const at::Tensor& delta,
                                             const at::Tensor& residual, const at::Tensor& weight,
                                             double eps) {
  const c10::cuda::CUDAGuard guard(x.device());
  return OMNISERVE_DISPATCH_FLOAT16(x.scalar_type(), "rmsnorm_quant x", [&] {
    using T = scalar_t;
    const bool add = delta.defined();
    const RMSNormRow<T> producer{
        reinterpret_cast<const T*>(x.data_ptr()),
        add ? reinterpret_cast<const T*>(delta.data_ptr()) : nullptr,
        add ? reinterpret_cast<T*>(residual.data_ptr()) : nullptr,
        reinterpret_cast<const T*>(weight.data_ptr()),
        x.stride(0),
        add ? delta.stride(0) : 0,
        static_cast<int>(x.size(1)),
        static_cast<float>(eps)};
    return launch_fused_quant<T>(producer, x.size(0), x.size(1), x);
  });
}

}  // namespace

std::vector<at::Tensor> rmsnorm_quant(const at::Tensor& x, const at::Tensor& weight,
                                         double eps) {
  check_activation(x, "x");
  check_norm_weight(weight, x);
  return launch_rmsnorm_quant(x, at::Tensor(), at::Tensor(), weight, eps);
}

std::vector<at::Tensor> add_rmsnorm_quant(const at::Tensor& x, const at::Tensor& delta,
                                             const at::Tensor& weight, double eps) {
  check_activation(x, "x");
  check_activation(delta, "delta");
  OMNI_CHECK(delta.device() == x.device(), "delta must be on ", x.device(), ", got ",
             delta.device());
  OMNI_CHECK(delta.sizes() == x.sizes(), "delta must have x's shape ", x.sizes(), ", got ",
             delta.sizes());
  OMNI_CHECK(delta.scalar_type() == x.scalar_type(), "delta dtype ", delta.scalar_type(),
             " differs from x dtype ", x.scalar_type());
  check_norm_weight(weight, x);
  auto residual = at::empty(x.sizes(), x.options());
  auto quantized = launch_rmsnorm_quant(x, delta, residual, weight, eps);
  quantized.insert(quantized.begin(), residual);
  return quantized;
}

}  // namespace omniserve
