// Kernel choice per call (gemm/params.h `Path`) and the per-format launcher the binding calls.
// Large M goes to the CUTLASS path (kernels/gemm_cutlass.py) before reaching this extension.
#pragma once

#include <array>
#include <limits>
#include <mutex>

#include "gemm/small_m.cuh"
#include "gemm/tensor_core.cuh"

namespace omniserve::gemm {

// Auto: the memory-bound kernel up to M = 32 (where it reads the weight once at near the copy
// rate), the tensor-core kernel at the tile `choose_tile` prices cheapest above.
constexpr int kSmallMAutoMax = 32;

// The tensor-core tile's cost model, fitted to the forced-tile sweep on an H100
// (benches/results/h100-kernels-gemm-tiles.json: 12 tiles x M 64..512 x the four 8B shapes;
// 3.4 % median error, and the picks sum to within 0.2 % of the fastest tiles'): a grid runs in
// waves of the clusters the GPU holds at once; a wave costs a fill (prologue, pipeline ramp,
// epilogue) plus one K-block step per K block of a cluster member's share, and a K split adds
// one distributed-shared-memory reduction. After kernel changes, sweep again
// (`python -m omniserve.bench.kernels_gemm --tiles 64x1 ... 256x4 --json F`) and refit
// (`python benches/fit_gemm_tiles.py F`; tests/test_bench_fit_gemm_tiles.py ties these numbers
// to the checked-in sweep).
constexpr double kFillUs = 7.20;
constexpr double kReduceUs = 2.03;

// µs per K block (128 inputs) of one block, by tile height (64, 128, 256 tokens): it grows with
// the activation bytes the block stages and with the format's expansion work.
template <Format F>
constexpr std::array<double, 3> kKBlockUs =
    F == Format::kW8A8             ? std::array<double, 3>{0.466, 0.605, 1.083}
    : F == Format::kW4A8PerChannel ? std::array<double, 3>{0.578, 0.533, 0.983}
                                   : std::array<double, 3>{0.710, 0.628, 1.080};

constexpr std::array<int, 3> kTileTokens = {64, 128, 256};

// Index of a tile height in kTileTokens (and kKBlockUs).
constexpr int height_index(int tokens) { return tokens == 64 ? 0 : tokens == 128 ? 1 : 2; }

// Clusters of `split` blocks the current device holds at once, by tile height (kTileTokens) and
// split (1..kMaxSplit).
using Residency = std::array<std::array<int, kMaxSplit + 1>, kTileTokens.size()>;

// The WGS-warpgroup kernel's row of `Residency`, from the occupancy API: a cluster's blocks must
// share a GPC, so what fits is less than the SMs / split. Blocks that fit two to an SM (64-token
// W4 tiles) pair up on the same SMs, so their clusters count twice the one-per-SM kernel's: the
// sweep shows a 64-token grid needing a second wave exactly there, where an SM-count bound would
// still promise one. Should the cluster query fail, the SM-count bound stands in (a worse guess,
// not a wrong result).
template <Format F, typename OutT, int WGS>
std::array<int, kMaxSplit + 1> query_clusters(int device) {
  constexpr auto kernel = tensor_core_kernel<F, OutT, WGS>;
  constexpr auto one_per_sm = tensor_core_kernel<F, OutT, 4>;  // 4 warpgroups fill an SM
  reserve_shared_memory<kernel>(TcSmem<F, WGS>::kTotal);
  reserve_shared_memory<one_per_sm>(TcSmem<F, 4>::kTotal);
  int per_sm = 0, sms = 0;
  check_cuda("the occupancy query",
             cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, WGS * 128,
                                                           TcSmem<F, WGS>::kTotal));
  check_cuda("cudaDeviceGetAttribute",
             cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  per_sm = std::max(1, per_sm);
  std::array<int, kMaxSplit + 1> clusters{};
  clusters[1] = per_sm * sms;
  for (int split = 2; split <= kMaxSplit; ++split) {
    TensorCoreLaunch<F, 4> launch(split, split, nullptr);
    int fit = 0;
    if (cudaOccupancyMaxActiveClusters(&fit, one_per_sm, &launch.config) != cudaSuccess) {
      (void)cudaGetLastError();  // clears the query's error
      fit = sms / split;
    }
    clusters[split] = per_sm * std::max(1, fit);
  }
  return clusters;
}

// The current device's `Residency`, queried on its first use and kept (per device: the kernels'
// occupancy differs between GPU models).
template <Format F, typename OutT>
const Residency& residency() {
  static std::mutex mutex;
  static std::array<Residency, 64> by_device{};  // [*][1] == 0: not queried yet
  int device = 0;
  check_cuda("cudaGetDevice", cudaGetDevice(&device));
  const std::lock_guard<std::mutex> lock(mutex);
  Residency& r = by_device.at(device);
  if (r[0][1] == 0) {
    r = {query_clusters<F, OutT, 1>(device), query_clusters<F, OutT, 2>(device),
         query_clusters<F, OutT, 4>(device)};
  }
  return r;
}

template <Format F>
double tile_cost(const GemmParams& p, int tokens, int split, int resident) {
  const int tiles = (p.m + tokens - 1) / tokens * (p.n / kBlockN);
  const int waves = (tiles + resident - 1) / resident;
  const int k_blocks = (p.k / kBlockK + split - 1) / split;
  return waves * (kFillUs + k_blocks * kKBlockUs<F>[height_index(tokens)]) +
         (split > 1 ? kReduceUs : 0.0);
}

// The cheapest tile under the cost model (ties keep the shorter tile, then the smaller split).
template <Format F, typename OutT>
Tile choose_tile(const GemmParams& p) {
  const Residency& resident = residency<F, OutT>();
  Tile best{128, 1};
  double best_cost = std::numeric_limits<double>::infinity();
  for (const int tokens : kTileTokens) {
    for (int split = 1; split <= std::min(kMaxSplit, p.k / kBlockK); ++split) {
      const double cost = tile_cost<F>(p, tokens, split, resident[height_index(tokens)][split]);
      if (cost < best_cost) {
        best = {tokens, split};
        best_cost = cost;
      }
    }
  }
  return best;
}

// Calls fn with a value of the output type `out_kind` names.
template <typename Fn>
decltype(auto) with_out_type(int out_kind, Fn&& fn) {
  switch (out_kind) {
    case kOutInt32: return fn(int32_t{});
    case kOutFloat: return fn(float{});
    case kOutHalf: return fn(__half{});
    case kOutBFloat16: return fn(__nv_bfloat16{});
    default: throw std::invalid_argument("omniserve gemm: unknown output kind");
  }
}

template <Format F>
int resident_clusters(int tokens, int split, int out_kind) {
  return with_out_type(out_kind, [&](auto out) {
    return residency<F, decltype(out)>()[height_index(tokens)][split];
  });
}

template <Format F>
Tile auto_tile(const GemmParams& p, int out_kind) {
  if (p.m <= kSmallMAutoMax) return {0, 0};
  return with_out_type(out_kind, [&](auto out) { return choose_tile<F, decltype(out)>(p); });
}

template <Format F>
void launch_gemm(const GemmParams& p, int out_kind, Path path, Tile tile, cudaStream_t stream) {
  with_out_type(out_kind, [&](auto out) {
    using OutT = decltype(out);
    if (path == Path::kSmallM || (path == Path::kAuto && p.m <= kSmallMAutoMax)) {
      launch_small_m<F, OutT>(p, stream);
    } else {
      launch_tensor_core<F, OutT>(p, tile.tokens ? tile : choose_tile<F, OutT>(p), stream);
    }
  });
}

}  // namespace omniserve::gemm
