// Host-side checks of the K/V cache operands every kernel binding takes, as `kernel_operands`
// gives them (python/omniserve/runner/kv_cache.py): the rows, then per-row fp16 (scale, zero)
// params or per-tensor fp32 scales.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <utility>

#include "common/check.h"
#include "common/dtype.cuh"
#include "common/kv_format.h"

namespace omniserve {

// Checks K and V cache rows [rows, width] on `device` with their params or scales, for heads of
// `head_dim` channels computed in `dtype`, and returns the cache's format.
inline KVFormat check_kv_operands(const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const std::optional<at::Tensor>& k_params,
                                  const std::optional<at::Tensor>& v_params,
                                  const std::optional<at::Tensor>& k_scale,
                                  const std::optional<at::Tensor>& v_scale, int64_t head_dim,
                                  at::ScalarType dtype, const at::Device& device) {
  const bool per_row = k_params.has_value();
  OMNI_CHECK(per_row == v_params.has_value(), "pass both k_params and v_params or neither");
  const bool per_tensor = k_scale.has_value();
  OMNI_CHECK(per_tensor == v_scale.has_value(), "pass both k_scale and v_scale or neither");
  OMNI_CHECK(!(per_row && per_tensor),
             "pass per-row k_params/v_params or per-tensor k_scale/v_scale, not both");
  for (const at::Tensor* cache : {&k_cache, &v_cache}) {
    OMNI_CHECK(cache->device() == device, "the KV cache must be on ", device, ", got ",
               cache->device());
    OMNI_CHECK(cache->dim() == 2 && cache->is_contiguous() && is_aligned16(cache->data_ptr()),
               "KV cache rows must be a contiguous, 16-byte aligned 2-D tensor, got shape ",
               cache->sizes(), " with strides ", cache->strides());
  }
  OMNI_CHECK(k_cache.sizes() == v_cache.sizes() && k_cache.scalar_type() == v_cache.scalar_type(),
             "K and V caches must have the same shape and dtype, got ", k_cache.sizes(), " ",
             k_cache.scalar_type(), " and ", v_cache.sizes(), " ", v_cache.scalar_type());
  const int64_t width = k_cache.size(1);
  if (per_row) {
    OMNI_CHECK(k_cache.scalar_type() == at::kByte, "quantized caches hold uint8 codes, got ",
               k_cache.scalar_type());
    OMNI_CHECK(width == head_dim || width * 2 == head_dim, "code rows of ", width,
               " bytes fit neither KV8 nor KV4 at head_dim ", head_dim);
    for (const at::Tensor* p : {&*k_params, &*v_params}) {
      OMNI_CHECK(p->device() == device && p->scalar_type() == at::kHalf && p->dim() == 2 &&
                     p->size(0) == k_cache.size(0) && p->size(1) == 2 && p->is_contiguous() &&
                     reinterpret_cast<std::uintptr_t>(p->data_ptr()) % 4 == 0,
                 "KV params must be contiguous, 4-byte aligned float16 [", k_cache.size(0),
                 ", 2] on ", device, ", got ", p->scalar_type(), " ", p->sizes(), " on ",
                 p->device());
    }
    return width == head_dim ? KVFormat::kKV8 : KVFormat::kKV4;
  }
  if (per_tensor) {
    const bool fp8 = k_cache.scalar_type() == at::kFloat8_e4m3fn;
    OMNI_CHECK((fp8 || k_cache.scalar_type() == at::kChar) && width == head_dim,
               "a per-tensor static cache must be int8 (KV8) or float8_e4m3fn (FP8) [rows, ",
               head_dim, "], got ", k_cache.scalar_type(), " ", k_cache.sizes());
    for (const auto& [scale, name] : {std::pair{&*k_scale, "k_scale"}, {&*v_scale, "v_scale"}}) {
      OMNI_CHECK(scale->device() == device && scale->scalar_type() == at::kFloat &&
                     scale->numel() == 1,
                 name, " must be one fp32 value on ", device, ", got ", scale->scalar_type(), " ",
                 scale->sizes(), " on ", scale->device());
    }
    return fp8 ? KVFormat::kStaticFP8 : KVFormat::kStaticKV8;
  }
  OMNI_CHECK(k_cache.scalar_type() == dtype && width == head_dim,
             "a cache without params or scales holds rows of q's dtype and head_dim: expected ",
             dtype, " [rows, ", head_dim, "], got ", k_cache.scalar_type(), " ", k_cache.sizes());
  return KVFormat::kDense;
}

}  // namespace omniserve
