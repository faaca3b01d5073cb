// Kernel choice per call (gemm/params.h `Path`) and the per-format launcher the binding calls.
// Auto: the memory-bound kernel up to M = 64, the mma.sync tensor-core kernel above (large M goes
// to the CUTLASS path, kernels/gemm_cutlass.py, before reaching this extension).
#pragma once

#include "gemm/kernels.cuh"

namespace omniserve::gemm {

template <Format F, typename OutT>
void launch_typed(const GemmParams& p, Path path, cudaStream_t stream) {
  if (path == Path::kSmallM || (path == Path::kAuto && p.m <= kSmallMMax)) {
    launch_small_m<F, OutT>(p, stream);
  } else {
    launch_tensor_core<F, OutT>(p, stream);
  }
}

template <Format F>
void launch_gemm(const GemmParams& p, int out_kind, Path path, cudaStream_t stream) {
  switch (out_kind) {
    case kOutInt32: return launch_typed<F, int32_t>(p, path, stream);
    case kOutFloat: return launch_typed<F, float>(p, path, stream);
    case kOutHalf: return launch_typed<F, __half>(p, path, stream);
    case kOutBFloat16: return launch_typed<F, __nv_bfloat16>(p, path, stream);
    default: throw std::invalid_argument("omniserve gemm: unknown output kind");
  }
}

}  // namespace omniserve::gemm
