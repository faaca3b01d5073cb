// Decode attention instantiations for per-tensor static KV8 codes (see
// common/decode_attention.cuh).
#include "common/decode_attention.cuh"

namespace omniserve::decode {
template void launch_format<__half, KVFormat::kStaticKV8>(const DecodeParams&, int, int, int, int,
                                                    size_t, cudaStream_t);
template void launch_format<__nv_bfloat16, KVFormat::kStaticKV8>(const DecodeParams&, int, int, int,
                                                           int, size_t, cudaStream_t);
}  // namespace omniserve::decode
