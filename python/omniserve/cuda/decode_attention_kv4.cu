// Decode attention instantiations for KV4 codes (see common/decode_attention.cuh).
#include "common/decode_attention_kv4.cuh"

namespace omniserve::decode {
template void launch_format<__half, KVFormat::kKV4>(const DecodeParams&, int, int, int, int,
                                                    size_t, cudaStream_t);
template void launch_format<__nv_bfloat16, KVFormat::kKV4>(const DecodeParams&, int, int, int,
                                                           int, size_t, cudaStream_t);
}  // namespace omniserve::decode
