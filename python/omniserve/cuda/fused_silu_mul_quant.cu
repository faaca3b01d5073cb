// silu(gate) * up of the fused gate_up projection, then per-token int8 quantization (+ code
// sums): omniserve.formats.activation.silu_mul_quant. silu is rounded to the activation dtype
// before the product, as torch's two ops (F.silu, then *) round.
#include "common/act_quant.cuh"
#include "common/check.h"

namespace omniserve {
namespace {

template <typename T>
struct SiluMulRow {
  const T* gate_up;
  int64_t row_stride;
  int I;  // output features; the input row is [gate (I), up (I)]

  __device__ float operator()(int64_t token, T* row, float*) const {
    using Tr = Float16Traits<T>;
    const T* src = gate_up + token * row_stride;
    const Vec8<T>* gate = reinterpret_cast<const Vec8<T>*>(src);
    const Vec8<T>* up = reinterpret_cast<const Vec8<T>*>(src + I);
    float absmax = 0.f;
    for (int v = threadIdx.x; v < I / 8; v += blockDim.x) {
      const Vec8<T> g = gate[v], u = up[v];
      Vec8<T> y;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const float gf = Tr::to_float(g.v[i]);
        const T silu = Tr::from_float(gf / (1.f + expf(-gf)));  // torch's silu formula
        y.v[i] = Tr::from_float(Tr::to_float(silu) * Tr::to_float(u.v[i]));
        absmax = fmaxf(absmax, fabsf(Tr::to_float(y.v[i])));
      }
      reinterpret_cast<Vec8<T>*>(row)[v] = y;
    }
    return absmax;
  }
};

}  // namespace

std::vector<at::Tensor> silu_mul_quant(const at::Tensor& gate_up) {
  check_activation(gate_up, "gate_up");
  OMNI_CHECK(gate_up.size(1) % 16 == 0, "gate_up: the feature size (2 * intermediate) must be a "
             "multiple of 16 so that each half is a multiple of 8, got ", gate_up.size(1));
  const c10::cuda::CUDAGuard guard(gate_up.device());
  const int64_t I = gate_up.size(1) / 2;
  return OMNISERVE_DISPATCH_FLOAT16(gate_up.scalar_type(), "silu_mul_quant gate_up", [&] {
    const SiluMulRow<scalar_t> producer{reinterpret_cast<const scalar_t*>(gate_up.data_ptr()),
                                        gate_up.stride(0), static_cast<int>(I)};
    return launch_fused_quant<scalar_t>(producer, gate_up.size(0), I, gate_up);
  });
}

}  // namespace omniserve
