// The CUTLASS large-M GEMM (gemm/cutlass_int8.cuh) with f16 output.
#include "gemm/cutlass_int8.cuh"

namespace omniserve::gemm::cutlass_int8 {
OMNISERVE_CUTLASS_INT8_INSTANTIATE(Out::kHalf)
}  // namespace omniserve::gemm::cutlass_int8
