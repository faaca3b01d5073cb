// Fused RoPE + KV cache write of one attention layer's step (python/omniserve/kernels/rope_kv.py).
//
// One launch does, for every token t of the step:
//   q_out[t] = rope(q[t]) for every query head, and k_rot[t] = rope(k[t]) for every KV head
//     (layers/rotary.apply_rotary: y1 = x1·cos − x2·sin, y2 = x2·cos + x1·sin on the two halves of
//     head_dim, every product and sum rounded to the compute dtype, as each torch op rounds);
//   K and V cache rows write_index[h, t] <- k_rot[t, h], v[t, h], in the cache's format (KVFormat):
//     values in the compute dtype; formats/kv.quantize_kv codes (uint8; KV4 packs channel pairs,
//     even channel in the low nibble) with an fp16 (scale, zero) per row; or per-tensor static
//     KV8, formats/kv.quantize_kv_static int8 codes under the cache's one fp32 scale, which the
//     kernel reads from device memory (no host sync, so the launch can be captured in a graph);
//     or per-tensor FP8, formats/kv.quantize_kv_fp8 e4m3 codes under such a scale;
//   k_out, v_out = what reads of those rows return (dequantize_kv, dequantize_kv_static or
//     dequantize_kv_fp8 of the stored codes; a dense cache returns k_rot and v themselves),
//     which prefill attention consumes.
// The arithmetic is the references' as torch runs them on the GPU, op for op: IEEE division and
// explicitly rounded adds and multiplies (nothing contracted into an FMA or approximated), round
// half to even, the same clamps, and (hi − lo) / Q as (hi − lo) · fl(1 / Q), because torch's CUDA
// division by a Python number multiplies by its reciprocal (on the CPU it divides; the two can
// differ in the last bit, and so, rarely, in the fp16 scale). Division by the static scale, a
// CUDA tensor, is a true division in torch (only a CPU scalar divisor takes the reciprocal path),
// so the kernel divides there. Codes, parameters and outputs therefore equal the reference's on
// the GPU bit for bit; the one freedom is the sign of a zero `zero` parameter when a row's
// minimum is a signed zero, which torch itself leaves to its reduction order (both signs
// dequantize to the same bits).
//
// Key statistics (decode steps with page selection, formats/page_selection.py): with `stats`, each
// key row r written for a KV head that keeps them also lands in stat row r / logical_tokens, as
// update_key_stats folds it: (k, k) where r is its logical page's first slot, else the channel-wise
// min and max with what the row holds, k being the key as reads of the cache return it (k_out).
// That is a plain read-modify-write, so the launch must not write two keys to one logical page,
// except to its first slot (the padding tokens of a step, which all write the null page's, whose
// statistics are then undefined: nothing scores it); the caller decides when that holds (a step
// of decodes only).
//
// Work split: a "row" is one head of one token, query, key or value (heads + 2·kv_heads rows per
// token). A group of kLanes consecutive lanes owns a row; each lane holds kPerLane consecutive
// channels of both halves, so it has both members of each rotation pair it computes and, kPerLane
// being even, whole KV4 bytes. A per-row quantized row's min and max reduce across its lane group
// by shuffles. The grid is tokens × (row blocks), so a small decode batch still fills the GPU.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/macros/Macros.h>
#include <cuda_fp8.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "common/check.h"
#include "common/dtype.cuh"
#include "common/kv_format.h"
#include "common/kv_operands.h"
#include "common/reduce.cuh"

namespace omniserve {
namespace {

constexpr float kMinKVScale = 6.103515625e-05f;  // 2^-14, formats/kv.py's scale floor
constexpr float kStaticKVQMax = 127.f;            // formats/kv.STATIC_KV_QMAX
constexpr float kFp8Max = 448.f;                  // formats/fp8.FP8_MAX
constexpr int kWarpsPerBlock = 4;

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <typename T>
struct RopeKVArgs {
  const T* q;  // [tokens, heads, head_dim], channels contiguous
  const T* k;  // [tokens, kv_heads, head_dim]
  const T* v;
  int64_t q_token_stride, q_head_stride;
  int64_t k_token_stride, k_head_stride;
  int64_t v_token_stride, v_head_stride;
  const T* cos;  // [tokens, head_dim / 2] rows
  const T* sin;
  int64_t cos_token_stride, sin_token_stride;
  const int64_t* write_index;  // [kv_heads, tokens]
  int64_t index_head_stride, index_token_stride;
  T* q_out;  // contiguous [tokens, heads, head_dim]
  T* k_out;  // contiguous [tokens, kv_heads, head_dim]
  T* v_out;  // likewise; quantized caches only (a dense cache returns v itself)
  void* k_cache;  // [cache_rows, head_dim] values, or [cache_rows, packed] codes
  void* v_cache;
  __half2* k_params;  // [cache_rows] (scale, zero), per-row quantized caches only
  __half2* v_params;
  const float* k_scale;  // the cache's scale, static KV8 only
  const float* v_scale;
  int64_t cache_rows;
  int num_heads, num_kv_heads;
  // Key statistics: null without them.
  T* stats;                  // [stat rows, 2 (min, max), head_dim]
  const bool* stat_heads;    // [kv_heads]: the heads that keep them
  int64_t logical_tokens;    // cache rows per stat row
};

// x as the compute dtype holds it: what a torch op writing x to a T tensor leaves.
template <typename T>
__device__ __forceinline__ float round_to(float x) {
  using Tr = Float16Traits<T>;
  return Tr::to_float(Tr::from_float(x));
}

template <typename T, int N>
__device__ __forceinline__ void load_floats(const T* src, float (&out)[N]) {
  const Vec<T, N> x = *reinterpret_cast<const Vec<T, N>*>(src);
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = Float16Traits<T>::to_float(x.v[i]);
}

// Stores values that are exactly representable in T (already rounded).
template <typename T, int N>
__device__ __forceinline__ void store_floats(T* dst, const float* x) {
  Vec<T, N> y;
#pragma unroll
  for (int i = 0; i < N; ++i) y.v[i] = Float16Traits<T>::from_float(x[i]);
  *reinterpret_cast<Vec<T, N>*>(dst) = y;
}

// Folds this lane's channels k of a key written at `cache_row` (values of T; the first kPerLane at
// c0 of the first half, the others of the second) into its logical page's statistics.
template <typename T, int kHeadDim, int kPerLane>
__device__ __forceinline__ void fold_key_stats(const RopeKVArgs<T>& a, int64_t cache_row, int c0,
                                               const float (&k)[2 * kPerLane]) {
  constexpr int kHalf = kHeadDim / 2;
  const bool reset = cache_row % a.logical_tokens == 0;
  T* lo = a.stats + cache_row / a.logical_tokens * (2 * kHeadDim);
  T* hi = lo + kHeadDim;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int c = h * kHalf + c0;
    float mn[kPerLane], mx[kPerLane];
    if (!reset) {
      load_floats<T, kPerLane>(lo + c, mn);
      load_floats<T, kPerLane>(hi + c, mx);
    }
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const float x = k[h * kPerLane + i];
      mn[i] = reset ? x : fminf(mn[i], x);
      mx[i] = reset ? x : fmaxf(mx[i], x);
    }
    store_floats<T, kPerLane>(lo + c, mn);
    store_floats<T, kPerLane>(hi + c, mx);
  }
}

template <typename T, int kHeadDim, KVFormat kFormat>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    rope_kv_write_kernel(const RopeKVArgs<T> a) {
  constexpr int kHalf = kHeadDim / 2;
  constexpr int kPerLane = kHeadDim <= 128 ? 2 : kHeadDim / 64;  // channels per half
  constexpr int kLanes = kHalf / kPerLane;                        // lanes per row
  constexpr int kRowsPerWarp = 32 / kLanes;
  static_assert(kPerLane % 2 == 0 && 32 % kLanes == 0, "unsupported head_dim");

  const int64_t t = blockIdx.x;
  const int lane = threadIdx.x % 32;
  const int row =
      (blockIdx.y * kWarpsPerBlock + threadIdx.x / 32) * kRowsPerWarp + lane / kLanes;
  const int c0 = (lane % kLanes) * kPerLane;  // this lane's first channel in each half
  const int heads = a.num_heads, kv_heads = a.num_kv_heads;
  const bool is_q = row < heads;
  const bool is_k = !is_q && row < heads + kv_heads;
  const bool is_v = !is_q && !is_k && row < heads + 2 * kv_heads;
  const int head = is_q ? row : is_k ? row - heads : row - heads - kv_heads;

  // y[0, kPerLane): channels c0.. of the first half; y[kPerLane, 2·kPerLane): of the second.
  // Lanes past the last row keep zeros: they take part in the shuffles but store nothing.
  float y[2 * kPerLane] = {};
  if (is_q || is_k || is_v) {
    const T* src = is_q   ? a.q + t * a.q_token_stride + head * a.q_head_stride
                   : is_k ? a.k + t * a.k_token_stride + head * a.k_head_stride
                          : a.v + t * a.v_token_stride + head * a.v_head_stride;
    float x1[kPerLane], x2[kPerLane];
    load_floats(src + c0, x1);
    load_floats(src + kHalf + c0, x2);
    if (is_v) {
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) y[i] = x1[i], y[kPerLane + i] = x2[i];
    } else {
      float cos[kPerLane], sin[kPerLane];
      load_floats(a.cos + t * a.cos_token_stride + c0, cos);
      load_floats(a.sin + t * a.sin_token_stride + c0, sin);
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) {
        y[i] = round_to<T>(__fsub_rn(round_to<T>(__fmul_rn(x1[i], cos[i])),
                                     round_to<T>(__fmul_rn(x2[i], sin[i]))));
        y[kPerLane + i] = round_to<T>(__fadd_rn(round_to<T>(__fmul_rn(x2[i], cos[i])),
                                                round_to<T>(__fmul_rn(x1[i], sin[i]))));
      }
    }
  }
  if (is_q) {
    T* dst = a.q_out + (t * heads + head) * kHeadDim;
    store_floats<T, kPerLane>(dst + c0, y);
    store_floats<T, kPerLane>(dst + kHalf + c0, y + kPerLane);
  }

  const bool is_kv = is_k || is_v;
  int64_t cache_row = 0;
  if (is_kv) {
    cache_row = a.write_index[head * a.index_head_stride + t * a.index_token_stride];
    CUDA_KERNEL_ASSERT(cache_row >= 0 && cache_row < a.cache_rows);
  }
  const int64_t out_offset = (t * kv_heads + head) * kHeadDim;  // in k_out / v_out
  const bool keeps_stats = is_k && a.stats != nullptr && a.stat_heads[head];

  if constexpr (kFormat == KVFormat::kDense) {
    if (is_kv) {
      T* dst = static_cast<T*>(is_k ? a.k_cache : a.v_cache) + cache_row * kHeadDim;
      store_floats<T, kPerLane>(dst + c0, y);
      store_floats<T, kPerLane>(dst + kHalf + c0, y + kPerLane);
      if (is_k) {
        store_floats<T, kPerLane>(a.k_out + out_offset + c0, y);
        store_floats<T, kPerLane>(a.k_out + out_offset + kHalf + c0, y + kPerLane);
      }
      if (keeps_stats) fold_key_stats<T, kHeadDim, kPerLane>(a, cache_row, c0, y);
    }
  } else {
    constexpr bool kPerRow = !kIsStatic<kFormat>;
    constexpr int kBits = kBitsOf<kFormat>;
    constexpr int kLevels = (1 << kBits) - 1;
    constexpr float kInvLevels = 1.0f / kLevels;  // rounded once, as torch rounds 1 / Q
    constexpr int kPackedDim = kHeadDim * kBits / 8;
    // Starting from 0 gives quantize_kv's range min(min(x), 0) .. max(max(x), 0) directly.
    float lo = 0.f, hi = 0.f;
    if constexpr (kPerRow) {
#pragma unroll
      for (int i = 0; i < 2 * kPerLane; ++i) lo = fminf(lo, y[i]), hi = fmaxf(hi, y[i]);
      lo = warp_reduce<kLanes>(lo, MinOp());
      hi = warp_reduce<kLanes>(hi, MaxOp());
    }
    if (is_kv) {
      uint8_t q[2 * kPerLane];  // code bytes (static KV8: the int8 codes' two's complement; FP8:
                                // e4m3 bits)
      float x_hat[2 * kPerLane];
      __half scale_h, zero_h;  // per-row formats' parameters
      if constexpr (kPerRow) {
        scale_h = __float2half_rn(fmaxf(__fmul_rn(__fsub_rn(hi, lo), kInvLevels), kMinKVScale));
        const float scale = __half2float(scale_h);
        zero_h = __float2half_rn(__fdiv_rn(-lo, scale));
        const float zero = __half2float(zero_h);
#pragma unroll
        for (int i = 0; i < 2 * kPerLane; ++i) {
          const float c = rintf(__fadd_rn(__fdiv_rn(y[i], scale), zero));
          q[i] = static_cast<uint8_t>(fminf(fmaxf(c, 0.f), static_cast<float>(kLevels)));
          x_hat[i] = __fmul_rn(__fsub_rn(static_cast<float>(q[i]), zero), scale);
        }
      } else if constexpr (kFormat == KVFormat::kStaticFP8) {
        const float scale = *(is_k ? a.k_scale : a.v_scale);
#pragma unroll
        for (int i = 0; i < 2 * kPerLane; ++i) {
          // formats/fp8.to_fp8: y / s clamped to ±448, then e4m3 round-to-nearest-even.
          const float x = fminf(fmaxf(__fdiv_rn(y[i], scale), -kFp8Max), kFp8Max);
          q[i] = __nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3);
          x_hat[i] = __fmul_rn(
              __half2float(__half(__nv_cvt_fp8_to_halfraw(q[i], __NV_E4M3))), scale);
        }
      } else {
        const float scale = *(is_k ? a.k_scale : a.v_scale);
#pragma unroll
        for (int i = 0; i < 2 * kPerLane; ++i) {
          const int code = static_cast<int>(
              fminf(fmaxf(rintf(__fdiv_rn(y[i], scale)), -kStaticKVQMax), kStaticKVQMax));
          q[i] = static_cast<uint8_t>(code);
          // From the integer code, as a read dequantizes it: a y that rounds to −0 reads back +0.
          x_hat[i] = __fmul_rn(static_cast<float>(code), scale);
        }
      }
      uint8_t* dst = static_cast<uint8_t*>(is_k ? a.k_cache : a.v_cache) + cache_row * kPackedDim;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const uint8_t* qh = q + h * kPerLane;
        if constexpr (kBits == 8) {
          Vec<uint8_t, kPerLane> bytes;
#pragma unroll
          for (int i = 0; i < kPerLane; ++i) bytes.v[i] = qh[i];
          *reinterpret_cast<Vec<uint8_t, kPerLane>*>(dst + h * kHalf + c0) = bytes;
        } else {
          Vec<uint8_t, kPerLane / 2> bytes;
#pragma unroll
          for (int i = 0; i < kPerLane / 2; ++i) bytes.v[i] = qh[2 * i] | (qh[2 * i + 1] << 4);
          *reinterpret_cast<Vec<uint8_t, kPerLane / 2>*>(dst + (h * kHalf + c0) / 2) = bytes;
        }
      }
      if constexpr (kPerRow) {
        if (lane % kLanes == 0) {
          (is_k ? a.k_params : a.v_params)[cache_row] = __halves2half2(scale_h, zero_h);
        }
      }
      T* out = (is_k ? a.k_out : a.v_out) + out_offset;
      store_floats<T, kPerLane>(out + c0, x_hat);
      store_floats<T, kPerLane>(out + kHalf + c0, x_hat + kPerLane);
      if (keeps_stats) {
#pragma unroll
        for (int i = 0; i < 2 * kPerLane; ++i) x_hat[i] = round_to<T>(x_hat[i]);  // as k_out holds
        fold_key_stats<T, kHeadDim, kPerLane>(a, cache_row, c0, x_hat);
      }
    }
  }
}

template <typename T, int kHeadDim, KVFormat kFormat>
void launch(const RopeKVArgs<T>& args, int64_t tokens, cudaStream_t stream) {
  constexpr int kPerLane = kHeadDim <= 128 ? 2 : kHeadDim / 64;
  constexpr int kRowsPerWarp = 32 / (kHeadDim / 2 / kPerLane);
  constexpr int kRowsPerBlock = kWarpsPerBlock * kRowsPerWarp;
  const int rows = args.num_heads + 2 * args.num_kv_heads;
  const dim3 grid(static_cast<unsigned>(tokens), (rows + kRowsPerBlock - 1) / kRowsPerBlock);
  rope_kv_write_kernel<T, kHeadDim, kFormat><<<grid, kWarpsPerBlock * 32, 0, stream>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, KVFormat kFormat>
void launch_for_head_dim(const RopeKVArgs<T>& args, int64_t tokens, int64_t head_dim,
                         cudaStream_t stream) {
  switch (head_dim) {
    case 64: return launch<T, 64, kFormat>(args, tokens, stream);
    case 128: return launch<T, 128, kFormat>(args, tokens, stream);
    case 256: return launch<T, 256, kFormat>(args, tokens, stream);
    default: OMNI_CHECK(false, "head_dim must be 64, 128 or 256, got ", head_dim);
  }
}

// q, k or v [tokens, heads, head_dim] with channels contiguous and every row aligned for the
// kernel's kPerLane-channel accesses (views into the fused qkv projection qualify).
void check_heads(const at::Tensor& x, const char* name, const at::Tensor& q, int64_t heads) {
  OMNI_CHECK(x.device() == q.device(), name, " must be on ", q.device(), ", got ", x.device());
  OMNI_CHECK(x.scalar_type() == q.scalar_type(), name, " must have q's dtype ", q.scalar_type(),
             ", got ", x.scalar_type());
  OMNI_CHECK(x.dim() == 3 && x.size(0) == q.size(0) && x.size(1) == heads &&
                 x.size(2) == q.size(2),
             name, " must be [tokens, heads, head_dim] matching q ", q.sizes(), ", got shape ",
             x.sizes());
  const int64_t per_lane = x.size(2) <= 128 ? 2 : x.size(2) / 64;
  OMNI_CHECK(x.stride(2) == 1 && x.stride(1) % per_lane == 0 && x.stride(0) % per_lane == 0 &&
                 reinterpret_cast<std::uintptr_t>(x.data_ptr()) % (per_lane * x.element_size()) ==
                     0,
             name, " must have contiguous channels and head/token strides that are multiples of ",
             per_lane, " elements, got strides ", x.strides());
}

// cos or sin [tokens, 1, head_dim / 2] as RotaryEmbedding returns them.
void check_angles(const at::Tensor& x, const char* name, const at::Tensor& q) {
  OMNI_CHECK(x.device() == q.device(), name, " must be on ", q.device(), ", got ", x.device());
  OMNI_CHECK(x.scalar_type() == q.scalar_type(), name, " must have q's dtype ", q.scalar_type(),
             ", got ", x.scalar_type());
  OMNI_CHECK(x.dim() == 3 && x.size(0) == q.size(0) && x.size(1) == 1 &&
                 x.size(2) * 2 == q.size(2),
             name, " must be [tokens, 1, head_dim / 2] = [", q.size(0), ", 1, ", q.size(2) / 2,
             "], got shape ", x.sizes());
  const int64_t per_lane = q.size(2) <= 128 ? 2 : q.size(2) / 64;
  OMNI_CHECK(x.stride(2) == 1 && x.stride(0) % per_lane == 0 &&
                 reinterpret_cast<std::uintptr_t>(x.data_ptr()) % (per_lane * x.element_size()) ==
                     0,
             name, " must have contiguous channels and a token stride that is a multiple of ",
             per_lane, " elements, got strides ", x.strides());
}

}  // namespace

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
                                      int64_t logical_tokens) {
  OMNI_CHECK(q.is_cuda(), "q must be a CUDA tensor, got device ", q.device());
  OMNI_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
             "q must be float16 or bfloat16, got ", q.scalar_type());
  OMNI_CHECK(q.dim() == 3, "q must be [tokens, heads, head_dim], got shape ", q.sizes());
  const int64_t tokens = q.size(0), heads = q.size(1), head_dim = q.size(2);
  OMNI_CHECK(head_dim == 64 || head_dim == 128 || head_dim == 256,
             "head_dim must be 64, 128 or 256, got ", head_dim);
  check_heads(q, "q", q, heads);
  OMNI_CHECK(k.dim() == 3, "k must be [tokens, kv_heads, head_dim], got shape ", k.sizes());
  const int64_t kv_heads = k.size(1);
  check_heads(k, "k", q, kv_heads);
  check_heads(v, "v", q, kv_heads);
  OMNI_CHECK(heads > 0 && heads <= 65535 && kv_heads > 0 && kv_heads <= 65535,
             "need 1 to 65535 query heads and KV heads, got ", heads, " and ", kv_heads);
  OMNI_CHECK(tokens <= 0x7fffffff, "too many tokens for one launch: ", tokens);
  check_angles(cos, "cos", q);
  check_angles(sin, "sin", q);
  OMNI_CHECK(write_index.device() == q.device() && write_index.scalar_type() == at::kLong &&
                 write_index.dim() == 2 && write_index.size(0) == kv_heads &&
                 write_index.size(1) == tokens,
             "write_index must be int64 [kv_heads, tokens] = [", kv_heads, ", ", tokens, "] on ",
             q.device(), ", got ", write_index.scalar_type(), " ", write_index.sizes(), " on ",
             write_index.device());

  const KVFormat format = check_kv_operands(k_cache, v_cache, k_params, v_params, k_scale,
                                            v_scale, head_dim, q.scalar_type(), q.device());
  const bool quantized = format != KVFormat::kDense;
  OMNI_CHECK(stats.has_value() == stat_heads.has_value(),
             "pass both stats and stat_heads or neither");
  if (stats.has_value()) {
    OMNI_CHECK(logical_tokens > 0, "logical_tokens must be positive, got ", logical_tokens);
    const int64_t stat_rows = (k_cache.size(0) + logical_tokens - 1) / logical_tokens;
    OMNI_CHECK(stats->device() == q.device() && stats->scalar_type() == q.scalar_type() &&
                   stats->dim() == 3 && stats->size(0) >= stat_rows && stats->size(1) == 2 &&
                   stats->size(2) == head_dim && stats->is_contiguous(),
               "stats must be contiguous ", q.scalar_type(), " [rows >= ", stat_rows, ", 2, ",
               head_dim, "] on ", q.device(), ", got ", stats->scalar_type(), " ", stats->sizes(),
               " on ", stats->device());
    OMNI_CHECK(stat_heads->device() == q.device() && stat_heads->scalar_type() == at::kBool &&
                   stat_heads->dim() == 1 && stat_heads->size(0) == kv_heads &&
                   stat_heads->is_contiguous(),
               "stat_heads must be a contiguous bool vector of ", kv_heads, " entries on ",
               q.device(), ", got ", stat_heads->scalar_type(), " ", stat_heads->sizes(), " on ",
               stat_heads->device());
  }

  const c10::cuda::CUDAGuard guard(q.device());
  auto q_out = at::empty({tokens, heads, head_dim}, q.options());
  auto k_out = at::empty({tokens, kv_heads, head_dim}, q.options());
  // A dense cache returns v as given, as DenseRows.store does.
  auto v_out = quantized ? at::empty({tokens, kv_heads, head_dim}, q.options()) : v;
  if (tokens == 0) return {q_out, k_out, v_out};

  const auto stream = at::cuda::getCurrentCUDAStream(q.get_device());
  OMNISERVE_DISPATCH_FLOAT16(q.scalar_type(), "rope_kv_write q", [&] {
    using T = scalar_t;
    RopeKVArgs<T> args{
        static_cast<const T*>(q.data_ptr()),
        static_cast<const T*>(k.data_ptr()),
        static_cast<const T*>(v.data_ptr()),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        static_cast<const T*>(cos.data_ptr()),
        static_cast<const T*>(sin.data_ptr()),
        cos.stride(0), sin.stride(0),
        write_index.data_ptr<int64_t>(), write_index.stride(0), write_index.stride(1),
        static_cast<T*>(q_out.data_ptr()),
        static_cast<T*>(k_out.data_ptr()),
        quantized ? static_cast<T*>(v_out.data_ptr()) : nullptr,
        k_cache.data_ptr(), v_cache.data_ptr(),
        k_params ? reinterpret_cast<__half2*>(k_params->data_ptr()) : nullptr,
        v_params ? reinterpret_cast<__half2*>(v_params->data_ptr()) : nullptr,
        k_scale ? k_scale->data_ptr<float>() : nullptr,
        v_scale ? v_scale->data_ptr<float>() : nullptr,
        k_cache.size(0), static_cast<int>(heads), static_cast<int>(kv_heads)};
    if (stats.has_value()) {
      args.stats = static_cast<T*>(stats->data_ptr());
      args.stat_heads = stat_heads->data_ptr<bool>();
      args.logical_tokens = logical_tokens;
    }
    switch (format) {
      case KVFormat::kDense:
        return launch_for_head_dim<T, KVFormat::kDense>(args, tokens, head_dim, stream);
      case KVFormat::kKV8:
        return launch_for_head_dim<T, KVFormat::kKV8>(args, tokens, head_dim, stream);
      case KVFormat::kKV4:
        return launch_for_head_dim<T, KVFormat::kKV4>(args, tokens, head_dim, stream);
      case KVFormat::kStaticKV8:
        return launch_for_head_dim<T, KVFormat::kStaticKV8>(args, tokens, head_dim, stream);
      case KVFormat::kStaticFP8:
        return launch_for_head_dim<T, KVFormat::kStaticFP8>(args, tokens, head_dim, stream);
    }
  });
  return {q_out, k_out, v_out};
}

}  // namespace omniserve
