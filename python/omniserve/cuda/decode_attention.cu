// Host side of the paged decode attention: checks every operand, sizes the split-K launch and
// dispatches to the per-format instantiations
// (decode_attention_{kv16,kv8,kv4,kv8_static,fp8_static}.cu).
// The kernels and their design are in common/decode_attention.cuh.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <optional>
#include <type_traits>

#include "common/check.h"
#include "common/decode_attention.cuh"
#include "common/kv_operands.h"

namespace omniserve {
namespace decode {
#define OMNISERVE_DECLARE_FORMAT(T, F)                                                           \
  extern template void launch_format<T, KVFormat::F>(const DecodeParams&, int, int, int, int, \
                                                     size_t, cudaStream_t);
OMNISERVE_DECLARE_FORMAT(__half, kDense)
OMNISERVE_DECLARE_FORMAT(__half, kKV8)
OMNISERVE_DECLARE_FORMAT(__half, kKV4)
OMNISERVE_DECLARE_FORMAT(__half, kStaticKV8)
OMNISERVE_DECLARE_FORMAT(__half, kStaticFP8)
OMNISERVE_DECLARE_FORMAT(__nv_bfloat16, kDense)
OMNISERVE_DECLARE_FORMAT(__nv_bfloat16, kKV8)
OMNISERVE_DECLARE_FORMAT(__nv_bfloat16, kKV4)
OMNISERVE_DECLARE_FORMAT(__nv_bfloat16, kStaticKV8)
OMNISERVE_DECLARE_FORMAT(__nv_bfloat16, kStaticFP8)
#undef OMNISERVE_DECLARE_FORMAT
}  // namespace decode

namespace {

void check_vector(const at::Tensor& t, const char* name, at::ScalarType dtype,
                  const char* dtype_name, int64_t size, const at::Device& device) {
  OMNI_CHECK(t.device() == device, name, " must be on ", device, ", got ", t.device());
  OMNI_CHECK(t.scalar_type() == dtype, name, " must be ", dtype_name, ", got ", t.scalar_type());
  OMNI_CHECK(t.dim() == 1 && t.size(0) == size && t.stride(0) == 1, name,
             " must be a contiguous vector of ", size, " entries, got shape ", t.sizes());
}

void check_int32_table(const at::Tensor& t, const char* name, const at::Device& device) {
  OMNI_CHECK(t.device() == device && t.scalar_type() == at::kInt && t.dim() == 2 &&
                 t.stride(1) == 1,
             name, " must be int32 [requests, pages] on ", device, " with contiguous rows, got ",
             t.scalar_type(), " ", t.sizes(), " on ", t.device());
}

}  // namespace

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
                            const std::optional<at::Tensor>& sel_tail) {
  OMNI_CHECK(q.is_cuda(), "q must be a CUDA tensor, got device ", q.device());
  const at::Device device = q.device();
  OMNI_CHECK(q.dim() == 3, "q must be [batch, q_heads, head_dim], got shape ", q.sizes());
  const int64_t batch = q.size(0), q_heads = q.size(1), head_dim = q.size(2);
  OMNI_CHECK(q.stride(2) == 1 && q.stride(1) % 8 == 0 && q.stride(0) % 8 == 0 &&
                 is_aligned16(q.data_ptr()),
             "q must be contiguous in head_dim with 16-byte aligned heads");
  OMNI_CHECK(num_kv_heads > 0 && q_heads % num_kv_heads == 0, "q_heads (", q_heads,
             ") must be a multiple of num_kv_heads (", num_kv_heads, ")");
  OMNI_CHECK(page_size > 0, "page_size must be positive, got ", page_size);
  OMNI_CHECK(window >= 0, "window must be >= 0 (0: none), got ", window);
  OMNI_CHECK(max_context_len >= 0, "max_context_len must be >= 0");

  const KVFormat format = check_kv_operands(k_cache, v_cache, k_params, v_params, k_scale,
                                            v_scale, head_dim, q.scalar_type(), device);
  const int64_t rows = k_cache.size(0);
  OMNI_CHECK(rows < (int64_t{1} << 32), "too many cache rows for 32-bit row indices");
  check_int32_table(page_table, "page_table", device);
  check_vector(seq_rows, "seq_rows", at::kInt, "int32", batch, device);
  check_vector(context_lens, "context_lens", at::kInt, "int32", batch, device);
  const bool streaming = is_stream.has_value();
  OMNI_CHECK(streaming == stream_table.has_value() && streaming == stream_context_lens.has_value(),
             "pass all of is_stream, stream_table and stream_context_lens or none");
  const bool selected = sel_columns.has_value();
  OMNI_CHECK(selected == sel_count.has_value() && selected == sel_tail.has_value(),
             "pass all of sel_columns, sel_count and sel_tail or none");
  OMNI_CHECK(head_base.has_value() || !(streaming || selected),
             "streaming heads and page selections need head_base");
  if (head_base.has_value()) {
    // Base rows are the caller's (not checked against `rows`: that would need their values).
    check_vector(*head_base, "head_base", at::kLong, "int64", num_kv_heads, device);
  } else {
    OMNI_CHECK(rows % num_kv_heads == 0, "cache rows (", rows,
               ") must be a multiple of num_kv_heads");
  }
  if (streaming) {
    check_vector(*is_stream, "is_stream", at::kBool, "bool", num_kv_heads, device);
    check_int32_table(*stream_table, "stream_table", device);
    OMNI_CHECK(stream_table->size(0) == batch, "stream_table must have a row per request (",
               batch, "), got ", stream_table->size(0));
    check_vector(*stream_context_lens, "stream_context_lens", at::kInt, "int32", batch, device);
  }
  if (selected) {
    // A selected view has no window: its virtual positions are not the request's positions.
    OMNI_CHECK(window == 0, "page selection and a sliding window do not combine, got window ",
               window);
    const at::Tensor& c = *sel_columns;
    OMNI_CHECK(c.device() == device && c.scalar_type() == at::kInt && c.dim() == 3 &&
                   c.size(0) >= page_table.size(0) && c.size(1) == num_kv_heads &&
                   c.size(2) >= 1 && c.stride(2) == 1 && c.stride(1) == c.size(2),
               "sel_columns must be int32 [rows >= ", page_table.size(0), ", ", num_kv_heads,
               ", k >= 1] on ", device, ", contiguous but for its rows, got ", c.scalar_type(),
               " ", c.sizes(), " with strides ", c.strides(), " on ", c.device());
    check_vector(*sel_count, "sel_count", at::kInt, "int32", batch, device);
    check_vector(*sel_tail, "sel_tail", at::kInt, "int32", batch, device);
  }

  // The three-phase kernel keeps a partition's scores in shared memory; KV4 streams its tiles.
  const bool kv4 = format == KVFormat::kKV4;
  const int64_t max_partition = kv4 ? 16384 : 2048;
  OMNI_CHECK(partition > 0 && partition % 32 == 0 && partition <= max_partition,
             "partition must be a multiple of 32 in [32, ", max_partition, "], got ", partition);
  OMNI_CHECK(!kv4 || page_size % decode::kTileTokens == 0,
             "a KV4 cache needs pages of a multiple of ", decode::kTileTokens, " tokens, got ",
             page_size);
  OMNI_CHECK(batch <= 65535 && num_kv_heads <= 65535, "at most 65535 requests and KV heads");
  auto out = at::empty_like(q);
  if (batch == 0) return out;
  // Splits start at a tile boundary (decode::split_range): a window adds up to a tile's worth.
  // Streaming heads ignore the window, but their table's width bounds their contexts.
  int64_t visible = window > 0 ? std::min(max_context_len, window) + decode::kTileTokens - 1
                               : max_context_len;
  if (streaming) {
    visible = std::max(visible, std::min(max_context_len, stream_table->size(1) * page_size));
  }
  const int64_t num_splits = std::max<int64_t>(1, (visible + partition - 1) / partition);
  OMNI_CHECK(num_splits <= 65535, "context too long for the partition size");
  const int group = static_cast<int>(q_heads / num_kv_heads);

  at::Tensor partial_out, partial_stats;
  decode::DecodeParams p{};
  if (num_splits > 1) {
    partial_out = at::empty({batch, q_heads, num_splits, head_dim}, q.options().dtype(at::kFloat));
    partial_stats = at::empty({batch, q_heads, num_splits, 2}, q.options().dtype(at::kFloat));
    p.partial_out = partial_out.data_ptr<float>();
    p.partial_stats = reinterpret_cast<float2*>(partial_stats.data_ptr<float>());
  }
  p.q = q.data_ptr();
  p.k = static_cast<const uint8_t*>(k_cache.data_ptr());
  p.v = static_cast<const uint8_t*>(v_cache.data_ptr());
  if (k_params.has_value()) {
    p.k_params = reinterpret_cast<const __half2*>(k_params->data_ptr());
    p.v_params = reinterpret_cast<const __half2*>(v_params->data_ptr());
  }
  if (k_scale.has_value()) {
    p.k_scale = k_scale->data_ptr<float>();
    p.v_scale = v_scale->data_ptr<float>();
  }
  p.page_table = page_table.data_ptr<int32_t>();
  p.seq_rows = seq_rows.data_ptr<int32_t>();
  p.context_lens = context_lens.data_ptr<int32_t>();
  if (head_base.has_value()) p.head_base = head_base->data_ptr<int64_t>();
  if (streaming) {
    p.is_stream = is_stream->data_ptr<bool>();
    p.stream_table = stream_table->data_ptr<int32_t>();
    p.stream_table_stride = static_cast<int>(stream_table->stride(0));
    p.stream_context_lens = stream_context_lens->data_ptr<int32_t>();
  }
  if (selected) {
    p.sel_columns = sel_columns->data_ptr<int32_t>();
    p.sel_count = sel_count->data_ptr<int32_t>();
    p.sel_tail = sel_tail->data_ptr<int32_t>();
    p.sel_row_stride = sel_columns->stride(0);
    p.sel_k = static_cast<int>(sel_columns->size(2));
  }
  p.out = out.data_ptr();
  p.q_stride_b = q.stride(0);
  p.q_stride_h = q.stride(1);
  p.out_stride_b = out.stride(0);
  p.out_stride_h = out.stride(1);
  p.page_table_stride = static_cast<int>(page_table.stride(0));
  p.page_size = static_cast<int>(page_size);
  p.num_slots = static_cast<uint32_t>(rows / num_kv_heads);
  p.num_q_heads = static_cast<int>(q_heads);
  p.window = static_cast<int>(window);
  p.partition = static_cast<int>(partition);
  p.num_splits = static_cast<int>(num_splits);
  p.scale_log2 = static_cast<float>(scale) * decode::kLog2e;

  // Dynamic shared memory: the KV4 kernel's cache row per tile; the other's row per token and
  // scores (or, later, per-warp outputs).
  const size_t scores = std::max<size_t>(group * partition, decode::kWarps * group * head_dim);
  const size_t smem = kv4 ? partition / decode::kTileTokens * sizeof(uint32_t)
                          : partition * sizeof(uint32_t) + scores * sizeof(float);
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream(device.index());
  OMNISERVE_DISPATCH_FLOAT16(q.scalar_type(), "decode_attention q", [&] {
    const auto run = [&](auto format_constant) {
      decode::launch_format<scalar_t, decltype(format_constant)::value>(
          p, head_dim, group, batch, num_kv_heads, smem, stream);
    };
    switch (format) {
      case KVFormat::kDense: return run(std::integral_constant<KVFormat, KVFormat::kDense>());
      case KVFormat::kKV8: return run(std::integral_constant<KVFormat, KVFormat::kKV8>());
      case KVFormat::kKV4: return run(std::integral_constant<KVFormat, KVFormat::kKV4>());
      case KVFormat::kStaticKV8:
        return run(std::integral_constant<KVFormat, KVFormat::kStaticKV8>());
      case KVFormat::kStaticFP8:
        return run(std::integral_constant<KVFormat, KVFormat::kStaticFP8>());
    }
  });
  return out;
}

}  // namespace omniserve
