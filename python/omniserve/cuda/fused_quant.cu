// Per-token int8 quantization of activations (+ code sums): omniserve.formats.activation.
// quantize_per_token.
#include "common/act_quant.cuh"

namespace omniserve {
namespace {

template <typename T>
struct CopyRow {
  const T* x;
  int64_t row_stride;
  int K;

  __device__ float operator()(int64_t token, T* row, float*) const {
    using Tr = Float16Traits<T>;
    const Vec8<T>* src = reinterpret_cast<const Vec8<T>*>(x + token * row_stride);
    float absmax = 0.f;
    for (int v = threadIdx.x; v < K / 8; v += blockDim.x) {
      const Vec8<T> y = src[v];
#pragma unroll
      for (int i = 0; i < 8; ++i) absmax = fmaxf(absmax, fabsf(Tr::to_float(y.v[i])));
      reinterpret_cast<Vec8<T>*>(row)[v] = y;
    }
    return absmax;
  }
};

}  // namespace

std::vector<at::Tensor> quantize_per_token(const at::Tensor& x) {
  check_activation(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  return OMNISERVE_DISPATCH_FLOAT16(x.scalar_type(), "quantize_per_token x", [&] {
    const CopyRow<scalar_t> producer{reinterpret_cast<const scalar_t*>(x.data_ptr()), x.stride(0),
                                     static_cast<int>(x.size(1))};
    return launch_fused_quant<scalar_t>(producer, x.size(0), x.size(1), x);
  });
}

}  // namespace omniserve
