// Torch binding of the quantized GEMMs (gemm/params.h): checks every tensor, then launches on the
// current stream. python/omniserve/kernels/gemm.py is the only caller and documents the layouts.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <limits>
#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/check.h"
#include "gemm/params.h"
#include "gemm/tensor_checks.h"

namespace {

using omniserve::gemm::check_tensor;
using omniserve::gemm::Format;
using omniserve::gemm::GemmParams;
using omniserve::gemm::Path;

// Calls fn with std::integral_constant<Format, F> for the format `fmt` names.
template <typename Fn>
decltype(auto) with_format(Format fmt, Fn&& fn) {
  switch (fmt) {
    case Format::kW8A8: return fn(std::integral_constant<Format, Format::kW8A8>());
    case Format::kW4A8PerChannel:
      return fn(std::integral_constant<Format, Format::kW4A8PerChannel>());
    case Format::kW4A8G128: return fn(std::integral_constant<Format, Format::kW4A8G128>());
  }
  throw std::invalid_argument("omniserve gemm: unknown format");
}

// Whether (tokens, split) is one of the tensor-core kernel's tiles (gemm/params.h `Tile`).
bool is_tile(int64_t tokens, int64_t split) {
  return (tokens == 64 || tokens == 128 || tokens == 256) && split >= 1 &&
         split <= omniserve::gemm::kMaxSplit;
}

at::ScalarType out_dtype(int64_t out_kind) {
  switch (out_kind) {
    case omniserve::gemm::kOutInt32: return at::kInt;
    case omniserve::gemm::kOutFloat: return at::kFloat;
    case omniserve::gemm::kOutHalf: return at::kHalf;
    case omniserve::gemm::kOutBFloat16: return at::kBFloat16;
    default: OMNI_CHECK(false, "omniserve gemm: unknown output kind ", out_kind);
  }
}

// y [M, N] = epilogue(x_q · Wᵀ); out_kind kOutInt32 returns the raw int32 accumulators.
at::Tensor gemm(int64_t format, const at::Tensor& x, const at::Tensor& a_scale,
                const std::optional<at::Tensor>& a_sum, const at::Tensor& weight,
                const std::optional<at::Tensor>& groups, const at::Tensor& w_scale,
                const std::optional<at::Tensor>& w_szero, int64_t out_kind, int64_t path,
                int64_t tile_tokens, int64_t tile_split) {
  const Format fmt = omniserve::gemm::checked_format(format);
  OMNI_CHECK(path >= 0 && path <= 2, "omniserve gemm: unknown kernel path ", path);
  const bool auto_tile = tile_tokens == 0 && tile_split == 0;
  OMNI_CHECK(auto_tile || (static_cast<Path>(path) == Path::kTensorCore &&
                           is_tile(tile_tokens, tile_split)),
             "omniserve gemm: a tile is 64, 128 or 256 tokens with a K split of 1 to ",
             omniserve::gemm::kMaxSplit, ", for the tensor-core path; got ", tile_tokens, " x ",
             tile_split, " for path ", path);
  const omniserve::gemm::Tile tile{static_cast<int>(tile_tokens), static_cast<int>(tile_split)};

  OMNI_CHECK(x.is_cuda(), "omniserve gemm: activations must be on a CUDA device, got ",
             x.device());
  OMNI_CHECK(x.dim() == 2, "omniserve gemm: activations must be 2-D [M, K], got ", x.sizes());
  OMNI_CHECK(weight.dim() == 2, "omniserve gemm: weight must be 2-D, got ", weight.sizes());
  const int64_t m = x.size(0), k = x.size(1), n = weight.size(0);
  OMNI_CHECK(m <= std::numeric_limits<int>::max() / 2, "omniserve gemm: M = ", m, " too large");
  OMNI_CHECK(static_cast<Path>(path) != Path::kSmallM || m <= omniserve::gemm::kSmallMMax,
             "omniserve gemm: the small-M kernel takes M <= ", omniserve::gemm::kSmallMMax,
             ", got ", m);
  const at::Device device = x.device();
  GemmParams p{};
  p.groups = omniserve::gemm::checked_packed_weight(fmt, weight, groups, n, k, device);
  check_tensor(x, "x_q", at::kChar, {m, k}, device);
  check_tensor(a_scale, "activation scales", at::kHalf, {m}, device);
  check_tensor(w_scale, "weight scales", at::kHalf, {n}, device);
  if (fmt == Format::kW4A8PerChannel) {
    std::tie(p.a_sum, p.w_szero) =
        omniserve::gemm::checked_zero_point(a_sum, w_szero, m, n, device);
  }

  at::Tensor out = at::empty({m, n}, x.options().dtype(out_dtype(out_kind)));
  if (m == 0) return out;
  p.a = x.data_ptr<int8_t>();
  p.b = static_cast<const uint8_t*>(weight.data_ptr());
  p.w_scale = reinterpret_cast<const __half*>(w_scale.data_ptr<at::Half>());
  p.a_scale = reinterpret_cast<const __half*>(a_scale.data_ptr<at::Half>());
  p.out = out.data_ptr();
  p.m = static_cast<int>(m);
  p.n = static_cast<int>(n);
  p.k = static_cast<int>(k);

  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  with_format(fmt, [&](auto f) {
    constexpr Format kFormat = decltype(f)::value;
    omniserve::gemm::launch_gemm<kFormat>(p, out_kind, static_cast<Path>(path), tile, stream);
  });
  return out;
}

// (tokens, split) of the tile the automatic path runs for an [M, K] x [K, N] GEMM on the current
// device; (0, 0): the small-M kernel. For benchmarks, which label the automatic rows with it.
std::tuple<int64_t, int64_t> auto_tile(int64_t format, int64_t m, int64_t n, int64_t k,
                                       int64_t out_kind) {
  const Format fmt = omniserve::gemm::checked_format(format);
  OMNI_CHECK(m > 0 && m <= std::numeric_limits<int>::max() / 2 && n > 0 &&
                 n % omniserve::gemm::kBlockN == 0 && k > 0 && k % omniserve::gemm::kBlockK == 0,
             "omniserve gemm: no tile for M = ", m, ", N = ", n, ", K = ", k);
  out_dtype(out_kind);  // checks the kind
  GemmParams p{};
  p.m = static_cast<int>(m);
  p.n = static_cast<int>(n);
  p.k = static_cast<int>(k);
  const omniserve::gemm::Tile tile = with_format(fmt, [&](auto f) {
    constexpr Format kFormat = decltype(f)::value;
    return omniserve::gemm::auto_tile<kFormat>(p, static_cast<int>(out_kind));
  });
  return {tile.tokens, tile.split};
}

// Clusters of `split` blocks of the `tile_tokens`-token tensor-core kernel the current device
// holds at once (the cost model's waves), for the benchmark that refits the model.
int64_t resident_clusters(int64_t format, int64_t tile_tokens, int64_t tile_split,
                          int64_t out_kind) {
  const Format fmt = omniserve::gemm::checked_format(format);
  OMNI_CHECK(is_tile(tile_tokens, tile_split),
             "omniserve gemm: a tile is 64, 128 or 256 tokens with a K split of 1 to ",
             omniserve::gemm::kMaxSplit, "; got ", tile_tokens, " x ", tile_split);
  out_dtype(out_kind);  // checks the kind
  const int tokens = static_cast<int>(tile_tokens), split = static_cast<int>(tile_split);
  return with_format(fmt, [&](auto f) {
    constexpr Format kFormat = decltype(f)::value;
    return omniserve::gemm::resident_clusters<kFormat>(tokens, split, static_cast<int>(out_kind));
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemm", &gemm, "Quantized GEMM (W8A8, W4A8 per-channel, W4A8 g128) on packed weights",
        py::arg("format"), py::arg("x"), py::arg("a_scale"), py::arg("a_sum"), py::arg("weight"),
        py::arg("groups"), py::arg("w_scale"), py::arg("w_szero"), py::arg("out_kind"),
        py::arg("path"), py::arg("tile_tokens"), py::arg("tile_split"));
  m.def("auto_tile", &auto_tile, "The tensor-core tile the automatic path runs for a shape",
        py::arg("format"), py::arg("m"), py::arg("n"), py::arg("k"), py::arg("out_kind"));
  m.def("resident_clusters", &resident_clusters,
        "Clusters of a tensor-core tile the current device holds at once", py::arg("format"),
        py::arg("tile_tokens"), py::arg("tile_split"), py::arg("out_kind"));
}
