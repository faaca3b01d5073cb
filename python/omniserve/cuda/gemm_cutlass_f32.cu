// The CUTLASS large-M GEMM (gemm/cutlass_int8.cuh) with f32 output.
#include "gemm/cutlass_int8.cuh"

namespace omniserve::gemm::cutlass_int8 {
OMNISERVE_CUTLASS_INT8_INSTANTIATE(Out::kFloat)
}  // namespace omniserve::gemm::cutlass_int8
