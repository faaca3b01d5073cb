// Paged decode attention over KV4 rows in one streaming pass (parameters, split ranges and the
// combine step: decode_attention.cuh).
//
// Each warp streams its own 16-token tiles (kTileTokens; tiles w, w + kWarps, ... of the block's
// split) through a private ring of kKv4Stages shared-memory stages filled by cp.async: a tile's K
// codes, V codes and both (scale, zero) arrays are four contiguous runs in global memory, since a
// tile lies in one page. The warp keeps an online softmax (running max and sum per query head)
// and its partial output in registers, so nothing waits on another warp until the block merges
// its warps' results at the end. The copies for kKv4Stages - 1 tiles stay in flight while a tile is
// computed: the memory system never sees the block pause.
//
// Both products run on tensor cores (mma.sync m16n8k16, fp16 in, fp32 accumulate). A LOP3 and an
// HSUB2 turn two nibbles of a word into an exact fp16 pair: 0x6400 | n is the fp16 1024 + n, and
// 0x6400 | n << 4 (the odd nibble of a byte, left in place) is 1024 + 16 n, so a word's eight
// nibbles take one shift. The factors of 16 are undone outside the loop over channels. (Keeping
// the 1024 and subtracting 1024 Σ q once would save the HSUB2s, but the fp32 accumulators would
// then carry terms ~100x the signal and lose its low bits.) Lane (g = lane / 4, r = lane % 4):
// - Scores S = Q Kᵀ as two 8-token mma tiles a and b, query heads as the 16 rows of A (the
//   group's heads in rows 0..Group-1, zero below). Column n of tile a is token 4(n / 2) + n % 2,
//   of tile b that token + 2, so lane (g, r) loads a quarter of the K rows of tokens
//   4(g / 2) + g % 2 (+ 2) and ends holding the scores of head g, tokens 4r .. 4r + 3.
//   The head dimension enters in a permuted order, the queries of odd channels divided by 16
//   (see `load_query_fragments`), so each product is q k or (q / 16)(16 k).
// - Output Oᵀ += Vᵀ P'ᵀ per M-tile of 16 channels, K = the tile's 16 tokens: the B operand is
//   P' = p · v_scale of head g at tokens 4r .. 4r + 3, exactly the scores this lane holds, so
//   probabilities never leave registers. Row g of M-tile i is channel kVSlice · g + i, row g + 8
//   channel kVSlice · g + kMTiles + i; lane (g, r) reads those kVSlice channels of tokens
//   4r .. 4r + 3, and PRMT puts two tokens' bytes side by side so that one conversion makes the
//   fp16 pair (token 4r, 4r + 1) of one channel; odd M-tiles (odd channels) accumulate 16 v and
//   are scaled by 1/16 at the end. The zeros are subtracted once at the end (Σ_t P'_t z_t, with the
//   fp16-rounded P' the mma sees).
#pragma once

#include "common/async_copy.cuh"
#include "common/decode_attention.cuh"

namespace omniserve::decode {

constexpr int kKv4Stages = 4;

// The fp16 pair (n0, n1) of the nibbles at bits 0..3 and 16..19 of x (Odd false), or
// (16 n0, 16 n1) of those at bits 4..7 and 20..23 (Odd true).
template <bool Odd>
__device__ __forceinline__ uint32_t nibbles_to_half2(uint32_t x) {
  uint32_t v;
  asm("lop3.b32 %0, %1, %2, %3, 0xea;"  // (a & b) | c: 1024 + n or 1024 + 16 n
      : "=r"(v)
      : "r"(x), "r"(Odd ? 0x00F000F0u : 0x000F000Fu), "r"(0x64006400u));
  const __half2 h = __hsub2(*reinterpret_cast<const __half2*>(&v), __float2half2_rn(1024.f));
  return *reinterpret_cast<const uint32_t*>(&h);
}

__device__ __forceinline__ void mma_f16(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                        uint32_t a3, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

template <int HeadDim>
struct Kv4Tile {
  static constexpr int kRowBytes = HeadDim / 2;
  static constexpr int kKSlice = HeadDim / 4;  // K channels per lane (scores)
  static constexpr int kVSlice = HeadDim / 8;  // V channels per lane (output)
  static constexpr int kMTiles = HeadDim / 16;
  // Stage layout: K rows, V rows, K (scale, zero), V (scale, zero) of the tile's tokens.
  static constexpr int kK = 0;
  static constexpr int kV = kK + kTileTokens * kRowBytes;
  static constexpr int kKParams = kV + kTileTokens * kRowBytes;
  static constexpr int kVParams = kKParams + kTileTokens * 4;
  static constexpr int kBytes = kVParams + kTileTokens * 4;
  static constexpr int kRowChunks = kTileTokens * kRowBytes / 16;  // 16-byte copies per K or V
  static constexpr int kParamChunks = kTileTokens * 4 / 16;
  static_assert(kRowChunks % 32 == 0 && 2 * kParamChunks <= 32, "copies split evenly over lanes");
};

// Starts this lane's share of the copies of the tile whose first token is cache row `row0`.
template <int HeadDim>
__device__ __forceinline__ void copy_tile(const DecodeParams& p, uint32_t row0,
                                          unsigned char* stage, int lane) {
  using L = Kv4Tile<HeadDim>;
  const int64_t row_offset = static_cast<int64_t>(row0) * L::kRowBytes;
#pragma unroll
  for (int i = 0; i < L::kRowChunks / 32; ++i) {
    const int c = lane + 32 * i;
    cp_async16(stage + L::kK + 16 * c, p.k + row_offset + 16 * c);
    cp_async16(stage + L::kV + 16 * c, p.v + row_offset + 16 * c);
  }
  if (lane < 2 * L::kParamChunks) {
    const bool v = lane >= L::kParamChunks;
    const int c = v ? lane - L::kParamChunks : lane;
    cp_async16(stage + (v ? L::kVParams : L::kKParams) + 16 * c,
               (v ? p.v_params : p.k_params) + row0 + 4 * c);
  }
}

// A fragments of Q for the score mma: row g is query head g (zero for g >= Group); step
// s = 2w + h takes channels (8w + 2h, 8w + 2h + 4) and, divided by 16, (8w + 2h + 1, 8w + 2h + 5)
// of this lane's kKSlice channels: the order and scale in which the K nibbles unpack. Queries
// enter as fp16 (exact for fp16, and for bf16 in fp16's range; q / 16 is exact unless subnormal).
// `qsum` is head g's Σ q of those fp16 values.
template <typename T, int HeadDim, int Group>
__device__ __forceinline__ void load_query_fragments(const DecodeParams& p, int b, int head0,
                                                     int g, int r, uint32_t (&qa)[HeadDim / 16][2],
                                                     float& qsum) {
  using Tr = Float16Traits<T>;
  constexpr int kSlice = Kv4Tile<HeadDim>::kKSlice;
  const T* qrow = static_cast<const T*>(p.q) + b * p.q_stride_b +
                  (head0 + min(g, Group - 1)) * p.q_stride_h + r * kSlice;
  qsum = 0.f;
#pragma unroll
  for (int w = 0; w < kSlice / 8; ++w) {
    const Vec8<T> x = reinterpret_cast<const Vec8<T>*>(qrow)[w];
    __half f[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      f[i] = __float2half_rn(g < Group ? Tr::to_float(x.v[i]) : 0.f);
      qsum += __half2float(f[i]);
      if (i % 2 == 1) f[i] = __hmul(f[i], __float2half_rn(0.0625f));  // odd channels: q / 16
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const __half2 lo = __halves2half2(f[2 * h], f[2 * h + 4]);
      const __half2 hi = __halves2half2(f[2 * h + 1], f[2 * h + 5]);
      qa[2 * w + h][0] = *reinterpret_cast<const uint32_t*>(&lo);
      qa[2 * w + h][1] = *reinterpret_cast<const uint32_t*>(&hi);
    }
  }
  qsum = warp_reduce<4>(qsum, SumOp<float>());  // the quad holds head g's whole row
}

// One warp's running state: per query head g (quad-uniform) the max and this lane's share of the
// sum and of Σ P' z; per head 2r, 2r + 1 the output accumulators.
template <int HeadDim>
struct Kv4Accumulator {
  float m = -INFINITY, l = 0.f, zacc = 0.f;
  float acc[HeadDim / 16][4] = {};
};

// Attends the tile in `stage` (first token at position t0; positions outside [lo, hi) masked).
template <int HeadDim>
__device__ __forceinline__ void attend_tile(const unsigned char* stage, int t0, int lo, int hi,
                                            const uint32_t (&qa)[HeadDim / 16][2], float qsum,
                                            float scale_log2, int g, int r,
                                            Kv4Accumulator<HeadDim>& st) {
  using L = Kv4Tile<HeadDim>;
  constexpr int kKWords = L::kKSlice / 8, kVWords = L::kVSlice / 8;
  const __half2* k_params = reinterpret_cast<const __half2*>(stage + L::kKParams);
  const __half2* v_params = reinterpret_cast<const __half2*>(stage + L::kVParams);

  // Scores of head g, tokens 4r .. 4r + 3 (tile a columns 2r, 2r + 1, then tile b's).
  float c[2][4] = {};
  const int ka = 4 * (g / 2) + g % 2;
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const Chunk<L::kKSlice / 2> k = *reinterpret_cast<const Chunk<L::kKSlice / 2>*>(
        stage + L::kK + (ka + 2 * j) * L::kRowBytes + r * (L::kKSlice / 2));
#pragma unroll
    for (int w = 0; w < kKWords; ++w) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const uint32_t x = k.w[w] >> (8 * h);
        mma_f16(c[j], qa[2 * w + h][0], 0u, qa[2 * w + h][1], 0u, nibbles_to_half2<false>(x),
                nibbles_to_half2<true>(x));
      }
    }
  }
  float s[4];
  bool valid[4];
  float tile_max = -INFINITY;
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const int t = t0 + 4 * r + e;
    valid[e] = t >= lo && t < hi;
    const float2 kp = __half22float2(k_params[4 * r + e]);
    s[e] = valid[e] ? scale_log2 * kp.x * (c[e / 2][e % 2] - kp.y * qsum) : -INFINITY;
    tile_max = fmaxf(tile_max, s[e]);
  }

  // Online softmax: rescale what the warp has so far when head g's max grows.
  const float m_new = fmaxf(st.m, warp_reduce<4>(tile_max, MaxOp()));
  const float m_base = m_new == -INFINITY ? 0.f : m_new;  // no visible token yet: all p are 0
  const float alpha = exp2f(st.m - m_base);
  st.m = m_new;
  __half ph[4];
  float l = 0.f, z = 0.f;
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const float pr = exp2f(s[e] - m_base);
    l += pr;
    const float2 vp = __half22float2(v_params[4 * r + e]);
    ph[e] = __float2half_rn(valid[e] ? pr * vp.x : 0.f);
    if (valid[e]) z = fmaf(__half2float(ph[e]), vp.y, z);
  }
  st.l = fmaf(st.l, alpha, l);
  st.zacc = fmaf(st.zacc, alpha, z);
  if (__any_sync(0xffffffffu, alpha != 1.f)) {
    const float a0 = __shfl_sync(0xffffffffu, alpha, 8 * r);      // head 2r lives in lanes 8r..
    const float a1 = __shfl_sync(0xffffffffu, alpha, 8 * r + 4);  // head 2r + 1 in lanes 8r + 4..
#pragma unroll
    for (int i = 0; i < L::kMTiles; ++i) {
      st.acc[i][0] *= a0;
      st.acc[i][1] *= a1;
      st.acc[i][2] *= a0;
      st.acc[i][3] *= a1;
    }
  }

  // P·V: pairs01[c] = (token 4r, 4r + 1) and pairs23[c] = (4r + 2, 4r + 3) at slice channel c.
  Chunk<L::kVSlice / 2> v[4];
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    v[e] = *reinterpret_cast<const Chunk<L::kVSlice / 2>*>(
        stage + L::kV + (4 * r + e) * L::kRowBytes + g * (L::kVSlice / 2));
  }
  uint32_t pairs01[L::kVSlice], pairs23[L::kVSlice];
#pragma unroll
  for (int w = 0; w < kVWords; ++w) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const uint32_t sel = h == 0 ? 0x5410u : 0x7632u;  // bytes 0-1 or 2-3 of both words
      const uint32_t y01 = __byte_perm(v[0].w[w], v[1].w[w], sel);
      const uint32_t y23 = __byte_perm(v[2].w[w], v[3].w[w], sel);
#pragma unroll
      for (int i = 0; i < 4; i += 2) {  // channels i (as is) and i + 1 (times 16)
        const int c = 8 * w + 4 * h + i;
        pairs01[c] = nibbles_to_half2<false>(y01 >> (4 * i));
        pairs01[c + 1] = nibbles_to_half2<true>(y01 >> (4 * i));
        pairs23[c] = nibbles_to_half2<false>(y23 >> (4 * i));
        pairs23[c + 1] = nibbles_to_half2<true>(y23 >> (4 * i));
      }
    }
  }
  const __half2 pb0 = __halves2half2(ph[0], ph[1]), pb1 = __halves2half2(ph[2], ph[3]);
  const uint32_t b0 = *reinterpret_cast<const uint32_t*>(&pb0);
  const uint32_t b1 = *reinterpret_cast<const uint32_t*>(&pb1);
#pragma unroll
  for (int i = 0; i < L::kMTiles; ++i) {
    mma_f16(st.acc[i], pairs01[i], pairs01[L::kMTiles + i], pairs23[i], pairs23[L::kMTiles + i],
            b0, b1);
  }
}

template <typename T, int HeadDim, int Group, bool Streaming>
__global__ void __launch_bounds__(kThreads) decode_attention_kv4_kernel(const DecodeParams p) {
  static_assert(Group <= 8, "one 8-row half of the score tile, and the N of the output mma");
  using L = Kv4Tile<HeadDim>;
  __shared__ __align__(16) unsigned char s_ring[kWarps][kKv4Stages][L::kBytes];
  __shared__ float2 s_max_sum[kWarps][Group];
  extern __shared__ uint32_t s_tile_row[];  // [partition / kTileTokens]: cache row of each tile

  const int b = blockIdx.z, kv_head = blockIdx.y, split = blockIdx.x;
  const HeadRows rows = head_rows<Streaming>(p, b, kv_head);
  const SplitRange range = split_range(p, rows, split);
  const int head0 = kv_head * Group;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, r = lane % 4;
  if (range.lo >= range.hi || !range.covered) {
    write_unattended<T, HeadDim, Group>(p, b, head0, split, range.covered);
    return;
  }
  const int num_tiles = (range.hi - range.begin + kTileTokens - 1) / kTileTokens;
  for (int i = tid; i < num_tiles; i += kThreads) {
    s_tile_row[i] = cache_row(rows, p.page_size, range.begin + i * kTileTokens);
  }
  __syncthreads();

  // The warp's k-th tile is tile warp + k · kWarps, in stage k % kKv4Stages. Every lane commits
  // one group per tile slot, empty past the end, so that wait_group counts stay aligned.
  auto issue = [&](int k) {
    const int tile = warp + k * kWarps;
    if (tile < num_tiles) {
      copy_tile<HeadDim>(p, s_tile_row[tile], s_ring[warp][k % kKv4Stages], lane);
    }
    cp_async_commit();
  };
#pragma unroll
  for (int k = 0; k < kKv4Stages - 1; ++k) issue(k);

  uint32_t qa[HeadDim / 16][2];
  float qsum;
  load_query_fragments<T, HeadDim, Group>(p, b, head0, g, r, qa, qsum);
  Kv4Accumulator<HeadDim> st;
  for (int k = 0; warp + k * kWarps < num_tiles; ++k) {
    cp_async_wait<kKv4Stages - 2>();  // this lane's copies of tile k have landed
    __syncwarp();                     // ... every lane's, and every lane is done with tile k - 1
    issue(k + kKv4Stages - 1);        // into the stage tile k - 1 used
    const int t0 = range.begin + (warp + k * kWarps) * kTileTokens;
    attend_tile<HeadDim>(s_ring[warp][k % kKv4Stages], t0, range.lo, range.hi, qa, qsum,
                         p.scale_log2, g, r, st);
  }
  cp_async_wait<0>();

  // Merge the warps: head g's sum and Σ P' z over its quad, then the output less the zeros' share.
  st.l = warp_reduce<4>(st.l, SumOp<float>());
  st.zacc = warp_reduce<4>(st.zacc, SumOp<float>());
  const float z0 = __shfl_sync(0xffffffffu, st.zacc, 8 * r);
  const float z1 = __shfl_sync(0xffffffffu, st.zacc, 8 * r + 4);
  __syncthreads();  // every warp is done with its ring, which s_out reuses
  float* s_out = reinterpret_cast<float*>(&s_ring[0][0][0]);  // [kWarps][Group][HeadDim]
  static_assert(sizeof(float) * kWarps * Group * HeadDim <= sizeof(s_ring), "s_out fits the ring");
  if (r == 0 && g < Group) s_max_sum[warp][g] = make_float2(st.m, st.l);
#pragma unroll
  for (int i = 0; i < L::kMTiles; ++i) {
    const int lo = L::kVSlice * g + i, hi = lo + L::kMTiles;
    const float unscale = i % 2 == 1 ? 0.0625f : 1.f;  // odd channels accumulated 16 v
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int h = 2 * r + e;
      const float z = e == 0 ? z0 : z1;
      if (h < Group) {
        s_out[(warp * Group + h) * HeadDim + lo] = st.acc[i][e] * unscale - z;
        s_out[(warp * Group + h) * HeadDim + hi] = st.acc[i][2 + e] * unscale - z;
      }
    }
  }
  __syncthreads();
  for (int e = tid; e < Group * HeadDim; e += kThreads) {
    const int h = e / HeadDim, c = e % HeadDim;
    float m = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) m = fmaxf(m, s_max_sum[w][h].x);
    float o = 0.f, l = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float weight = exp2f(s_max_sum[w][h].x - m);  // 0 for a warp that saw no token
      o = fmaf(weight, s_out[w * Group * HeadDim + e], o);
      l = fmaf(weight, s_max_sum[w][h].y, l);
    }
    store_result<T, HeadDim>(p, b, head0 + h, split, c, o / l, make_float2(m, l));
  }
}

}  // namespace omniserve::decode
