// Warp and block reductions (sum, max, min) over floats and ints.
#pragma once

#include <cuda_runtime.h>

namespace omniserve {

template <typename T>
struct SumOp {
  __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};

struct MaxOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

struct MinOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return fminf(a, b); }
};

// Butterfly over lanes [lane ^ width/2 ... lane ^ first): every lane of each group of `Width`
// consecutive lanes ends with the group's result. `First` > 1 reduces across groups of `First`
// lanes instead (lanes that differ in the bits first..width-1).
template <int Width, int First = 1, typename T, typename Op>
__device__ __forceinline__ T warp_reduce(T x, Op op) {
#pragma unroll
  for (int offset = Width / 2; offset >= First; offset /= 2) {
    x = op(x, __shfl_xor_sync(0xffffffffu, x, offset));
  }
  return x;
}

// Reduction over the whole block (blockDim.x a multiple of 32, at most 1024); every thread gets
// the result. `scratch` holds 32 values; the call ends with a barrier, so it can be reused.
template <typename T, typename Op>
__device__ __forceinline__ T block_reduce(T x, Op op, T* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  x = warp_reduce<32>(x, op);
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  T r = scratch[0];
  for (int w = 1; w < warps; ++w) r = op(r, scratch[w]);
  __syncthreads();
  return r;
}

}  // namespace omniserve
