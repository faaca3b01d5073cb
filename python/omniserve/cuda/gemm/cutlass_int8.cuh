// Large-M quantized GEMMs on Hopper through CUTLASS: y = epilogue(x_q · B^T), B int8 [N, K].
//
// For prefill-sized M the GEMM is compute-bound, where a TMA-fed, warp-specialized wgmma kernel
// is what reaches the INT8 tensor-core rate; CUTLASS's sm90 collectives are that kernel. Its
// mainloop wants both operands as plain K-major int8, so every format is first expanded once per
// call into a row-major int8 workspace (gemm_unpack.cu: W4 codes, g128's level-1 w8 or the W8
// codes; O(N·K) bytes, small next to the O(M·N·K) GEMM at the M this path serves), and the
// format only shows in the epilogue, which fuses the scales through an epilogue visitor tree:
//
//   scale  (W8A8, W4A8 g128):  y = (acc · w_scale[n]) · a_scale[m]
//   zero   (W4A8 per-channel): y = a_scale[m] · (w_scale[n] · acc − w_szero[n] · a_sum[m])
//
// in fp32 with the operation order of gemm/qgemm.cuh `epilogue` (the extension is compiled with
// -fmad=false, so no product is contracted into an FMA), rounded once to the output type.
#pragma once

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "gemm/cutlass_int8.h"

namespace omniserve::gemm::cutlass_int8 {

namespace detail {

using namespace cute;
namespace fusion = cutlass::epilogue::fusion;

// 256 x 128 x 128 tiles (a K tile is one 128-byte swizzle row of int8) shared by two cooperative
// consumer warpgroups of 128 rows each, clusters of two CTAs along M sharing B tiles by TMA
// multicast.
struct CooperativeConfig {
  using TileShape = Shape<_256, _128, _128>;
  using ClusterShape = Shape<_2, _1, _1>;
  using KernelSchedule = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
  using EpilogueSchedule = cutlass::epilogue::TmaWarpSpecializedCooperative;
};

using Acc = fusion::Sm90AccFetch;
template <class Tile, typename T>
using PerColumn = fusion::Sm90RowBroadcast<0, Tile, T, float, Stride<_0, _1, _0>>;
template <class Tile, typename T>
using PerRow = fusion::Sm90ColBroadcast<0, Tile, T, float, Stride<_1, _0, _0>>;
template <template <class> class Op, typename Out>
using Compute = fusion::Sm90Compute<Op, Out, float, cutlass::FloatRoundStyle::round_to_nearest>;

template <class Tile, typename OutT>
using ScaleTree =                                                   // (acc · w_scale) · a_scale
    fusion::Sm90EVT<Compute<cutlass::multiplies, OutT>, PerRow<Tile, cutlass::half_t>,
                    fusion::Sm90EVT<Compute<cutlass::multiplies, float>, Acc,
                                    PerColumn<Tile, cutlass::half_t>>>;

template <class Tile, typename OutT>
using ZeroTree =                          // a_scale · (w_scale · acc − w_szero · a_sum)
    fusion::Sm90EVT<
        Compute<cutlass::multiplies, OutT>, PerRow<Tile, cutlass::half_t>,
        fusion::Sm90EVT<
            Compute<cutlass::minus, float>,
            fusion::Sm90EVT<Compute<cutlass::multiplies, float>, PerColumn<Tile, cutlass::half_t>,
                            Acc>,
            fusion::Sm90EVT<Compute<cutlass::multiplies, float>, PerColumn<Tile, cutlass::half_t>,
                            PerRow<Tile, int32_t>>>>;

template <typename OutT, Epilogue E, class Config>
struct Kernel {
  using TileShape = typename Config::TileShape;
  using ClusterShape = typename Config::ClusterShape;
  using Tree = std::conditional_t<E == Epilogue::kScale, ScaleTree<TileShape, OutT>,
                                  ZeroTree<TileShape, OutT>>;
  static constexpr int kAlignD = 16 / sizeof(OutT);

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, int32_t, float,
      void, cutlass::layout::RowMajor, kAlignD,  // no source operand C
      OutT, cutlass::layout::RowMajor, kAlignD, typename Config::EpilogueSchedule,
      Tree>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      int8_t, cutlass::layout::RowMajor, 16,     // A [M, K]
      int8_t, cutlass::layout::ColumnMajor, 16,  // B as K x N column-major = [N, K] row-major
      int32_t, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      typename Config::KernelSchedule>::CollectiveOp;

  using GemmKernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>,
                                                          CollectiveMainloop, CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;
};

template <typename T>
const T* as(const void* p) {
  return static_cast<const T*>(p);
}

// A, B and D are all dense with their second mode contiguous: (leading dimension, 1, batch 0).
template <class Stride>
Stride row_stride(int64_t leading) {
  Stride stride{};
  get<0>(stride) = leading;
  return stride;
}

template <typename OutT, Epilogue E, class Config>
typename Kernel<OutT, E, Config>::Gemm::Arguments arguments(const Args& p) {
  using K = Kernel<OutT, E, Config>;
  using GemmKernel = typename K::GemmKernel;
  using half = cutlass::half_t;
  const auto stride_a = row_stride<typename GemmKernel::StrideA>(p.k);
  const auto stride_b = row_stride<typename GemmKernel::StrideB>(p.k);
  const auto stride_d = row_stride<typename GemmKernel::StrideD>(p.n);
  typename K::Tree::Arguments tree{};
  if constexpr (E == Epilogue::kScale) {
    tree = {{as<half>(p.a_scale)},                              // a_scale[m]
            {{}, {as<half>(p.w_scale)}, {}},                    // acc · w_scale[n]
            {}};
  } else {
    tree = {{as<half>(p.a_scale)},
            {{{as<half>(p.w_scale)}, {}, {}},                   // w_scale[n] · acc
             {{as<half>(p.w_szero)}, {p.a_sum}, {}},            // w_szero[n] · a_sum[m]
             {}},
            {}};
  }
  return typename K::Gemm::Arguments{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {p.m, p.n, p.k, 1},
      {p.a, stride_a, p.b, stride_b},
      {tree, nullptr, stride_d, static_cast<OutT*>(p.out), stride_d}};
}

template <Out O>
using Element = std::conditional_t<
    O == Out::kHalf, cutlass::half_t,
    std::conditional_t<O == Out::kBFloat16, cutlass::bfloat16_t, float>>;

template <typename OutT, Epilogue E, class Config>
cudaError_t run(const Args& p, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  typename Kernel<OutT, E, Config>::Gemm gemm;
  const auto args = arguments<OutT, E, Config>(p);
  if (gemm.can_implement(args) != cutlass::Status::kSuccess) return cudaErrorInvalidValue;
  if (gemm.get_workspace_size(args) > workspace_bytes) return cudaErrorInvalidValue;
  if (gemm.initialize(args, workspace, stream) != cutlass::Status::kSuccess) {
    return cudaErrorLaunchFailure;
  }
  if (gemm.run(stream) != cutlass::Status::kSuccess) return cudaErrorLaunchFailure;
  return cudaGetLastError();
}

template <typename OutT, Epilogue E, class Config>
size_t workspace_size(const Args& p) {
  return Kernel<OutT, E, Config>::Gemm::get_workspace_size(arguments<OutT, E, Config>(p));
}

}  // namespace detail

// The configuration the engine runs: cooperative consumers on 256 x 128 tiles, chosen over
// ping-pong consumers on 128 x 128 tiles, which were slower at every prefill-sized M measured on
// the H100. Its times against cuBLAS `_int_mm` are in benches/results/h100-kernels-gemm.json.
using DefaultConfig = detail::CooperativeConfig;

template <Out O>
size_t workspace_size(const Args& p, Epilogue e) {
  using T = detail::Element<O>;
  return e == Epilogue::kScale ? detail::workspace_size<T, Epilogue::kScale, DefaultConfig>(p)
                               : detail::workspace_size<T, Epilogue::kZero, DefaultConfig>(p);
}

template <Out O>
cudaError_t run(const Args& p, Epilogue e, void* workspace, size_t workspace_bytes,
                cudaStream_t stream) {
  using T = detail::Element<O>;
  return e == Epilogue::kScale
             ? detail::run<T, Epilogue::kScale, DefaultConfig>(p, workspace, workspace_bytes,
                                                              stream)
             : detail::run<T, Epilogue::kZero, DefaultConfig>(p, workspace, workspace_bytes,
                                                             stream);
}

#define OMNISERVE_CUTLASS_INT8_INSTANTIATE(O)                          \
  template size_t workspace_size<O>(const Args&, Epilogue);            \
  template cudaError_t run<O>(const Args&, Epilogue, void*, size_t, cudaStream_t);

}  // namespace omniserve::gemm::cutlass_int8
