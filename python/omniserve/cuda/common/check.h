// OMNI_CHECK(cond, parts...): TORCH_CHECK with a message built without iostreams.
//
// TORCH_CHECK streams its message parts through std::ostringstream. On the H100 image we run on
// (torch 2.11, CUDA 13), streaming an integer from an extension kills the process with SIGSEGV,
// while strings stream fine (scratch experiment, 2026-11-27: TORCH_CHECK(false, "v ", 5) crashes
// from a g++ or an nvcc translation unit alike; TORCH_CHECK(false, "v ", "x") raises). So every
// binding formats its messages here: integers through std::to_string, shapes as "[a, b]", dtypes
// and devices by their names, and TORCH_CHECK receives one C string (its no-stream overload).
#pragma once

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <string>
#include <type_traits>

namespace omniserve::check_detail {

inline void append(std::string& out, const char* part) { out += part; }
inline void append(std::string& out, const std::string& part) { out += part; }
inline void append(std::string& out, c10::ScalarType dtype) { out += c10::toString(dtype); }
inline void append(std::string& out, const c10::Device& device) { out += device.str(); }

inline void append(std::string& out, c10::IntArrayRef shape) {
  out += '[';
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i > 0) out += ", ";
    out += std::to_string(shape[i]);
  }
  out += ']';
}

template <typename T, std::enable_if_t<std::is_arithmetic_v<T>, int> = 0>
void append(std::string& out, T value) {
  if constexpr (std::is_same_v<T, bool>) {
    out += value ? "true" : "false";
  } else {
    out += std::to_string(value);
  }
}

template <typename... Parts>
std::string message(const Parts&... parts) {
  std::string out;
  (append(out, parts), ...);
  return out;
}

}  // namespace omniserve::check_detail

// The message is built only when the check fails (TORCH_CHECK evaluates it lazily).
#define OMNI_CHECK(cond, ...) \
  TORCH_CHECK(cond, ::omniserve::check_detail::message(__VA_ARGS__).c_str())
