// Launch of the sm_90a wgmma bf16 decode kernel (decode_bf16_wgmma_kernel.cuh).
#include <cuda.h>
#include <cudaTypedefs.h>

#include <climits>
#include <cstring>
#include <string>

#include "cuda/check.h"
#include "cuda/sm90/decode_bf16_wgmma_kernel.cuh"
#include "cuda/sm90/decode_launch.cuh"
#include "snapmla/error.h"

namespace snapmla::cuda::sm90 {

namespace {
// cuTensorMapEncodeTiled from the driver the runtime loaded (no libcuda link).
PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 encoder = [] {
    void* function = nullptr;
    cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
    SNAPMLA_CUDA_CHECK(
        cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &function, 12000, cudaEnableDefault, &found));
    if (found != cudaDriverEntryPointSuccess || function == nullptr)
      throw Error("the CUDA driver has no cuTensorMapEncodeTiled");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(function);
  }();
  return encoder;
}

// The cache pool as a 2D map [num_pages * 64 rows x 576 bf16], boxes of 64
// rows x 64 bf16 (one 128-byte row each, the kernel's tile) with the 128-byte
// swizzle that the wgmma descriptors expect (chunk c of row r at c ^ (r % 8)).
CUtensorMap cache_tensor_map(const DecodeKernelParams& params) {
  CUtensorMap map;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(kHeadDim), static_cast<cuuint64_t>(params.num_pages) * kPageSize};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(kHeadDim) * 2};  // bytes between rows
  const cuuint32_t box[2] = {64, kPageSize};
  const cuuint32_t element_strides[2] = {1, 1};
  const CUresult result = tensor_map_encoder()(
      &map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<uint16_t*>(params.kv_bf16), dims, strides, box,
      element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
      CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (result != CUDA_SUCCESS)
    throw Error("kv_cache", "cannot be described by a TMA tensor map (cuTensorMapEncodeTiled error " +
                                std::to_string(static_cast<int>(result)) + ")");
  return map;
}

// The map of the pool last launched on (engines decode on one pool, so the
// encode runs once per pool, not per call; per thread, as launches may come
// from several host threads).
const CUtensorMap& cached_cache_tensor_map(const DecodeKernelParams& params) {
  thread_local const uint16_t* data = nullptr;
  thread_local int64_t num_pages = -1;
  thread_local CUtensorMap map;
  if (data != params.kv_bf16 || num_pages != params.num_pages) {
    map = cache_tensor_map(params);
    data = params.kv_bf16;
    num_pages = params.num_pages;
  }
  return map;
}

template <bool kTma>
void launch(const DecodeKernelParams& params, const CUtensorMap& kv_map, cudaStream_t stream) {
  using bf16_wgmma_decode::Smem;
  auto* kernel = &bf16_wgmma_decode::mla_decode_bf16_wgmma_kernel<kTma>;
  SNAPMLA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Smem::kAllocBytes));
  const dim3 grid((params.rows + bf16_wgmma_decode::kRows - 1) / bf16_wgmma_decode::kRows, params.num_parts);
  kernel<<<grid, bf16_wgmma_decode::kThreads, Smem::kAllocBytes, stream>>>(params, kv_map);
  SNAPMLA_CUDA_CHECK_LAUNCH();
}
}  // namespace

void launch_decode_bf16_wgmma(const DecodeKernelParams& params, cudaStream_t stream) {
  // TMA row coordinates are int32: a pool beyond 2^31 rows (or an empty one,
  // which no map describes) goes the cp.async way.
  if (params.num_pages <= 0 || params.num_pages > INT_MAX / kPageSize) {
    CUtensorMap unused;
    std::memset(&unused, 0, sizeof(unused));
    launch<false>(params, unused, stream);
  } else {
    launch<true>(params, cached_cache_tensor_map(params), stream);
  }
}

}  // namespace snapmla::cuda::sm90
