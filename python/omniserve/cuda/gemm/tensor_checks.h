// Argument checks shared by the GEMM bindings (gemm_ops.cpp, gemm_cutlass_ops.cpp).
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

#include "common/check.h"
#include "gemm/params.h"

namespace omniserve::gemm {

inline void check_tensor(const at::Tensor& t, const char* name, at::ScalarType dtype,
                         const std::vector<int64_t>& shape, const at::Device& device) {
  OMNI_CHECK(t.device() == device, "omniserve gemm: ", name, " is on ", t.device(),
             ", expected ", device);
  OMNI_CHECK(t.scalar_type() == dtype, "omniserve gemm: ", name, " must be ", dtype, ", got ",
             t.scalar_type());
  OMNI_CHECK(t.sizes() == at::IntArrayRef(shape), "omniserve gemm: ", name,
             " must have shape ", at::IntArrayRef(shape), ", got ", t.sizes());
  OMNI_CHECK(t.is_contiguous(), "omniserve gemm: ", name, " must be contiguous");
  // The kernels read 16-byte vectors (a view at an odd storage offset would fault).
  OMNI_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, "omniserve gemm: ", name,
             " must start at a 16-byte aligned address");
}

inline const at::Tensor& require(const std::optional<at::Tensor>& t, const char* name,
                                 const char* format) {
  OMNI_CHECK(t.has_value(), "omniserve gemm: ", format, " needs ", name);
  return *t;
}

// 127 · 127 · K must stay below 2^31 for the int32 accumulators to be exact.
constexpr int64_t kMaxK = 131072;

inline Format checked_format(int64_t format) {
  OMNI_CHECK(format >= 0 && format <= 2, "omniserve gemm: unknown weight format ", format);
  return static_cast<Format>(format);
}

inline const char* format_name(Format fmt) {
  return fmt == Format::kW8A8             ? "W8A8"
         : fmt == Format::kW4A8PerChannel ? "W4A8 per-channel"
                                          : "W4A8 g128";
}

// The packed weight of an [N, K] weight (kernels/gemm.py layout) and, for g128, its group table,
// whose pointer is returned (nullptr for the other formats).
inline const uint16_t* checked_packed_weight(Format fmt, const at::Tensor& packed,
                                             const std::optional<at::Tensor>& groups, int64_t n,
                                             int64_t k, const at::Device& device) {
  OMNI_CHECK(k > 0 && k % 128 == 0 && k <= kMaxK, "omniserve gemm: K = ", k,
             " must be a positive multiple of 128 and at most ", kMaxK);
  OMNI_CHECK(n > 0 && n % 128 == 0, "omniserve gemm: N = ", n,
             " must be a positive multiple of 128");
  const bool w4 = fmt != Format::kW8A8;
  check_tensor(packed, "packed weight", w4 ? at::kByte : at::kChar, {n, w4 ? k / 2 : k}, device);
  if (fmt != Format::kW4A8G128) return nullptr;
  const at::Tensor& grp = require(groups, "group scales and zeros", format_name(fmt));
  check_tensor(grp, "group scales and zeros", at::kByte, {k / 128, n, 2}, device);
  return reinterpret_cast<const uint16_t*>(grp.data_ptr<uint8_t>());
}

// W4A8 per-channel's zero-point operands: the activations' code sums [M] and the weight's scaled
// zeros [N], as (a_sum, w_szero) pointers.
inline std::pair<const int32_t*, const __half*> checked_zero_point(
    const std::optional<at::Tensor>& a_sum, const std::optional<at::Tensor>& w_szero, int64_t m,
    int64_t n, const at::Device& device) {
  const char* fmt = format_name(Format::kW4A8PerChannel);
  const at::Tensor& sums = require(a_sum, "activation sums", fmt);
  const at::Tensor& szero = require(w_szero, "scaled zeros (s1_szeros)", fmt);
  check_tensor(sums, "activation sums", at::kInt, {m}, device);
  check_tensor(szero, "scaled zeros (s1_szeros)", at::kHalf, {n}, device);
  return {sums.data_ptr<int32_t>(), reinterpret_cast<const __half*>(szero.data_ptr<at::Half>())};
}

}  // namespace omniserve::gemm
