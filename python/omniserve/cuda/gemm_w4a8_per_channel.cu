// W4A8 per-channel: uint4 codes, zero folded into the epilogue (gemm/dispatch.cuh).
// One translation unit per format so that the three build in parallel.
#include "gemm/dispatch.cuh"

namespace omniserve::gemm {
template void launch_gemm<Format::kW4A8PerChannel>(const GemmParams&, int, Path, Tile, cudaStream_t);
template Tile auto_tile<Format::kW4A8PerChannel>(const GemmParams&, int);
template int resident_clusters<Format::kW4A8PerChannel>(int, int, int);
}  // namespace omniserve::gemm
