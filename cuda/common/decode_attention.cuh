// Paged decode attention (one query token per request) over the KV cache of runner/kv_cache.py:
// per layer, K and V rows [kv_heads * num_slots, head_dim] (row = head * num_slots + slot,
// slot = page * page_size + offset), stored in the compute dtype, or as KV8 / KV4 codes
// (uint8, KV4 = two channels per byte, low nibble = even channel) with an fp16 (scale, zero) per
// row: x̂ = scale * (q - zero) (quant/kv.py).
//
// Split-K ("flash decoding"): block (split, kv_head, request) attends the query heads of one GQA
// group to one partition of up to `partition` tokens, so each K/V row is read once for the whole
// group. Three phases on the partition: scores into shared memory, block max and exponentials,
// then P·V into per-warp partial outputs. With one partition per request the block writes the
// output; otherwise partial (normalized output, max, sum) go to a workspace and `combine_kernel`
// merges them.
//
// Quantized rows are never dequantized element by element: with k = codes,
//   q·k̂ = s (q·k − z Σq)          Σ_t p_t v̂_t = Σ_t (p_t s_t) v_t − Σ_t p_t s_t z_t
// 16-bit and KV8 rows run on CUDA cores (`scores_cuda_cores`, `pv_cuda_cores`): each group of
// kLanesPerToken lanes owns one token at a time, each lane a contiguous slice of kVals channels
// (one 8-16 byte load), one conversion and one FMA per value and query head. KV4 rows run on
// tensor cores (`scores_kv4_mma`, `pv_kv4_mma`): at 4 bits, one FMA per value and query head
// would need more issue slots than streaming the codes leaves (counting instructions, CUDA cores
// cap KV4 near 60% of the copy rate), so the nibbles become fp16 (one LOP3 + one HSUB2
// per pair) and mma.sync does the products.
#pragma once

#include <c10/cuda/CUDAException.h>

#include <cstdint>

#include "common/check.h"
#include "common/dtype.cuh"
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

// Converts one lane's chunk of a row to floats: 16-bit values, or KV8 codes (written into the
// mantissa of 2^23: exact, two integer/float ops, no I2F).
template <typename T, int Bits, int Vals>
__device__ __forceinline__ void decode_chunk(const Chunk<Vals * Bits / 8>& c, float (&f)[Vals]) {
  static_assert(Bits == 16 || Bits == 8, "KV4 rows go through the tensor-core paths");
  if constexpr (Bits == 16) {
#pragma unroll
    for (int j = 0; j < Vals / 2; ++j) {
      const float2 v = Float16Traits<T>::to_float2(
          *reinterpret_cast<const typename Float16Traits<T>::Pair*>(&c.w[j]));
      f[2 * j] = v.x;
      f[2 * j + 1] = v.y;
    }
  } else {
#pragma unroll
    for (int j = 0; j < Vals / 4; ++j) {
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        f[4 * j + b] = __uint_as_float(__byte_perm(c.w[j], kMagicBits, 0x7440 + b)) - kMagic;
      }
    }
  }
}

struct DecodeParams {
  const void* q;            // [B, Hq, D]
  const uint8_t* k;         // rows of K (values or codes)
  const uint8_t* v;
  const __half2* k_params;  // [rows] (scale, zero), quantized caches only
  const __half2* v_params;
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
  int window;      // 0: full attention; else the last `window` positions
  int partition;   // tokens per split
  int num_splits;  // gridDim.x
  float scale_log2;  // softmax scale · log2(e)
};

// Visible token range [begin, ctx) of request b.
__device__ __forceinline__ int visible_begin(int ctx, int window) {
  return window > 0 ? max(0, ctx - window) : 0;
}

// Issues this lane's loads for the next kUnroll tokens of its token group (tokens base +
// u · kTokenGroups + token_group, those below n) before any is used: its chunk of each K or V row
// and, for quantized rows, the row's (scale, zero).
template <typename Cfg, bool kQuant>
__device__ __forceinline__ void load_chunks(const uint8_t* rows, const __half2* params,
                                            const uint32_t* s_row, int n, int base,
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
      if constexpr (kQuant) row_params[u] = __half22float2(params[row]);
    }
  }
}

// Phase 1 on CUDA cores: each group of kLanesPerToken lanes scores one token at a time, each lane
// a dot product over its channel slice, summed across the group with shuffles.
template <typename T, int Bits, int HeadDim, int Group>
__device__ __forceinline__ void scores_cuda_cores(const DecodeParams& p, const uint32_t* s_row,
                                                  float* s_score, float (*s_stat)[Group], int n,
                                                  int b, int head0) {
  using Cfg = DecodeConfig<T, Bits, HeadDim, Group>;
  using Tr = Float16Traits<T>;
  constexpr int kVals = Cfg::kVals, kLanes = Cfg::kLanesPerToken, kGroups = Cfg::kTokenGroups;
  constexpr bool kQuant = Bits != 16;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int token_group = tid / kLanes, lane_in_token = tid % kLanes;
  const int c0 = lane_in_token * kVals;

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
    load_chunks<Cfg, kQuant>(p.k, p.k_params, s_row, n, base, token_group, lane_in_token, chunk, kp);
#pragma unroll
    for (int u = 0; u < Cfg::kUnroll; ++u) {
      const int i = base + u * kGroups + token_group;
      float f[kVals];
      decode_chunk<T, Bits, kVals>(chunk[u], f);
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

// Phase 1 for KV4 on tensor cores (mma.sync m16n8k16, fp16 in, fp32 accumulate): a warp scores 8
// tokens per tile against the group's query heads (rows 0..Group-1 of the 16-row A tile; the
// rest are zero). Lane (g = lane / 4, r = lane % 4) loads a quarter of token g's code row with
// one load and turns each 32-bit word into fp16 pairs with one LOP3 + one HSUB2 per pair
// (0x6400 | nibble is the fp16 1024 + nibble). The pairs come out as channels (j, j + 4) of the
// word; the k order of the A (query) fragments is permuted the same way, which a dot product
// allows. Queries enter as fp16 without scaling (exact for fp16 and for bf16 in fp16's range);
// scale, log2(e), and the row's scale and zero are applied to the fp32 dot.
template <typename T, int HeadDim, int Group>
__device__ __forceinline__ void scores_kv4_mma(const DecodeParams& p, const uint32_t* s_row,
                                               float* s_score, float (*s_stat)[Group], int n,
                                               int b, int head0) {
  static_assert(Group <= 8, "one 8-row half of the A tile holds the group");
  using Tr = Float16Traits<T>;
  constexpr int kSteps = HeadDim / 16;     // mma k-steps over the head dimension
  constexpr int kSlice = HeadDim / 4;      // channels of a token row per lane
  constexpr int kWords = kSlice / 8;       // 32-bit code words per lane (8 nibbles each)
  constexpr int kRowBytes = HeadDim / 2;
  constexpr int kTileUnroll = 4;           // tiles whose loads are in flight together
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, r = lane % 4;

  // A fragments of head g (zero beyond the group): step s = 2w + h takes channels
  // (8w + 2h, 8w + 2h + 4) and (8w + 2h + 1, 8w + 2h + 5) of this lane's slice.
  uint32_t qa[kSteps][2];
  float qsum = 0.f;
  {
    const T* qrow = static_cast<const T*>(p.q) + b * p.q_stride_b +
                    (head0 + min(g, Group - 1)) * p.q_stride_h + r * kSlice;
#pragma unroll
    for (int w = 0; w < kWords; ++w) {
      const Vec8<T> x = reinterpret_cast<const Vec8<T>*>(qrow)[w];
      __half f[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        f[i] = __float2half_rn(g < Group ? Tr::to_float(x.v[i]) : 0.f);
        qsum += __half2float(f[i]);
      }
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const __half2 lo = __halves2half2(f[2 * h], f[2 * h + 4]);
        const __half2 hi = __halves2half2(f[2 * h + 1], f[2 * h + 5]);
        qa[2 * w + h][0] = *reinterpret_cast<const uint32_t*>(&lo);
        qa[2 * w + h][1] = *reinterpret_cast<const uint32_t*>(&hi);
      }
    }
  }
  qsum = warp_reduce<4>(qsum, SumOp<float>());  // the quad holds head g's whole row

  const __half2 k1024 = __float2half2_rn(1024.f);
  float m = -INFINITY;
  constexpr int kTile = 8, kStride = kWarps * kTile;
  for (int base = warp * kTile; base < n; base += kStride * kTileUnroll) {
    Chunk<kSlice / 2> chunk[kTileUnroll];
    float2 kp[kTileUnroll][2];
#pragma unroll
    for (int u = 0; u < kTileUnroll; ++u) {
      const int t0 = base + u * kStride;
      // Past the end, read a valid row (the scores are dropped): loads stay unconditional.
      const uint32_t row = s_row[min(t0 + g, n - 1)];
      chunk[u] = *reinterpret_cast<const Chunk<kSlice / 2>*>(
          p.k + static_cast<int64_t>(row) * kRowBytes + r * (kSlice / 2));
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        kp[u][e] = __half22float2(p.k_params[s_row[min(t0 + 2 * r + e, n - 1)]]);
      }
    }
#pragma unroll
    for (int u = 0; u < kTileUnroll; ++u) {
      float c[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int w = 0; w < kWords; ++w) {
        const uint32_t x = chunk[u].w[w];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          uint32_t b01[2];
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            uint32_t v;
            const uint32_t shifted = x >> (8 * h + 4 * j);
            asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(v) : "r"(shifted), "r"(0x000F000Fu),
                "r"(0x64006400u));  // (a & b) | c
            const __half2 codes = __hsub2(*reinterpret_cast<const __half2*>(&v), k1024);
            b01[j] = *reinterpret_cast<const uint32_t*>(&codes);
          }
          asm volatile(
              "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
              "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
              : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
              : "r"(qa[2 * w + h][0]), "r"(0u), "r"(qa[2 * w + h][1]), "r"(0u), "r"(b01[0]),
                "r"(b01[1]));
        }
      }
      // c[e]: head g, token t0 + 2r + e (rows 8..15, c[2..3], are the zero padding).
      const int t0 = base + u * kStride;
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int t = t0 + 2 * r + e;
        if (t < n && g < Group) {
          const float score = p.scale_log2 * kp[u][e].x * (c[e] - kp[u][e].y * qsum);
          m = fmaxf(m, score);
          s_score[g * p.partition + t] = score;
        }
      }
    }
  }
#pragma unroll
  for (int gg = 0; gg < Group; ++gg) {
    const float mg = warp_reduce<32>(g == gg ? m : -INFINITY, MaxOp());
    if (lane == 0) s_stat[warp][gg] = mg;
  }
}

// Phase 3 on CUDA cores: each group of kLanesPerToken lanes accumulates p · v over its tokens for
// its channel slice; the groups of a warp are summed with shuffles, then written to s_out
// [warp][head][channel] (after a barrier: s_out aliases the probabilities).
template <typename T, int Bits, int HeadDim, int Group>
__device__ __forceinline__ void pv_cuda_cores(const DecodeParams& p, const uint32_t* s_row,
                                              const float* s_score, float* s_out, int n) {
  using Cfg = DecodeConfig<T, Bits, HeadDim, Group>;
  constexpr int kVals = Cfg::kVals, kLanes = Cfg::kLanesPerToken, kGroups = Cfg::kTokenGroups;
  constexpr bool kQuant = Bits != 16;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int token_group = tid / kLanes, lane_in_token = tid % kLanes;
  const int c0 = lane_in_token * kVals;

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
    load_chunks<Cfg, kQuant>(p.v, p.v_params, s_row, n, base, token_group, lane_in_token, chunk, vp);
#pragma unroll
    for (int u = 0; u < Cfg::kUnroll; ++u) {
      const int i = base + u * kGroups + token_group;
      if (i < n) {
        float f[kVals];
        decode_chunk<T, Bits, kVals>(chunk[u], f);
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

// Phase 3 for KV4 on tensor cores: O^T = V^T P'^T per tile of 16 tokens (mma m16n8k16: M = 16
// channels, N = 8 query heads, K = 16 tokens), with P' = p · scale in fp16 and the zeros
// subtracted once at the end (Σ_t P'_t z_t). Lane (g = lane / 4, r = lane % 4) loads its
// kSlice channels (HeadDim / 8) of tokens 4r .. 4r + 3 of the tile, which take the k positions
// 2r, 2r + 1, 2r + 8, 2r + 9; PRMT puts two tokens' bytes side by side so that one LOP3 makes an
// fp16 pair (token 4r, token 4r + 1) of one channel. Row g of M-tile i is channel kSlice·g + i,
// row g + 8 channel kSlice·g + kMTiles + i.
template <typename T, int HeadDim, int Group>
__device__ __forceinline__ void pv_kv4_mma(const DecodeParams& p, const uint32_t* s_row,
                                           const float* s_prob, float* s_out, int n) {
  static_assert(Group <= 8, "the N dimension of one mma holds the group");
  constexpr int kMTiles = HeadDim / 16;
  constexpr int kSlice = HeadDim / 8;
  constexpr int kWords = kSlice / 8;
  constexpr int kRowBytes = HeadDim / 2;
  constexpr int kTile = 16, kStride = kWarps * kTile;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, r = lane % 4;
  const __half2 k1024 = __float2half2_rn(1024.f);

  float acc[kMTiles][4];
#pragma unroll
  for (int i = 0; i < kMTiles; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
  float zacc = 0.f;
  for (int base = warp * kTile; base < n; base += kStride) {
    Chunk<kSlice / 2> v[4];
    float2 vp[4];
    float prob[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int t = base + 4 * r + e;
      // Past the end, read a valid row with probability 0: loads stay unconditional.
      const uint32_t row = s_row[min(t, n - 1)];
      v[e] = *reinterpret_cast<const Chunk<kSlice / 2>*>(
          p.v + static_cast<int64_t>(row) * kRowBytes + g * (kSlice / 2));
      vp[e] = __half22float2(p.v_params[row]);
      prob[e] = 0.f;
      if (t < n && g < Group) prob[e] = s_prob[g * p.partition + t];
    }
    __half ph[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      ph[e] = __float2half_rn(prob[e] * vp[e].x);
      zacc = fmaf(__half2float(ph[e]), vp[e].y, zacc);  // with the rounded P', as the mma sees it
    }
    const __half2 pb0 = __halves2half2(ph[0], ph[1]), pb1 = __halves2half2(ph[2], ph[3]);
    const uint32_t b0 = *reinterpret_cast<const uint32_t*>(&pb0);
    const uint32_t b1 = *reinterpret_cast<const uint32_t*>(&pb1);
    // pairs01[c] = (token 4r, token 4r + 1) and pairs23[c] = (4r + 2, 4r + 3) at slice channel c.
    uint32_t pairs01[kSlice], pairs23[kSlice];
#pragma unroll
    for (int w = 0; w < kWords; ++w) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const uint32_t sel = h == 0 ? 0x5410u : 0x7632u;  // bytes 0-1 or 2-3 of both words
        const uint32_t y01 = __byte_perm(v[0].w[w], v[1].w[w], sel);
        const uint32_t y23 = __byte_perm(v[2].w[w], v[3].w[w], sel);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int c = 8 * w + 4 * h + i;
          uint32_t x01, x23;
          asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(x01) : "r"(y01 >> (4 * i)),
              "r"(0x000F000Fu), "r"(0x64006400u));
          asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(x23) : "r"(y23 >> (4 * i)),
              "r"(0x000F000Fu), "r"(0x64006400u));
          const __half2 h01 = __hsub2(*reinterpret_cast<const __half2*>(&x01), k1024);
          const __half2 h23 = __hsub2(*reinterpret_cast<const __half2*>(&x23), k1024);
          pairs01[c] = *reinterpret_cast<const uint32_t*>(&h01);
          pairs23[c] = *reinterpret_cast<const uint32_t*>(&h23);
        }
      }
    }
#pragma unroll
    for (int i = 0; i < kMTiles; ++i) {
      asm volatile(
          "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
          "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
          : "+f"(acc[i][0]), "+f"(acc[i][1]), "+f"(acc[i][2]), "+f"(acc[i][3])
          : "r"(pairs01[i]), "r"(pairs01[kMTiles + i]), "r"(pairs23[i]),
            "r"(pairs23[kMTiles + i]), "r"(b0), "r"(b1));
    }
  }
  zacc = warp_reduce<4>(zacc, SumOp<float>());  // head g's Σ P' z over the warp's tokens
  // acc[i][0..3]: (channel lo, head 2r), (lo, 2r + 1), (hi, 2r), (hi, 2r + 1).
  const float z0 = __shfl_sync(0xffffffffu, zacc, 8 * r);      // head 2r lives in lanes 8r..
  const float z1 = __shfl_sync(0xffffffffu, zacc, 8 * r + 4);  // head 2r + 1 in lanes 8r + 4..
  __syncthreads();  // every warp is done reading the probabilities before s_out overwrites them
#pragma unroll
  for (int i = 0; i < kMTiles; ++i) {
    const int lo = kSlice * g + i, hi = lo + kMTiles;
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int h = 2 * r + e;
      const float z = e == 0 ? z0 : z1;
      if (h < Group) {
        s_out[(warp * Group + h) * HeadDim + lo] = acc[i][e] - z;
        s_out[(warp * Group + h) * HeadDim + hi] = acc[i][2 + e] - z;
      }
    }
  }
}

template <typename T, int Bits, int HeadDim, int Group>
__global__ void __launch_bounds__(kThreads) decode_attention_kernel(const DecodeParams p) {
  using Tr = Float16Traits<T>;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ float s_stat[kWarps][Group];
  __shared__ float2 s_max_sum[Group];  // read with run-time head indices at the end
  uint32_t* s_row = reinterpret_cast<uint32_t*>(smem_raw);              // [partition]
  float* s_score = reinterpret_cast<float*>(s_row + p.partition);      // [Group][partition]
  float* s_out = s_score;  // [kWarps][Group][HeadDim], reused after the scores are consumed

  const int b = blockIdx.z, kv_head = blockIdx.y, split = blockIdx.x;
  const int ctx = p.context_lens[b];
  const int begin = visible_begin(ctx, p.window) + split * p.partition;
  const int head0 = kv_head * Group;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;

  if (begin >= ctx || visible_begin(ctx, p.window) + p.num_splits * p.partition < ctx) {
    // Nothing to attend (empty context), or the launch was sized for shorter contexts than this
    // request has: make the output NaN rather than silently wrong.
    if (split == 0 && p.num_splits == 1) {
      const float fill = begin >= ctx ? 0.f : __int_as_float(0x7fc00000);
      for (int e = tid; e < Group * HeadDim; e += kThreads) {
        T* o = static_cast<T*>(p.out) + b * p.out_stride_b + (head0 + e / HeadDim) * p.out_stride_h;
        o[e % HeadDim] = Tr::from_float(fill);
      }
    }
    return;
  }
  const int n = min(p.partition, ctx - begin);

  // Phase 0: cache rows of the partition's tokens.
  const int32_t* pages = p.page_table + static_cast<int64_t>(p.seq_rows[b]) * p.page_table_stride;
  for (int i = tid; i < n; i += kThreads) {
    const int t = begin + i;
    const uint32_t slot =
        static_cast<uint32_t>(pages[t / p.page_size]) * p.page_size + t % p.page_size;
    s_row[i] = kv_head * p.num_slots + slot;
  }

  __syncthreads();

  // Phase 1: scores (log2 domain) of every token of the partition, and each warp's maxima.
  if constexpr (Bits == 4) {
    scores_kv4_mma<T, HeadDim, Group>(p, s_row, s_score, s_stat, n, b, head0);
  } else {
    scores_cuda_cores<T, Bits, HeadDim, Group>(p, s_row, s_score, s_stat, n, b, head0);
  }
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
  if constexpr (Bits == 4) {
    pv_kv4_mma<T, HeadDim, Group>(p, s_row, s_score, s_out, n);
  } else {
    pv_cuda_cores<T, Bits, HeadDim, Group>(p, s_row, s_score, s_out, n);
  }
  __syncthreads();
  for (int e = tid; e < Group * HeadDim; e += kThreads) {
    const int g = e / HeadDim, c = e % HeadDim;
    float o = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) o += s_out[w * Group * HeadDim + e];
    const float2 max_sum = s_max_sum[g];
    o /= max_sum.y;
    const int h = head0 + g;
    if (p.num_splits == 1) {
      T* out = static_cast<T*>(p.out) + b * p.out_stride_b + h * p.out_stride_h;
      out[c] = Tr::from_float(o);
    } else {
      const int64_t slot = (static_cast<int64_t>(b) * p.num_q_heads + h) * p.num_splits + split;
      p.partial_out[slot * HeadDim + c] = o;
      if (c == 0) p.partial_stats[slot] = max_sum;
    }
  }
}

// Merges the partitions of each (request, query head): weights l_s · 2^(m_s − max m).
template <typename T, int HeadDim>
__global__ void __launch_bounds__(HeadDim) combine_kernel(const DecodeParams p) {
  using Tr = Float16Traits<T>;
  const int h = blockIdx.x, b = blockIdx.y, c = threadIdx.x;
  const int ctx = p.context_lens[b];
  const int first = visible_begin(ctx, p.window);
  T* out = static_cast<T*>(p.out) + b * p.out_stride_b + h * p.out_stride_h;
  if (ctx <= first) {
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

template <typename T, int Bits, int HeadDim, int Group>
void launch(const DecodeParams& p, int batch, int kv_heads, size_t smem, cudaStream_t stream) {
  auto kernel = decode_attention_kernel<T, Bits, HeadDim, Group>;
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
  }
  kernel<<<dim3(p.num_splits, kv_heads, batch), kThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (p.num_splits > 1) {
    combine_kernel<T, HeadDim><<<dim3(p.num_q_heads, batch), HeadDim, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename T, int Bits, int HeadDim>
void dispatch_group(const DecodeParams& p, int group, int batch, int kv_heads, size_t smem,
                    cudaStream_t stream) {
  switch (group) {
    case 1: return launch<T, Bits, HeadDim, 1>(p, batch, kv_heads, smem, stream);
    case 2: return launch<T, Bits, HeadDim, 2>(p, batch, kv_heads, smem, stream);
    case 4: return launch<T, Bits, HeadDim, 4>(p, batch, kv_heads, smem, stream);
    case 8: return launch<T, Bits, HeadDim, 8>(p, batch, kv_heads, smem, stream);
    default: OMNI_CHECK(false, "query heads per KV head must be 1, 2, 4 or 8, got ", group);
  }
}

// Launches the kernel (and the combine step) for one storage format; instantiated once per
// format in decode_attention_kv{16,8,4}.cu, so that the three compile in parallel.
template <typename T, int Bits>
void launch_format(const DecodeParams& p, int head_dim, int group, int batch, int kv_heads,
                       size_t smem, cudaStream_t stream) {
  switch (head_dim) {
    case 64: return dispatch_group<T, Bits, 64>(p, group, batch, kv_heads, smem, stream);
    case 128: return dispatch_group<T, Bits, 128>(p, group, batch, kv_heads, smem, stream);
    default: OMNI_CHECK(false, "head_dim must be 64 or 128, got ", head_dim);
  }
}

}  // namespace omniserve::decode
