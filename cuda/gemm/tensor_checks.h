// Argument checks shared by the GEMM bindings (gemm_ops.cpp, gemm_cutlass_ops.cpp).
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "common/check.h"

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

}  // namespace omniserve::gemm
