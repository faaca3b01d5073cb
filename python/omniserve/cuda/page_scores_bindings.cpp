// Python bindings of the page scores of query-aware page selection (page_scores.cu).
#include <torch/extension.h>

namespace omniserve {
void page_scores(const at::Tensor& q, const at::Tensor& stats, const at::Tensor& head_base,
                 const at::Tensor& select_kv, const at::Tensor& select_q0,
                 const at::Tensor& page_table, const at::Tensor& seq_rows,
                 const at::Tensor& candidates, const at::Tensor& out, int64_t group,
                 int64_t page_size, int64_t logical_tokens);
}  // namespace omniserve

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("page_scores", &omniserve::page_scores,
        "Scores of each request's page-table columns for each selecting head, from the key "
        "statistics, into out (fp32 [requests, heads, columns]); see page_scores.cu",
        pybind11::arg("q"), pybind11::arg("stats"), pybind11::arg("head_base"),
        pybind11::arg("select_kv"), pybind11::arg("select_q0"), pybind11::arg("page_table"),
        pybind11::arg("seq_rows"), pybind11::arg("candidates"), pybind11::arg("out"),
        pybind11::arg("group"), pybind11::arg("page_size"), pybind11::arg("logical_tokens"));
}
