// Torch binding of the large-M path: packed weight -> int8 workspace (gemm/unpack.h), then the
// CUTLASS GEMM with the format's fused epilogue (gemm/cutlass_int8.h). kernels/gemm_cutlass.py is
// the only caller; it owns the persistent workspace.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <optional>
#include <tuple>
#include <utility>

#include "gemm/cutlass_int8.h"
#include "gemm/tensor_checks.h"
#include "gemm/unpack.h"

namespace {

using omniserve::gemm::check_tensor;
using omniserve::gemm::checked_format;
using omniserve::gemm::checked_packed_weight;
using omniserve::gemm::Format;
namespace ci = omniserve::gemm::cutlass_int8;

int64_t packed_k(Format fmt, const at::Tensor& packed) {
  OMNI_CHECK(packed.dim() == 2, "omniserve gemm: packed weight must be 2-D, got ", packed.sizes());
  return fmt == Format::kW8A8 ? packed.size(1) : packed.size(1) * 2;
}

// Expands the packed weight into out (int8 [N, K], contiguous): the GEMM's operand B.
at::Tensor unpack_int8(int64_t format, const at::Tensor& packed,
                       const std::optional<at::Tensor>& groups, at::Tensor out) {
  const Format fmt = checked_format(format);
  OMNI_CHECK(packed.is_cuda(), "omniserve gemm: packed weight must be on a CUDA device, got ",
             packed.device());
  const int64_t n = packed.size(0), k = packed_k(fmt, packed);
  const uint16_t* grp = checked_packed_weight(fmt, packed, groups, n, k, packed.device());
  check_tensor(out, "unpacked weight", at::kChar, {n, k}, packed.device());
  const c10::cuda::CUDAGuard guard(packed.device());
  omniserve::gemm::launch_unpack_int8(fmt, static_cast<const uint8_t*>(packed.data_ptr()), grp,
                                      out.data_ptr<int8_t>(), static_cast<int>(n),
                                      static_cast<int>(k), at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// out_kind: gemm/params.h OutKind; the int32 accumulators are not exposed on this path.
std::pair<ci::Out, at::ScalarType> checked_out(int64_t out_kind) {
  switch (out_kind) {
    case omniserve::gemm::kOutFloat: return {ci::Out::kFloat, at::kFloat};
    case omniserve::gemm::kOutHalf: return {ci::Out::kHalf, at::kHalf};
    case omniserve::gemm::kOutBFloat16: return {ci::Out::kBFloat16, at::kBFloat16};
    default:
      OMNI_CHECK(false, "omniserve gemm: the CUTLASS path outputs float32, float16 or bfloat16 "
                 "(out kind ", out_kind, ")");
  }
  return {ci::Out::kFloat, at::kFloat};
}

// Runs the CUTLASS GEMM on `stream` with the scratch it asks for (torch's allocator; usually none).
template <ci::Out O>
cudaError_t launch(const ci::Args& p, ci::Epilogue epilogue, const at::TensorOptions& options,
                   cudaStream_t stream) {
  const size_t bytes = ci::workspace_size<O>(p, epilogue);
  const at::Tensor scratch = at::empty({static_cast<int64_t>(bytes)}, options.dtype(at::kByte));
  return ci::run<O>(p, epilogue, bytes ? scratch.data_ptr() : nullptr, bytes, stream);
}

// y [M, N] = epilogue(x_q · Wᵀ) with W expanded into `workspace` (int8, at least N·K elements).
at::Tensor gemm(int64_t format, const at::Tensor& x, const at::Tensor& a_scale,
                const std::optional<at::Tensor>& a_sum, const at::Tensor& packed,
                const std::optional<at::Tensor>& groups, const at::Tensor& w_scale,
                const std::optional<at::Tensor>& w_szero, int64_t out_kind_arg,
                const at::Tensor& workspace) {
  const Format fmt = checked_format(format);
  const auto [out_kind, out_dtype] = checked_out(out_kind_arg);
  OMNI_CHECK(x.is_cuda(), "omniserve gemm: activations must be on a CUDA device, got ",
             x.device());
  OMNI_CHECK(x.dim() == 2, "omniserve gemm: activations must be 2-D [M, K], got ", x.sizes());
  const at::Device device = x.device();
  const int64_t m = x.size(0), k = x.size(1), n = packed.size(0);
  OMNI_CHECK(packed_k(fmt, packed) == k, "omniserve gemm: activations have K = ", k,
             ", the weight ", packed_k(fmt, packed));
  OMNI_CHECK(m <= (int64_t(1) << 30), "omniserve gemm: M = ", m, " too large");
  const uint16_t* grp = checked_packed_weight(fmt, packed, groups, n, k, device);
  check_tensor(x, "x_q", at::kChar, {m, k}, device);
  check_tensor(a_scale, "activation scales", at::kHalf, {m}, device);
  check_tensor(w_scale, "weight scales", at::kHalf, {n}, device);
  OMNI_CHECK(workspace.device() == device && workspace.scalar_type() == at::kChar &&
                 workspace.is_contiguous() && workspace.numel() >= n * k,
             "omniserve gemm: the workspace must be a contiguous int8 tensor on ", device,
             " of at least ", n * k, " elements");

  ci::Args p{};
  const ci::Epilogue epilogue =
      fmt == Format::kW4A8PerChannel ? ci::Epilogue::kZero : ci::Epilogue::kScale;
  if (epilogue == ci::Epilogue::kZero) {
    std::tie(p.a_sum, p.w_szero) =
        omniserve::gemm::checked_zero_point(a_sum, w_szero, m, n, device);
  }
  at::Tensor out = at::empty({m, n}, x.options().dtype(out_dtype));
  if (m == 0) return out;

  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  int8_t* b = workspace.data_ptr<int8_t>();
  omniserve::gemm::launch_unpack_int8(fmt, static_cast<const uint8_t*>(packed.data_ptr()), grp, b,
                                      static_cast<int>(n), static_cast<int>(k), stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  p.a = x.data_ptr<int8_t>();
  p.b = b;
  p.a_scale = a_scale.data_ptr();
  p.w_scale = w_scale.data_ptr();
  p.out = out.data_ptr();
  p.m = static_cast<int>(m);
  p.n = static_cast<int>(n);
  p.k = static_cast<int>(k);

  cudaError_t status = cudaSuccess;
  switch (out_kind) {
    case ci::Out::kFloat: status = launch<ci::Out::kFloat>(p, epilogue, x.options(), stream); break;
    case ci::Out::kHalf: status = launch<ci::Out::kHalf>(p, epilogue, x.options(), stream); break;
    case ci::Out::kBFloat16:
      status = launch<ci::Out::kBFloat16>(p, epilogue, x.options(), stream);
      break;
  }
  OMNI_CHECK(status == cudaSuccess, "omniserve gemm: the CUTLASS kernel failed to launch: ",
             cudaGetErrorString(status));
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("unpack_int8", &unpack_int8, "Packed weight tiles -> int8 [N, K] (the GEMM's operand B)",
        py::arg("format"), py::arg("packed"), py::arg("groups"), py::arg("out"));
  m.def("gemm", &gemm, "Large-M quantized GEMM: unpack into the workspace, then CUTLASS",
        py::arg("format"), py::arg("x"), py::arg("a_scale"), py::arg("a_sum"), py::arg("packed"),
        py::arg("groups"), py::arg("w_scale"), py::arg("w_szero"), py::arg("out_kind"),
        py::arg("workspace"));
}
