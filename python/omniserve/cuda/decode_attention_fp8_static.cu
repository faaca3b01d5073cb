// Decode attention instantiations for per-tensor FP8 (e4m3) codes (see
// common/decode_attention.cuh).
#include "common/decode_attention.cuh"

namespace omniserve::decode {
template void launch_format<__half, KVFormat::kStaticFP8>(const DecodeParams&, int, int, int, int,
                                                    size_t, cudaStream_t);
template void launch_format<__nv_bfloat16, KVFormat::kStaticFP8>(const DecodeParams&, int, int, int,
                                                           int, size_t, cudaStream_t);
}  // namespace omniserve::decode
