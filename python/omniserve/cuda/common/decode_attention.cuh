// Paged decode attention (one query token per request) over the KV cache of runner/kv_cache.py:
// per layer, K and V rows [rows, head_dim] (row = head_base[head] + slot, slot = page * page_size
// + offset; head_base[head] = head * num_slots unless the caller passes it), stored in the compute
// dtype, or as KV8 / KV4 codes (uint8, KV4 = two channels per byte, low nibble = even channel)
// with an fp16 (scale, zero) per row: x̂ = scale * (q - zero) (formats/kv.py), or as per-tensor
// static KV8: int8 codes under one fp32 scale per layer for K and one for V, x̂ = scale * q. The
// kernels read those codes flipped to uint8 (q + 128, one XOR per four codes) with the row
// parameters (scale, 128), so that one KV8 path serves both. Per-tensor FP8 rows (e4m3 codes,
// x̂ = scale * e4m3(q)) take the same path with row parameters (scale, 0).
//
// Split-K ("flash decoding"): block (split, kv_head, request) attends the query heads of one GQA
// group to one partition of up to `partition` tokens, so each K/V row is read once for the whole
// group. With one partition per request the block writes the output; otherwise partial
// (normalized output, max, sum) go to a workspace and `combine_kernel` merges them.
//
// Streaming heads (LServe): a layer's KV heads may be split into dense heads, which attend their
// request's pages through the page table (within the sliding window, if any), and streaming
// heads, which attend every position of a compact per-request streaming table (sink and local
// pages, chronological, built by the caller), both in the same row tensors. Each block resolves
// its KV head's pages, base row and context once (`head_rows`); everything after that, both
// kernels and the combine step, is the same code for both kinds. Layers without streaming heads
// run instantiations compiled without them (`launch_format`).
//
// Page selection (LServe dynamic sparsity, python/omniserve/formats/page_selection.py): with a
// selection, every dense head attends its request's *selected view* instead of its whole context:
// virtual page j is page-table column columns[j] for j < count (the k columns chosen for this
// (request, KV head), ascending), else column tail + j - count (the newest pages), over
// count * page_size + ctx - tail * page_size positions. It is one more indirection in
// `cache_row` and a shorter context in `head_rows`; count = tail = 0 is the dense view, read in
// the same order. Selections run in the instantiations with streaming heads (which load each
// head's base row), so the kernels without either keep their code.
//
// Quantized rows are never dequantized element by element: with k = codes,
//   q·k̂ = s (q·k − z Σq)          Σ_t p_t v̂_t = Σ_t (p_t s_t) v_t − Σ_t p_t s_t z_t
// Two kernels share this file's parameters, split ranges and combine step:
// - 16-bit and KV8 rows: `decode_attention_kernel` here, on CUDA cores, in three phases over the
//   partition (scores into shared memory, block max and exponentials, then P·V): each group of
//   kLanesPerToken lanes owns one token at a time, each lane a contiguous slice of kVals channels
//   (one 8-16 byte load), one conversion and one FMA per value and query head.
// - KV4 rows: `decode_attention_kv4_kernel` (decode_attention_kv4.cuh), on tensor cores in one
//   streaming pass. At 4 bits, one FMA per value and query head would need more issue slots than
//   streaming the codes leaves (counting instructions, CUDA cores cap KV4 near 60% of the copy
//   rate), and the three phases' barriers leave the memory system idle between them, which at
//   4 bits per value costs more than the phases' work.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_fp8.h>

#include <cstdint>

#include "common/check.h"
#include "common/dtype.cuh"
#include "common/kv_format.h"
#include "common/reduce.cuh"

namespace omniserve::decode {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kMagic = 8388608.f;  // 2^23: a code c in the low mantissa bits reads 2^23 + c
constexpr uint32_t kMagicBits = 0x4B000000u;

template <int Bytes>
struct alignas(Bytes) Chunk {
  uint32_t w[Bytes / 4];
};

template <typename T, int Bits, int HeadDim, int Group>
struct DecodeConfig {
  static_assert(Bits == 16 || Bits == 8, "the CUDA-core paths serve 16-bit and KV8 rows");
  // Channels per lane: 8 for a 16-byte load of 16-bit values; for KV8 codes 16 (8 with 8 query
  // heads, which keeps the per-lane query and accumulator arrays, kVals * Group each, in
  // registers).
  static constexpr int kVals = Bits == 16 ? 8 : (Group <= 4 ? 16 : 8);
  static constexpr int kLoadBytes = kVals * Bits / 8;
  static constexpr int kLanesPerToken = HeadDim / kVals;
  static constexpr int kTokenGroups = kThreads / kLanesPerToken;
  static constexpr int kRowBytes = HeadDim * Bits / 8;
  // Tokens whose loads a lane issues before using any: ~64 bytes in flight per lane.
  static constexpr int kUnroll = kLoadBytes >= 16 ? 4 : 8;
  static_assert(kLanesPerToken >= 1 && kLanesPerToken <= 32 && 32 % kLanesPerToken == 0, "lanes");
};

// Converts one lane's chunk of a row to floats: 16-bit values, FP8 e4m3 codes (the hardware's
// paired conversion to fp16, exact), or KV8 codes (written into the mantissa of 2^23: exact, two
// integer/float ops, no I2F; static KV8's int8 codes flipped to q + 128 first).
template <typename T, KVFormat F, int Vals>
__device__ __forceinline__ void decode_chunk(const Chunk<Vals * kBitsOf<F> / 8>& c,
                                             float (&f)[Vals]) {
  static_assert(F != KVFormat::kKV4, "KV4 rows go through the tensor-core kernel");
  constexpr uint32_t kFlip = F == KVFormat::kStaticKV8 ? 0x80808080u : 0u;
  if constexpr (F == KVFormat::kDense) {
#pragma unroll
    for (int j = 0; j < Vals / 2; ++j) {
      const float2 v = Float16Traits<T>::to_float2(
          *reinterpret_cast<const typename Float16Traits<T>::Pair*>(&c.w[j]));
      f[2 * j] = v.x;
      f[2 * j + 1] = v.y;
    }
  } else if constexpr (F == KVFormat::kStaticFP8) {
#pragma unroll
    for (int j = 0; j < Vals / 4; ++j) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const __half2_raw pair = __nv_cvt_fp8x2_to_halfraw2(
            static_cast<__nv_fp8x2_storage_t>(c.w[j] >> (16 * h)), __NV_E4M3);
        const float2 v = __half22float2(__half2(pair));
        f[4 * j + 2 * h] = v.x;
        f[4 * j + 2 * h + 1] = v.y;
      }
    }
  } else {
#pragma unroll
    for (int j = 0; j < Vals / 4; ++j) {
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        const uint32_t codes = c.w[j] ^ kFlip;
        f[4 * j + b] = __uint_as_float(__byte_perm(codes, kMagicBits, 0x7440 + b)) - kMagic;
      }
    }
  }
}

struct DecodeParams {
  const void* q;            // [B, Hq, D]
  const uint8_t* k;         // rows of K (values or codes)
  const uint8_t* v;
  const __half2* k_params;  // [rows] (scale, zero) of per-row quantized caches
  const __half2* v_params;
  const float* k_scale;     // [1] per-tensor static KV8 scale
  const float* v_scale;
  const int32_t* page_table;  // [R, P]
  const int32_t* seq_rows;    // [B]: page-table row of each request
  const int32_t* context_lens;  // [B]
  void* out;                // [B, Hq, D]
  float* partial_out;       // [B, Hq, splits, D]
  float2* partial_stats;    // [B, Hq, splits]: (max, sum) of the log2-domain scores
  int64_t q_stride_b, q_stride_h, out_stride_b, out_stride_h;
  int page_table_stride;
  int page_size;
  uint32_t num_slots;
  int num_q_heads;
  int window;      // dense heads: 0 for full attention, else the last `window` positions
  int partition;   // tokens per split
  int num_splits;  // gridDim.x
  float scale_log2;  // softmax scale · log2(e)
  // Per-head base rows, given with streaming heads or a page selection; null otherwise (every
  // head dense, head_base[h] = h * num_slots, and the instantiations without streaming heads).
  // These fields are last, so that the fields above keep their parameter offsets: moving them
  // made ptxas allocate the KV4 kernel at head_dim 64 differently (64 registers and a spill
  // instead of 71).
  const int64_t* head_base;  // [kv_heads]: row of slot 0 of each KV head
  // Streaming heads: all null without them.
  const bool* is_stream;               // [kv_heads]
  const int32_t* stream_table;         // [B, W]: pages of request b's streaming heads
  const int32_t* stream_context_lens;  // [B]
  int stream_table_stride;
  // Page selection of the dense heads: all null without it.
  const int32_t* sel_columns;  // [R, kv_heads, sel_k]: selected page-table columns, ascending
  const int32_t* sel_count;    // [B]: virtual pages taken from sel_columns (0: the dense view)
  const int32_t* sel_tail;     // [B]: the column of the view's next virtual page
  int64_t sel_row_stride;      // elements between two rows of sel_columns
  int sel_k;                   // columns per (row, KV head)
};

// The first position a head with positions [0, ctx) attends under `window` (0: no window).
__device__ __forceinline__ int visible_begin(int ctx, int window) {
  return window > 0 ? max(0, ctx - window) : 0;
}

// The rows one (request, KV head) attends: positions [visible_begin(ctx, window), ctx), position t
// on virtual page j = t / page_size, at row base + pages[column(j)] * page_size + t % page_size,
// where column(j) is columns[j] for j < count and j + shift past them (the selected view, see the
// file comment; count = shift = 0, j itself, everywhere else).
struct HeadRows {
  const int32_t* pages;
  uint32_t base;
  int ctx;
  int window;
  const int32_t* columns = nullptr;
  int count = 0;
  int shift = 0;  // tail - count
};

// A dense head reads its request's page-table row within the window (its selected view, with a
// selection); a streaming head its request's streaming-table row (indexed by the batch index,
// not seq_rows), all of it. Without streaming heads the base is computed, not loaded: the layout
// is then the runner's (runner/kv_cache.py), and the host keeps no head_base tensor to build or
// cache.
template <bool Streaming>
__device__ __forceinline__ HeadRows head_rows(const DecodeParams& p, int b, int kv_head) {
  const auto dense = [&](uint32_t base) -> HeadRows {
    return {p.page_table + static_cast<int64_t>(p.seq_rows[b]) * p.page_table_stride, base,
            p.context_lens[b], p.window};
  };
  if constexpr (!Streaming) {
    return dense(kv_head * p.num_slots);
  } else {
    const uint32_t base = static_cast<uint32_t>(p.head_base[kv_head]);
    if (p.is_stream != nullptr && p.is_stream[kv_head]) {
      return {p.stream_table + static_cast<int64_t>(b) * p.stream_table_stride, base,
              p.stream_context_lens[b], 0};
    }
    HeadRows rows = dense(base);
    if (p.sel_columns != nullptr) {  // the host allows no window beside a selection
      const int64_t row = p.seq_rows[b];
      rows.columns = p.sel_columns + row * p.sel_row_stride + kv_head * p.sel_k;
      rows.count = p.sel_count[b];
      rows.shift = p.sel_tail[b] - rows.count;
      rows.ctx -= rows.shift * p.page_size;  // count * page_size + ctx - tail * page_size
    }
    return rows;
  }
}

// The cache row of position t: the one place positions become rows, for every format. The
// unsigned comparison is the same test for j >= 0, and folds away where count is known to be 0
// (the instantiations without streaming heads), leaving their code as it was before selections.
__device__ __forceinline__ uint32_t cache_row(const HeadRows& rows, int page_size, int t) {
  const int j = t / page_size;
  const int column = static_cast<unsigned>(j) < static_cast<unsigned>(rows.count)
                         ? rows.columns[j]
                         : j + rows.shift;
  const uint32_t slot = static_cast<uint32_t>(rows.pages[column]) * page_size + t % page_size;
  return rows.base + slot;
}

// Splits cover [first, ctx) in `partition`-token spans, first being the visible begin rounded
// down to kTileTokens: a KV4 tile (decode_attention_kv4.cuh) then never straddles a page, whose
// size is a multiple of kTileTokens. The host sizes launches for the kTileTokens - 1 extra
// positions a window may add.
constexpr int kTileTokens = 16;

__device__ __forceinline__ int first_split_position(int ctx, int window) {
  return visible_begin(ctx, window) / kTileTokens * kTileTokens;
}

struct SplitRange {
  int begin;     // first position of the split's span, a multiple of kTileTokens
  int lo, hi;    // the visible positions [lo, hi) it attends
  bool covered;  // the launch's splits reach ctx
};

__device__ __forceinline__ SplitRange split_range(const DecodeParams& p, const HeadRows& rows,
                                                  int split) {
  const int first = first_split_position(rows.ctx, rows.window);
  const int begin = first + split * p.partition;
  return {begin, max(begin, visible_begin(rows.ctx, rows.window)),
          min(begin + p.partition, rows.ctx), first + p.num_splits * p.partition >= rows.ctx};
}

// A block with nothing to attend: an empty context, a split past the end (a streaming head's
// short context under splits sized for the dense heads, say), or a launch sized for shorter
// contexts than this head has. With one split it writes the output, 0 for an empty context and
// NaN for a short launch (never a silently truncated result); with several, `combine_kernel`
// does.
template <typename T, int HeadDim, int Group>
__device__ __forceinline__ void write_unattended(const DecodeParams& p, int b, int head0,
                                                 int split, bool covered) {
  if (split != 0 || p.num_splits != 1) return;
  const float fill = covered ? 0.f : __int_as_float(0x7fc00000);
  for (int e = threadIdx.x; e < Group * HeadDim; e += blockDim.x) {
    T* o = static_cast<T*>(p.out) + b * p.out_stride_b + (head0 + e / HeadDim) * p.out_stride_h;
    o[e % HeadDim] = Float16Traits<T>::from_float(fill);
  }
}

// The (scale, zero) every row of a static cache is read with (see the file comment).
template <KVFormat F>
__device__ __forceinline__ float2 static_row_params(const float* scale) {
  if constexpr (F == KVFormat::kStaticKV8) {
    return make_float2(*scale, 128.f);
  } else if constexpr (F == KVFormat::kStaticFP8) {
    return make_float2(*scale, 0.f);
  } else {
    return make_float2(0.f, 0.f);  // unused
  }
}

// Issues this lane's loads for the next kUnroll tokens of its token group (tokens base +
// u · kTokenGroups + token_group, those below n) before any is used: its chunk of each K or V row
// and, for per-row quantized rows, the row's (scale, zero); static rows all take `fixed`.
template <typename Cfg, KVFormat F>
__device__ __forceinline__ void load_chunks(const uint8_t* rows, const __half2* params,
                                            float2 fixed, const uint32_t* s_row, int n, int base,
                                            int token_group, int lane_in_token,
                                            Chunk<Cfg::kLoadBytes> (&chunk)[Cfg::kUnroll],
                                            float2 (&row_params)[Cfg::kUnroll]) {
#pragma unroll
  for (int u = 0; u < Cfg::kUnroll; ++u) {
    const int i = base + u * Cfg::kTokenGroups + token_group;
    if (i < n) {
      const uint32_t row = s_row[i];
      chunk[u] = *reinterpret_cast<const Chunk<Cfg::kLoadBytes>*>(
          rows + static_cast<int64_t>(row) * Cfg::kRowBytes + lane_in_token * Cfg::kLoadBytes);
      if constexpr (F == KVFormat::kKV8) row_params[u] = __half22float2(params[row]);
      if constexpr (kIsStatic<F>) row_params[u] = fixed;
    }
  }
}

// Phase 1 on CUDA cores: each group of kLanesPerToken lanes scores one token at a time, each lane
// a dot product over its channel slice, summed across the group with shuffles.
template <typename T, KVFormat F, int HeadDim, int Group>
__device__ __forceinline__ void scores_cuda_cores(const DecodeParams& p, const uint32_t* s_row,
                                                  float* s_score, float (*s_stat)[Group], int n,
                                                  int b, int head0) {
  using Cfg = DecodeConfig<T, kBitsOf<F>, HeadDim, Group>;
  using Tr = Float16Traits<T>;
  constexpr int kVals = Cfg::kVals, kLanes = Cfg::kLanesPerToken, kGroups = Cfg::kTokenGroups;
  constexpr bool kQuant = F != KVFormat::kDense;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int token_group = tid / kLanes, lane_in_token = tid % kLanes;
  const int c0 = lane_in_token * kVals;
  const float2 k_fixed = static_row_params<F>(p.k_scale);

  // This lane's query slice, pre-scaled by softmax scale · log2(e).
  float qf[Group][kVals];
  float qsum[Group];
#pragma unroll
  for (int g = 0; g < Group; ++g) {
    const T* qrow = static_cast<const T*>(p.q) + b * p.q_stride_b + (head0 + g) * p.q_stride_h + c0;
    const Vec8<T>* qv = reinterpret_cast<const Vec8<T>*>(qrow);
    qsum[g] = 0.f;
#pragma unroll
    for (int j = 0; j < kVals / 8; ++j) {
      const Vec8<T> x = qv[j];
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const float s = Tr::to_float(x.v[i]) * p.scale_log2;
        qsum[g] += s;
        qf[g][8 * j + i] = s;
      }
    }
    qsum[g] = warp_reduce<kLanes>(qsum[g], SumOp<float>());
  }
  float m[Group];
#pragma unroll
  for (int g = 0; g < Group; ++g) m[g] = -INFINITY;
  // Warp-uniform trip count: the score reductions shuffle across the whole warp.
  for (int base = 0; base < n; base += Cfg::kUnroll * kGroups) {
    Chunk<Cfg::kLoadBytes> chunk[Cfg::kUnroll];
    float2 kp[Cfg::kUnroll];
    load_chunks<Cfg, F>(p.k, p.k_params, k_fixed, s_row, n, base, token_group, lane_in_token,
                        chunk, kp);
#pragma unroll
    for (int u = 0; u < Cfg::kUnroll; ++u) {
      const int i = base + u * kGroups + token_group;
      float f[kVals];
      decode_chunk<T, F, kVals>(chunk[u], f);
      float dot[Group];
#pragma unroll
      for (int g = 0; g < Group; ++g) {
        dot[g] = 0.f;
#pragma unroll
        for (int c = 0; c < kVals; ++c) dot[g] = fmaf(qf[g][c], f[c], dot[g]);
        // Every lane takes part in the shuffles, including those past the end.
        dot[g] = warp_reduce<kLanes>(dot[g], SumOp<float>());
      }
      if (i < n) {
#pragma unroll
        for (int g = 0; g < Group; ++g) {
          const float score = kQuant ? kp[u].x * (dot[g] - kp[u].y * qsum[g]) : dot[g];
          m[g] = fmaxf(m[g], score);
          if (lane_in_token == 0) s_score[g * p.partition + i] = score;
        }
      }
    }
  }
#pragma unroll
  for (int g = 0; g < Group; ++g) {
    m[g] = warp_reduce<32>(m[g], MaxOp());
    if (lane == 0) s_stat[warp][g] = m[g];
  }
}

// Phase 3 on CUDA cores: each group of kLanesPerToken lanes accumulates p · v over its tokens for
// its channel slice; the groups of a warp are summed with shuffles, then written to s_out
// [warp][head][channel] (after a barrier: s_out aliases the probabilities).
template <typename T, KVFormat F, int HeadDim, int Group>
__device__ __forceinline__ void pv_cuda_cores(const DecodeParams& p, const uint32_t* s_row,
                                              const float* s_score, float* s_out, int n) {
  using Cfg = DecodeConfig<T, kBitsOf<F>, HeadDim, Group>;
  constexpr int kVals = Cfg::kVals, kLanes = Cfg::kLanesPerToken, kGroups = Cfg::kTokenGroups;
  constexpr bool kQuant = F != KVFormat::kDense;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int token_group = tid / kLanes, lane_in_token = tid % kLanes;
  const int c0 = lane_in_token * kVals;
  const float2 v_fixed = static_row_params<F>(p.v_scale);

  float acc[Group][kVals];
  float zacc[Group];
#pragma unroll
  for (int g = 0; g < Group; ++g) {
    zacc[g] = 0.f;
#pragma unroll
    for (int c = 0; c < kVals; ++c) acc[g][c] = 0.f;
  }
  for (int base = 0; base < n; base += Cfg::kUnroll * kGroups) {
    Chunk<Cfg::kLoadBytes> chunk[Cfg::kUnroll];
    float2 vp[Cfg::kUnroll];
    load_chunks<Cfg, F>(p.v, p.v_params, v_fixed, s_row, n, base, token_group, lane_in_token,
                        chunk, vp);
#pragma unroll
    for (int u = 0; u < Cfg::kUnroll; ++u) {
      const int i = base + u * kGroups + token_group;
      if (i < n) {
        float f[kVals];
        decode_chunk<T, F, kVals>(chunk[u], f);
#pragma unroll
        for (int g = 0; g < Group; ++g) {
          float w = s_score[g * p.partition + i];
          if constexpr (kQuant) {
            w *= vp[u].x;
            zacc[g] = fmaf(w, vp[u].y, zacc[g]);
          }
#pragma unroll
          for (int c = 0; c < kVals; ++c) acc[g][c] = fmaf(w, f[c], acc[g][c]);
        }
      }
    }
  }
  // Subtract the zeros' share, then sum over the token groups of the warp.
#pragma unroll
  for (int g = 0; g < Group; ++g) {
#pragma unroll
    for (int c = 0; c < kVals; ++c) {
      acc[g][c] = warp_reduce<32, kLanes>(acc[g][c] - zacc[g], SumOp<float>());
    }
  }
  __syncthreads();  // every warp is done reading s_score before s_out overwrites it
  if (lane < kLanes) {
#pragma unroll
    for (int g = 0; g < Group; ++g) {
#pragma unroll
      for (int c = 0; c < kVals; ++c) s_out[(warp * Group + g) * HeadDim + c0 + c] = acc[g][c];
    }
  }
}

// Channel c of query head h's normalized output over this split: the output itself with one
// split, else a partial (with the split's log2-domain (max, sum)) for `combine_kernel`.
template <typename T, int HeadDim>
__device__ __forceinline__ void store_result(const DecodeParams& p, int b, int h, int split, int c,
                                             float o, float2 max_sum) {
  if (p.num_splits == 1) {
    T* out = static_cast<T*>(p.out) + b * p.out_stride_b + h * p.out_stride_h;
    out[c] = Float16Traits<T>::from_float(o);
  } else {
    const int64_t slot = (static_cast<int64_t>(b) * p.num_q_heads + h) * p.num_splits + split;
    p.partial_out[slot * HeadDim + c] = o;
    if (c == 0) p.partial_stats[slot] = max_sum;
  }
}

template <typename T, KVFormat F, int HeadDim, int Group, bool Streaming>
__global__ void __launch_bounds__(kThreads) decode_attention_kernel(const DecodeParams p) {
  using Tr = Float16Traits<T>;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ float s_stat[kWarps][Group];
  __shared__ float2 s_max_sum[Group];  // read with run-time head indices at the end
  uint32_t* s_row = reinterpret_cast<uint32_t*>(smem_raw);              // [partition]
  float* s_score = reinterpret_cast<float*>(s_row + p.partition);      // [Group][partition]
  float* s_out = s_score;  // [kWarps][Group][HeadDim], reused after the scores are consumed

  const int b = blockIdx.z, kv_head = blockIdx.y, split = blockIdx.x;
  const HeadRows rows = head_rows<Streaming>(p, b, kv_head);
  const SplitRange range = split_range(p, rows, split);
  const int head0 = kv_head * Group;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  if (range.lo >= range.hi || !range.covered) {
    write_unattended<T, HeadDim, Group>(p, b, head0, split, range.covered);
    return;
  }
  const int n = range.hi - range.lo;

  // Phase 0: cache rows of the partition's tokens.
  for (int i = tid; i < n; i += kThreads) s_row[i] = cache_row(rows, p.page_size, range.lo + i);

  __syncthreads();

  // Phase 1: scores (log2 domain) of every token of the partition, and each warp's maxima.
  scores_cuda_cores<T, F, HeadDim, Group>(p, s_row, s_score, s_stat, n, b, head0);
  __syncthreads();
  float m[Group];
#pragma unroll
  for (int g = 0; g < Group; ++g) {
    m[g] = s_stat[0][g];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) m[g] = fmaxf(m[g], s_stat[w][g]);
  }
  __syncthreads();  // s_stat is reused for the sums

  // Phase 2: probabilities (unnormalized) and their sums.
  float l[Group];
#pragma unroll
  for (int g = 0; g < Group; ++g) {
    l[g] = 0.f;
    for (int i = tid; i < n; i += kThreads) {
      const float e = exp2f(s_score[g * p.partition + i] - m[g]);
      s_score[g * p.partition + i] = e;
      l[g] += e;
    }
    l[g] = warp_reduce<32>(l[g], SumOp<float>());
    if (lane == 0) s_stat[warp][g] = l[g];
  }
  __syncthreads();
#pragma unroll
  for (int g = 0; g < Group; ++g) {
    l[g] = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) l[g] += s_stat[w][g];
    if (tid == 0) s_max_sum[g] = make_float2(m[g], l[g]);
  }

  // Phase 3: P·V over the partition; each warp's partial output lands in s_out.
  pv_cuda_cores<T, F, HeadDim, Group>(p, s_row, s_score, s_out, n);
  __syncthreads();
  for (int e = tid; e < Group * HeadDim; e += kThreads) {
    const int g = e / HeadDim, c = e % HeadDim;
    float o = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) o += s_out[w * Group * HeadDim + e];
    const float2 max_sum = s_max_sum[g];
    store_result<T, HeadDim>(p, b, head0 + g, split, c, o / max_sum.y, max_sum);
  }
}

// Merges the partitions of each (request, query head): weights l_s · 2^(m_s − max m). The grid is
// (group, kv_heads, batch), so that a block knows its KV head and thus which splits the attention
// kernel wrote for it (`head_rows`, as there).
template <typename T, int HeadDim, bool Streaming>
__global__ void __launch_bounds__(HeadDim) combine_kernel(const DecodeParams p) {
  using Tr = Float16Traits<T>;
  const int kv_head = blockIdx.y, b = blockIdx.z, c = threadIdx.x;
  const int h = kv_head * gridDim.x + blockIdx.x;
  const HeadRows rows = head_rows<Streaming>(p, b, kv_head);
  const int ctx = rows.ctx;
  const int first = first_split_position(ctx, rows.window);
  T* out = static_cast<T*>(p.out) + b * p.out_stride_b + h * p.out_stride_h;
  if (ctx <= 0) {
    out[c] = Tr::from_float(0.f);
    return;
  }
  if (first + p.num_splits * p.partition < ctx) {
    out[c] = Tr::from_float(__int_as_float(0x7fc00000));  // launch sized too short: see above
    return;
  }
  const int splits = (ctx - first + p.partition - 1) / p.partition;
  const int64_t slot0 = (static_cast<int64_t>(b) * p.num_q_heads + h) * p.num_splits;
  float m = -INFINITY;
  for (int s = 0; s < splits; ++s) m = fmaxf(m, p.partial_stats[slot0 + s].x);
  float num = 0.f, den = 0.f;
  for (int s = 0; s < splits; ++s) {
    const float2 st = p.partial_stats[slot0 + s];
    const float w = st.y * exp2f(st.x - m);
    num = fmaf(w, p.partial_out[(slot0 + s) * HeadDim + c], num);
    den += w;
  }
  out[c] = Tr::from_float(num / den);
}

template <typename T, int HeadDim, int Group, bool Streaming>
__global__ void __launch_bounds__(kThreads) decode_attention_kv4_kernel(const DecodeParams p);

template <typename T, KVFormat F, int HeadDim, int Group, bool Streaming>
void launch(const DecodeParams& p, int batch, int kv_heads, size_t smem, cudaStream_t stream) {
  const auto kernel = [] {
    if constexpr (F == KVFormat::kKV4) {
      return decode_attention_kv4_kernel<T, HeadDim, Group, Streaming>;
    } else {
      return decode_attention_kernel<T, F, HeadDim, Group, Streaming>;
    }
  }();
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
  }
  kernel<<<dim3(p.num_splits, kv_heads, batch), kThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (p.num_splits > 1) {
    combine_kernel<T, HeadDim, Streaming><<<dim3(Group, kv_heads, batch), HeadDim, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename T, KVFormat F, int HeadDim, bool Streaming>
void dispatch_group(const DecodeParams& p, int group, int batch, int kv_heads, size_t smem,
                    cudaStream_t stream) {
  switch (group) {
    case 1: return launch<T, F, HeadDim, 1, Streaming>(p, batch, kv_heads, smem, stream);
    case 2: return launch<T, F, HeadDim, 2, Streaming>(p, batch, kv_heads, smem, stream);
    case 4: return launch<T, F, HeadDim, 4, Streaming>(p, batch, kv_heads, smem, stream);
    case 8: return launch<T, F, HeadDim, 8, Streaming>(p, batch, kv_heads, smem, stream);
    default: OMNI_CHECK(false, "query heads per KV head must be 1, 2, 4 or 8, got ", group);
  }
}

template <typename T, KVFormat F, bool Streaming>
void dispatch_head_dim(const DecodeParams& p, int head_dim, int group, int batch, int kv_heads,
                       size_t smem, cudaStream_t stream) {
  switch (head_dim) {
    case 64: return dispatch_group<T, F, 64, Streaming>(p, group, batch, kv_heads, smem, stream);
    case 128: return dispatch_group<T, F, 128, Streaming>(p, group, batch, kv_heads, smem, stream);
    default: OMNI_CHECK(false, "head_dim must be 64 or 128, got ", head_dim);
  }
}

// Launches the kernel (and the combine step) for one storage format; instantiated once per
// format in decode_attention_{kv16,kv8,kv4,kv8_static}.cu (the KV4 one includes
// decode_attention_kv4.cuh), so that they compile in parallel. Streaming heads are a
// compile-time switch, at twice the instantiations: a run-time one, a single uniform branch per
// block, still made ptxas schedule the main loops differently, and layers without streaming
// heads ran up to 2.5% slower on the H100 (KV8, batch 1, 32K context). Page selections, which
// come with head_base, take the instantiations with streaming heads.
template <typename T, KVFormat F>
void launch_format(const DecodeParams& p, int head_dim, int group, int batch, int kv_heads,
                   size_t smem, cudaStream_t stream) {
  if (p.head_base != nullptr) {
    return dispatch_head_dim<T, F, true>(p, head_dim, group, batch, kv_heads, smem, stream);
  }
  dispatch_head_dim<T, F, false>(p, head_dim, group, batch, kv_heads, smem, stream);
}

}  // namespace omniserve::decode
