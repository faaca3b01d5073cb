// Decode attention instantiations for K/V stored in the compute dtype, fp16 or bf16 (see
// common/decode_attention.cuh).
#include "common/decode_attention.cuh"

namespace omniserve::decode {
template void launch_format<__half, KVFormat::kDense>(const DecodeParams&, int, int, int, int,
                                                    size_t, cudaStream_t);
template void launch_format<__nv_bfloat16, KVFormat::kDense>(const DecodeParams&, int, int, int,
                                                           int, size_t, cudaStream_t);
}  // namespace omniserve::decode
