// W4A8 g128: uint4 codes dequantized to int8 per 128-group in registers (gemm/dispatch.cuh).
// One translation unit per format so that the three build in parallel.
#include "gemm/dispatch.cuh"

namespace omniserve::gemm {
template void launch_gemm<Format::kW4A8G128>(const GemmParams&, int, Path, Tile, cudaStream_t);
template Tile auto_tile<Format::kW4A8G128>(const GemmParams&, int);
template int resident_clusters<Format::kW4A8G128>(int, int, int);
}  // namespace omniserve::gemm
