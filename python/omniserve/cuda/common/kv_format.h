// How a KV cache stores its rows (python/omniserve/runner/kv_cache.py); kernels take it as a
// template parameter.
#pragma once

namespace omniserve {

enum class KVFormat {
  kDense,      // values in the compute dtype
  kKV8,        // quantize_kv codes, a byte each, with an fp16 (scale, zero) per row
  kKV4,        // likewise, two codes a byte (low nibble = even channel)
  kStaticKV8,  // quantize_kv_static int8 codes under one fp32 scale per layer for K and for V
  kStaticFP8,  // quantize_kv_fp8 e4m3 codes under one fp32 scale per layer for K and for V
};

// Formats with one scale per layer and tensor and nothing stored per row.
template <KVFormat F>
constexpr bool kIsStatic = F == KVFormat::kStaticKV8 || F == KVFormat::kStaticFP8;

// Bits per stored value.
template <KVFormat F>
constexpr int kBitsOf = F == KVFormat::kDense ? 16 : F == KVFormat::kKV4 ? 4 : 8;

}  // namespace omniserve
