// Page scores of query-aware page selection (LServe's dynamic sparsity), the CUDA version of
// python/omniserve/formats/page_selection.page_scores, whose module is the contract: for request
// b, selecting head s (KV head select_kv[s], query heads select_q0[s] + [0, Group)) and
// page-table column c < candidates[b], with page = page_table[seq_rows[b], c],
//   out[b, s, c] = max over the page's L logical pages l and the Group query heads g of
//                  Σ_ch max(q_g[ch] · kmin_l[ch], q_g[ch] · kmax_l[ch])   (fp32)
// where (kmin_l, kmax_l) is stat row (head_base[kv] + page · page_size) / logical_tokens + l;
// columns from candidates[b] on (to P) score -inf.
//
// Memory bound: a score reads L · 4 · head_dim bytes of statistics for 2 · Group FMAs per
// channel and logical page. Block (selecting head, column range, request) of kWarps warps; its
// query heads' channels stay in registers for all its columns. A warp scores kColumns columns at
// a time: a group of head_dim / 8 lanes per logical page, each lane holding 8 channels (one
// 16-byte load of kmin, one of kmax), so one pass reads 32 / (head_dim / 8) logical pages of each
// column, the loads of all kColumns columns in flight before any is used. Selecting heads are the
// grid's fastest dimension: heads that share a KV head (per-query-head selection) read the same
// statistics at about the same time, mostly from L2.
//
// Per channel, with kmin <= kmax (update_key_stats keeps them so),
//   max(q kmin, q kmax) = (q / 2)(kmax + kmin) + |q / 2|(kmax − kmin),
// two FMAs per query head (FFMA takes |x| as an operand modifier) after two adds shared by the
// group: fewer instructions than two products and a max, or a select on q's sign, per head.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "common/check.h"
#include "common/dtype.cuh"
#include "common/reduce.cuh"

namespace omniserve {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kVals = 8;  // channels per lane: one 16-byte load of 16-bit values
constexpr int kBlocksPerSm = 8;
constexpr int kMaxRoundsPerBlock = 8;

template <int HeadDim, int Group>
struct ScoreConfig {
  static constexpr int kLanesPerStat = HeadDim / kVals;  // lanes of one logical page
  static constexpr int kSlots = 32 / kLanesPerStat;      // logical pages per warp pass
  // Columns whose loads a warp has in flight: 2 KB per lane group at head_dim 128. Fewer with 8
  // query heads, whose channels take 64 registers.
  static constexpr int kColumns = Group >= 8 ? 2 : 4;
  static constexpr int kColumnsPerRound = kWarps * kColumns;  // a block's columns per round
};

struct ScoreParams {
  const void* q;  // [g, Hq, D]
  int64_t q_stride_b, q_stride_h;
  const void* stats;  // [stat rows + 1, 2 (min, max), D]
  const int64_t* head_base;
  const int64_t* select_kv;
  const int64_t* select_q0;
  const int32_t* page_table;
  int64_t page_table_stride;
  const int32_t* seq_rows;
  const int32_t* candidates;
  float* out;  // [g, S, P]
  int64_t out_stride_b, out_stride_s;
  int num_columns;  // P
  int logical_tokens;
  int logical_per_page;   // L
  int columns_per_block;  // a multiple of ScoreConfig::kColumnsPerRound
};

// Sums each of v[0, N) over the `Width` lanes of every aligned group of Width lanes (N <= Width,
// both powers of two) and leaves each lane one of the N sums. While more than one value is left,
// a step keeps half of them in each lane (which half depends on the lane), adds the partner's
// copies of those and sends it the other half: N − 1 shuffles where N separate butterflies
// would take N log2(Width); a plain butterfly finishes once one value is left.
template <int Width, int N>
__device__ __forceinline__ float transposed_sum(const float (&v)[N], int lane) {
  static_assert(N <= Width && (N & (N - 1)) == 0 && (Width & (Width - 1)) == 0, "powers of two");
  if constexpr (N == 1) {
    return warp_reduce<Width>(v[0], SumOp<float>());
  } else {
    constexpr int kHalf = N / 2, kOffset = Width / 2;
    const bool upper = lane & kOffset;
    float kept[kHalf];
#pragma unroll
    for (int i = 0; i < kHalf; ++i) {
      const float mine = upper ? v[kHalf + i] : v[i];
      const float theirs = upper ? v[i] : v[kHalf + i];
      kept[i] = mine + __shfl_xor_sync(0xffffffffu, theirs, kOffset);
    }
    return transposed_sum<kOffset, kHalf>(kept, lane);
  }
}

template <typename T, int HeadDim, int Group>
__global__ void __launch_bounds__(kThreads) page_scores_kernel(const ScoreParams p) {
  using Cfg = ScoreConfig<HeadDim, Group>;
  using Tr = Float16Traits<T>;
  constexpr int kColumns = Cfg::kColumns, kLanes = Cfg::kLanesPerStat;
  const int s = blockIdx.x, b = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int slot = lane / kLanes, c0 = lane % kLanes * kVals;
  const int begin = blockIdx.y * p.columns_per_block;
  const int end = min(begin + p.columns_per_block, p.num_columns);
  const int scored = max(begin, min(p.candidates[b], end));  // [begin, scored) score, then -inf
  float* out = p.out + b * p.out_stride_b + s * p.out_stride_s;
  for (int c = scored + threadIdx.x; c < end; c += kThreads) out[c] = -INFINITY;
  if (scored == begin) return;

  // This lane's channels of the group's queries, halved (exact): see the file comment.
  float qh[Group][kVals];
  const T* q = static_cast<const T*>(p.q) + b * p.q_stride_b + p.select_q0[s] * p.q_stride_h + c0;
#pragma unroll
  for (int g = 0; g < Group; ++g) {
    const Vec8<T> x = *reinterpret_cast<const Vec8<T>*>(q + g * p.q_stride_h);
#pragma unroll
    for (int i = 0; i < kVals; ++i) qh[g][i] = 0.5f * Tr::to_float(x.v[i]);
  }
  // Stat row of a page's logical page 0: head_base[kv] / logical_tokens + page · L (every head's
  // base row is a multiple of page_size).
  const int64_t base_row = p.head_base[p.select_kv[s]] / p.logical_tokens;
  const int32_t* pages = p.page_table + p.seq_rows[b] * p.page_table_stride;
  const T* stats = static_cast<const T*>(p.stats) + c0;
  const int L = p.logical_per_page;

  for (int first = begin + warp * kColumns; first < scored; first += Cfg::kColumnsPerRound) {
    // Columns past `scored` in the last round redo column scored - 1; they are not stored.
    const T* page_stats[kColumns];
#pragma unroll
    for (int u = 0; u < kColumns; ++u) {
      const int64_t page = pages[min(first + u, scored - 1)];
      page_stats[u] = stats + (base_row + page * L) * (2 * HeadDim);
    }
    float best[kColumns];
#pragma unroll
    for (int u = 0; u < kColumns; ++u) best[u] = -INFINITY;
    for (int l0 = 0; l0 < L; l0 += Cfg::kSlots) {
      // Slots past the last logical page reread it: the max over logical pages is unchanged.
      const int64_t offset = min(l0 + slot, L - 1) * (2 * HeadDim);
      Vec8<T> lo[kColumns], hi[kColumns];
#pragma unroll
      for (int u = 0; u < kColumns; ++u) {
        lo[u] = *reinterpret_cast<const Vec8<T>*>(page_stats[u] + offset);
        hi[u] = *reinterpret_cast<const Vec8<T>*>(page_stats[u] + offset + HeadDim);
      }
#pragma unroll
      for (int u = 0; u < kColumns; ++u) {
        float sum[kVals], diff[kVals];
#pragma unroll
        for (int i = 0; i < kVals; ++i) {
          const float kmin = Tr::to_float(lo[u].v[i]), kmax = Tr::to_float(hi[u].v[i]);
          sum[i] = kmax + kmin;
          diff[i] = kmax - kmin;
        }
        float bound[Group];
#pragma unroll
        for (int g = 0; g < Group; ++g) {
          bound[g] = 0.f;
#pragma unroll
          for (int i = 0; i < kVals; ++i) {
            bound[g] = fmaf(qh[g][i], sum[i], fmaf(fabsf(qh[g][i]), diff[i], bound[g]));
          }
        }
        // One of the group's bounds of this logical page per lane; every one is in some lane.
        best[u] = fmaxf(best[u], transposed_sum<kLanes, Group>(bound, lane));
      }
    }
#pragma unroll
    for (int u = 0; u < kColumns; ++u) {
      best[u] = warp_reduce<32>(best[u], MaxOp());  // over logical pages and query heads
      if (lane == 0 && first + u < scored) out[first + u] = best[u];
    }
  }
}

// Columns per block: whole rounds, as few blocks as still fill the GPU (kBlocksPerSm per SM), so
// that a block loads its queries once for as many columns as it can.
int columns_per_block(int64_t columns, int64_t heads, int64_t batch, int round) {
  const int64_t rounds = (columns + round - 1) / round;
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t per_block = rounds * heads * batch / (kBlocksPerSm * sms);
  return static_cast<int>(std::clamp<int64_t>(per_block, 1, kMaxRoundsPerBlock)) * round;
}

void check_vector(const at::Tensor& t, const char* name, at::ScalarType dtype,
                  const char* dtype_name, const at::Device& device) {
  OMNI_CHECK(t.device() == device && t.scalar_type() == dtype && t.dim() == 1 && t.stride(0) == 1,
             name, " must be a contiguous ", dtype_name, " vector on ", device, ", got ",
             t.scalar_type(), " ", t.sizes(), " with strides ", t.strides(), " on ", t.device());
}

}  // namespace

void page_scores(const at::Tensor& q, const at::Tensor& stats, const at::Tensor& head_base,
                 const at::Tensor& select_kv, const at::Tensor& select_q0,
                 const at::Tensor& page_table, const at::Tensor& seq_rows,
                 const at::Tensor& candidates, const at::Tensor& out, int64_t group,
                 int64_t page_size, int64_t logical_tokens) {
  OMNI_CHECK(q.is_cuda(), "q must be a CUDA tensor, got device ", q.device());
  const at::Device device = q.device();
  OMNI_CHECK(q.dim() == 3, "q must be [requests, q_heads, head_dim], got shape ", q.sizes());
  const int64_t batch = q.size(0), head_dim = q.size(2);
  OMNI_CHECK(head_dim == 64 || head_dim == 128, "head_dim must be 64 or 128, got ", head_dim);
  OMNI_CHECK(q.stride(2) == 1 && q.stride(1) % kVals == 0 && q.stride(0) % kVals == 0 &&
                 is_aligned16(q.data_ptr()),
             "q must be contiguous in head_dim with 16-byte aligned heads, got strides ",
             q.strides());
  OMNI_CHECK(stats.device() == device && stats.scalar_type() == q.scalar_type() &&
                 stats.dim() == 3 && stats.size(1) == 2 && stats.size(2) == head_dim &&
                 stats.is_contiguous() && is_aligned16(stats.data_ptr()),
             "stats must be contiguous, 16-byte aligned ", q.scalar_type(), " [rows, 2, ",
             head_dim, "] on ", device, ", got ", stats.scalar_type(), " ", stats.sizes(), " on ",
             stats.device());
  check_vector(head_base, "head_base", at::kLong, "int64", device);
  check_vector(select_kv, "select_kv", at::kLong, "int64", device);
  check_vector(select_q0, "select_q0", at::kLong, "int64", device);
  const int64_t heads = select_kv.size(0);
  OMNI_CHECK(select_q0.size(0) == heads, "select_q0 must have one entry per selecting head (",
             heads, "), got ", select_q0.size(0));
  OMNI_CHECK(page_table.device() == device && page_table.scalar_type() == at::kInt &&
                 page_table.dim() == 2 && page_table.stride(1) == 1,
             "page_table must be int32 [rows, pages] on ", device, " with contiguous rows, got ",
             page_table.scalar_type(), " ", page_table.sizes(), " on ", page_table.device());
  for (const auto& [t, name] : {std::pair{&seq_rows, "seq_rows"}, {&candidates, "candidates"}}) {
    check_vector(*t, name, at::kInt, "int32", device);
    OMNI_CHECK(t->size(0) == batch, name, " must have one entry per request (", batch, "), got ",
               t->size(0));
  }
  OMNI_CHECK(out.device() == device && out.scalar_type() == at::kFloat && out.dim() == 3 &&
                 out.size(0) == batch && out.size(1) == heads &&
                 out.size(2) <= page_table.size(1) && out.stride(2) == 1,
             "out must be fp32 [", batch, ", ", heads, ", columns <= ", page_table.size(1),
             "] on ", device, " with contiguous rows, got ", out.scalar_type(), " ", out.sizes(),
             " with strides ", out.strides(), " on ", out.device());
  OMNI_CHECK(page_size > 0 && logical_tokens > 0 && page_size % logical_tokens == 0,
             "logical pages of ", logical_tokens, " tokens must divide pages of ", page_size);
  const int64_t columns = out.size(2);
  if (batch == 0 || heads == 0 || columns == 0) return;
  OMNI_CHECK(batch <= 65535, "at most 65535 requests, got ", batch);

  ScoreParams p{};
  p.q = q.data_ptr();
  p.q_stride_b = q.stride(0);
  p.q_stride_h = q.stride(1);
  p.stats = stats.data_ptr();
  p.head_base = head_base.data_ptr<int64_t>();
  p.select_kv = select_kv.data_ptr<int64_t>();
  p.select_q0 = select_q0.data_ptr<int64_t>();
  p.page_table = page_table.data_ptr<int32_t>();
  p.page_table_stride = page_table.stride(0);
  p.seq_rows = seq_rows.data_ptr<int32_t>();
  p.candidates = candidates.data_ptr<int32_t>();
  p.out = out.data_ptr<float>();
  p.out_stride_b = out.stride(0);
  p.out_stride_s = out.stride(1);
  p.num_columns = static_cast<int>(columns);
  p.logical_tokens = static_cast<int>(logical_tokens);
  p.logical_per_page = static_cast<int>(page_size / logical_tokens);

  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream(device.index());
  OMNISERVE_DISPATCH_FLOAT16(q.scalar_type(), "page_scores q", [&] {
    const auto launch = [&](auto head_dim_constant, auto group_constant) {
      constexpr int kHeadDim = decltype(head_dim_constant)::value;
      constexpr int kGroup = decltype(group_constant)::value;
      using Cfg = ScoreConfig<kHeadDim, kGroup>;
      p.columns_per_block = columns_per_block(columns, heads, batch, Cfg::kColumnsPerRound);
      const int64_t blocks = (columns + p.columns_per_block - 1) / p.columns_per_block;
      OMNI_CHECK(blocks <= 65535, "too many page-table columns: ", columns);
      const dim3 grid(static_cast<unsigned>(heads), static_cast<unsigned>(blocks),
                      static_cast<unsigned>(batch));
      page_scores_kernel<scalar_t, kHeadDim, kGroup><<<grid, kThreads, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    const auto with_group = [&](auto head_dim_constant) {
      switch (group) {
        case 1: return launch(head_dim_constant, std::integral_constant<int, 1>());
        case 2: return launch(head_dim_constant, std::integral_constant<int, 2>());
        case 4: return launch(head_dim_constant, std::integral_constant<int, 4>());
        case 8: return launch(head_dim_constant, std::integral_constant<int, 8>());
        default: OMNI_CHECK(false, "group must be 1, 2, 4 or 8 query heads, got ", group);
      }
    };
    if (head_dim == 64) return with_group(std::integral_constant<int, 64>());
    with_group(std::integral_constant<int, 128>());
  });
}

}  // namespace omniserve
