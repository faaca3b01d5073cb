// cp.async (Ampere+) copies from global into shared memory that do not pass through registers.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace omniserve {

// Copies 16 bytes; with `valid` false, zero-fills them instead (reads nothing).
__device__ __forceinline__ void cp_async16(void* smem, const void* global, bool valid = true) {
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(global),
               "r"(src_bytes));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n"); }

// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

}  // namespace omniserve
