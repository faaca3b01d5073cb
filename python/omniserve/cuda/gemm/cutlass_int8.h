// Interface of the CUTLASS large-M GEMM (gemm/cutlass_int8.cuh); free of CUTLASS headers so the
// torch binding compiles with the host compiler alone.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace omniserve::gemm::cutlass_int8 {

enum class Epilogue { kScale, kZero };
enum class Out { kFloat, kHalf, kBFloat16 };

struct Args {
  const int8_t* a;       // [M, K] row-major activation codes
  const int8_t* b;       // [N, K] row-major weight codes (the unpacked workspace)
  const void* a_scale;   // fp16 [M]
  const int32_t* a_sum;  // [M] (kZero)
  const void* w_scale;   // fp16 [N]
  const void* w_szero;   // fp16 [N] (kZero)
  void* out;             // [M, N] row-major
  int m, n, k;
};

// One definition per output type, each in its own translation unit (gemm_cutlass_<out>.cu), so the
// heavy CUTLASS instantiations compile in parallel. Returns cudaSuccess, or the error that stopped
// the launch (the binding turns it into a message).
template <Out O>
cudaError_t run(const Args& p, Epilogue e, void* workspace, size_t workspace_bytes,
                cudaStream_t stream);

// Bytes of device scratch `run` needs for this problem.
template <Out O>
size_t workspace_size(const Args& p, Epilogue e);

}  // namespace omniserve::gemm::cutlass_int8
