// Python bindings of the paged decode attention (decode_attention.cu).
#include <torch/extension.h>

#include <optional>

namespace omniserve {
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache,
                            const at::Tensor& v_cache, const std::optional<at::Tensor>& k_params,
                            const std::optional<at::Tensor>& v_params,
                            const std::optional<at::Tensor>& k_scale,
                            const std::optional<at::Tensor>& v_scale,
                            const at::Tensor& page_table, const at::Tensor& seq_rows,
                            const at::Tensor& context_lens, int64_t page_size,
                            int64_t num_kv_heads, int64_t max_context_len, int64_t window,
                            double scale, int64_t partition,
                            const std::optional<at::Tensor>& head_base,
                            const std::optional<at::Tensor>& is_stream,
                            const std::optional<at::Tensor>& stream_table,
                            const std::optional<at::Tensor>& stream_context_lens,
                            const std::optional<at::Tensor>& sel_columns,
                            const std::optional<at::Tensor>& sel_count,
                            const std::optional<at::Tensor>& sel_tail);
}  // namespace omniserve

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &omniserve::decode_attention,
        "Paged decode attention over dense, KV8, KV4 or static KV8 cache rows, optionally with "
        "streaming heads and selected pages; see decode_attention.cu",
        pybind11::arg("q"), pybind11::arg("k_cache"), pybind11::arg("v_cache"),
        pybind11::arg("k_params"), pybind11::arg("v_params"), pybind11::arg("k_scale"),
        pybind11::arg("v_scale"), pybind11::arg("page_table"), pybind11::arg("seq_rows"),
        pybind11::arg("context_lens"), pybind11::arg("page_size"),
        pybind11::arg("num_kv_heads"), pybind11::arg("max_context_len"), pybind11::arg("window"),
        pybind11::arg("scale"), pybind11::arg("partition"),
        pybind11::arg("head_base") = pybind11::none(),
        pybind11::arg("is_stream") = pybind11::none(),
        pybind11::arg("stream_table") = pybind11::none(),
        pybind11::arg("stream_context_lens") = pybind11::none(),
        pybind11::arg("sel_columns") = pybind11::none(),
        pybind11::arg("sel_count") = pybind11::none(),
        pybind11::arg("sel_tail") = pybind11::none());
}
