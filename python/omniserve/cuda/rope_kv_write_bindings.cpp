// Python bindings of the fused RoPE + KV cache write (rope_kv_write.cu).
#include <torch/extension.h>

#include <optional>
#include <vector>

namespace omniserve {
std::vector<at::Tensor> rope_kv_write(const at::Tensor& q, const at::Tensor& k,
                                      const at::Tensor& v, const at::Tensor& cos,
                                      const at::Tensor& sin, const at::Tensor& write_index,
                                      const at::Tensor& k_cache, const at::Tensor& v_cache,
                                      const std::optional<at::Tensor>& k_params,
                                      const std::optional<at::Tensor>& v_params,
                                      const std::optional<at::Tensor>& k_scale,
                                      const std::optional<at::Tensor>& v_scale,
                                      const std::optional<at::Tensor>& stats,
                                      const std::optional<at::Tensor>& stat_heads,
                                      int64_t logical_tokens);
}  // namespace omniserve

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rope_kv_write", &omniserve::rope_kv_write,
        "RoPE on q and k, then k and v written to one layer's KV cache rows (dense, KV8/KV4 with "
        "per-row k_params/v_params, or static KV8 with per-tensor k_scale/v_scale); returns "
        "(q_rot, k, v as cache reads return them); optionally folds the keys into the key "
        "statistics of page selection (decode steps). See rope_kv_write.cu",
        pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("cos"),
        pybind11::arg("sin"), pybind11::arg("write_index"), pybind11::arg("k_cache"),
        pybind11::arg("v_cache"), pybind11::arg("k_params"), pybind11::arg("v_params"),
        pybind11::arg("k_scale"), pybind11::arg("v_scale"),
        pybind11::arg("stats") = pybind11::none(),
        pybind11::arg("stat_heads") = pybind11::none(), pybind11::arg("logical_tokens") = 0);
}
