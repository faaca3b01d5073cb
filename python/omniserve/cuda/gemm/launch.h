// Host-side launch helpers the quantized GEMM kernels share (gemm/small_m.cuh,
// gemm/tensor_core.cuh).
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace omniserve::gemm {

inline void check_cuda(const std::string& what, cudaError_t err) {
  if (err != cudaSuccess) {
    throw std::runtime_error("omniserve gemm: " + what + " failed: " + cudaGetErrorString(err));
  }
}

inline void check_launch(const char* what, cudaError_t err = cudaGetLastError()) {
  check_cuda(std::string("launching ") + what, err);
}

// Opts `kernel` into `bytes` of dynamic shared memory, once per kernel (the first call's answer is
// kept, so a failure is reported on every launch).
template <auto kernel>
void reserve_shared_memory(int bytes) {
  static const cudaError_t attr =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (attr != cudaSuccess) {
    throw std::runtime_error(std::string("omniserve gemm: cannot reserve ") +
                             std::to_string(bytes) + " B of shared memory: " +
                             cudaGetErrorString(attr));
  }
}

}  // namespace omniserve::gemm
