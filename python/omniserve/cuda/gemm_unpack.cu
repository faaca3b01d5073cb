// Packed weight tiles -> row-major int8 [N, K] (gemm/unpack.h). Memory-bound: each thread turns one
// lane's 16-byte vector of a tile into the 32 (W4) or 16 (W8) contiguous bytes it covers, with
// the g128 dequantization of gemm/qgemm.cuh, so the codes equal the tensor-core kernel's B.
#include "gemm/qgemm.cuh"
#include "gemm/unpack.h"

namespace omniserve::gemm {
namespace {

constexpr int kThreads = 256;

template <Format F>
__global__ void __launch_bounds__(kThreads)
    unpack_int8_kernel(const uint4* __restrict__ packed, const uint16_t* __restrict__ groups,
                       int8_t* __restrict__ out, int n, int k, int64_t vectors) {
  const int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= vectors) return;
  constexpr int kVectorsPerTile = kTileBytes<F> / 16;
  const int64_t tile = i / kVectorsPerTile;
  const int r = int(i % kVectorsPerTile);
  const int k_blocks = k / kBlockK;
  const int nb = int(tile / k_blocks), kb = int(tile % k_blocks);
  const int lane = r % 32, g = lane / 4, t = lane % 4;
  const int channel = nb * 8 + g;
  const uint4 raw = packed[i];
  if constexpr (kIsW4<F>) {
    const GroupDequant d =
        F == Format::kW4A8G128 ? group_dequant(groups[int64_t(kb) * n + channel]) : GroupDequant{};
    uint32_t words[8];  // step s: k = t·32 + s·8 + [0, 4) low nibbles, + [4, 8) high nibbles
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      b_fragment<F>(raw, s, d, words[2 * s], words[2 * s + 1]);
    }
    uint4* dst = reinterpret_cast<uint4*>(out + int64_t(channel) * k + kb * kBlockK + t * 32);
    dst[0] = make_uint4(words[0], words[1], words[2], words[3]);
    dst[1] = make_uint4(words[4], words[5], words[6], words[7]);
  } else {
    const int p = r / 32;  // step pair: bytes [t·32 + p·16, +16) of the row
    *reinterpret_cast<uint4*>(out + int64_t(channel) * k + kb * kBlockK + t * 32 + p * 16) = raw;
  }
}

template <Format F>
void launch(const uint8_t* packed, const uint16_t* groups, int8_t* out, int n, int k,
            cudaStream_t stream) {
  const int64_t vectors = int64_t(n) * k / (kIsW4<F> ? 32 : 16);
  const int blocks = int((vectors + kThreads - 1) / kThreads);
  unpack_int8_kernel<F><<<blocks, kThreads, 0, stream>>>(reinterpret_cast<const uint4*>(packed),
                                                         groups, out, n, k, vectors);
}

}  // namespace

void launch_unpack_int8(Format format, const uint8_t* packed, const uint16_t* groups, int8_t* out,
                        int n, int k, cudaStream_t stream) {
  switch (format) {
    case Format::kW8A8: return launch<Format::kW8A8>(packed, groups, out, n, k, stream);
    case Format::kW4A8PerChannel:
      return launch<Format::kW4A8PerChannel>(packed, groups, out, n, k, stream);
    case Format::kW4A8G128: return launch<Format::kW4A8G128>(packed, groups, out, n, k, stream);
  }
}

}  // namespace omniserve::gemm
