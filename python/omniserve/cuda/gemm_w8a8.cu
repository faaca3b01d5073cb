// W8A8: int8 weights (gemm/dispatch.cuh).
// One translation unit per format so that the three build in parallel.
#include "gemm/dispatch.cuh"

namespace omniserve::gemm {
template void launch_gemm<Format::kW8A8>(const GemmParams&, int, Path, Tile, cudaStream_t);
template Tile auto_tile<Format::kW8A8>(const GemmParams&, int);
template int resident_clusters<Format::kW8A8>(int, int, int);
}  // namespace omniserve::gemm
