// Python bindings of the fused activation-quantization ops (fused_*.cu).
#include <torch/extension.h>

#include <vector>

namespace omniserve {
std::vector<at::Tensor> quantize_per_token(const at::Tensor& x);
std::vector<at::Tensor> rmsnorm_quant(const at::Tensor& x, const at::Tensor& weight,
                                         double eps);
std::vector<at::Tensor> add_rmsnorm_quant(const at::Tensor& x, const at::Tensor& delta,
                                             const at::Tensor& weight, double eps);
std::vector<at::Tensor> silu_mul_quant(const at::Tensor& gate_up);
}  // namespace omniserve

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("quantize_per_token", &omniserve::quantize_per_token,
        "x [T, K] fp16/bf16 -> (q int8 [T, K], scales fp16 [T], sums int32 [T])");
  m.def("rmsnorm_quant", &omniserve::rmsnorm_quant,
        "RMSNorm(x; weight, eps) then per-token int8: (q, scales, sums)");
  m.def("add_rmsnorm_quant", &omniserve::add_rmsnorm_quant,
        "residual = x + delta, then RMSNorm(residual; weight, eps) and per-token int8: "
        "(residual, q, scales, sums)");
  m.def("silu_mul_quant", &omniserve::silu_mul_quant,
        "silu(gate) * up of gate_up [T, 2I], then per-token int8: (q [T, I], scales, sums)");
}
