// Expansion of a packed weight (gemm/qgemm.cuh layout) into row-major int8 [N, K]: the operand B
// of the integer core, as the CUTLASS large-M GEMM (gemm/cutlass_int8.cuh) reads it.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "gemm/params.h"

namespace omniserve::gemm {

// out[n, k] = W8 code, W4 code (0..15), or g128's level-1 w8 = q · s2 + s2_zeros.
// `groups` is the g128 table (gemm/params.h), nullptr for the other formats.
void launch_unpack_int8(Format format, const uint8_t* packed, const uint16_t* groups, int8_t* out,
                        int n, int k, cudaStream_t stream);

}  // namespace omniserve::gemm
