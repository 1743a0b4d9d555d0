// Launch of the sm_90a wgmma bf16 decode kernel (decode_bf16_wgmma_kernel.cuh).
#include <cuda.h>
#include <cudaTypedefs.h>

#include <climits>
#include <cstdlib>
#include <cstring>
#include <string>

#include "cuda/check.h"
#include "cuda/sm90/decode_bf16_wgmma_kernel.cuh"
#include "cuda/sm90/decode_launch.cuh"
#include "snapmla/error.h"

namespace snapmla::cuda::sm90 {

namespace {
using bf16_wgmma_decode::Variant;

// SNAPMLA_BF16_VARIANT=v1|v2|v3|v4 (how pages reach shared memory, see the top of
// decode_bf16_wgmma_kernel.cuh), for A/B runs on the device. Read once. The
// default is v4 (TMA, early P.V): measured on the H100 equal to v3 or up to 2%
// faster in every bench row, 5-20% faster than the cp.async variants
// (docs/perf-notes.md, bf16 wgmma).
Variant variant_from_environment() {
  const char* value = std::getenv("SNAPMLA_BF16_VARIANT");
  const std::string name = value == nullptr ? "" : value;
  if (name.empty() || name == "v4") return Variant::kTmaEarlyPv;
  if (name == "v3") return Variant::kTma;
  if (name == "v1") return Variant::kCpAsyncArrive;
  if (name == "v2") return Variant::kCpAsyncFenced;
  throw Error("SNAPMLA_BF16_VARIANT", "is '" + name + "'; expected 'v1', 'v2', 'v3' or 'v4'");
}

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

template <Variant kVariant>
void launch_variant(const DecodeKernelParams& params, const CUtensorMap& kv_map, cudaStream_t stream) {
  using bf16_wgmma_decode::Smem;
  auto* kernel = &bf16_wgmma_decode::mla_decode_bf16_wgmma_kernel<kVariant>;
  SNAPMLA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Smem::kAllocBytes));
  const dim3 grid((params.rows + bf16_wgmma_decode::kRows - 1) / bf16_wgmma_decode::kRows, params.num_parts);
  kernel<<<grid, bf16_wgmma_decode::kThreads, Smem::kAllocBytes, stream>>>(params, kv_map);
  SNAPMLA_CUDA_CHECK_LAUNCH();
}
}  // namespace

void launch_decode_bf16_wgmma(const DecodeKernelParams& params, cudaStream_t stream) {
  static const Variant variant = variant_from_environment();
  CUtensorMap unused;
  std::memset(&unused, 0, sizeof(unused));
  switch (variant) {
    case Variant::kCpAsyncArrive: launch_variant<Variant::kCpAsyncArrive>(params, unused, stream); break;
    case Variant::kCpAsyncFenced: launch_variant<Variant::kCpAsyncFenced>(params, unused, stream); break;
    case Variant::kTma:
    case Variant::kTmaEarlyPv:
      // TMA row coordinates are int32: a pool beyond 2^31 rows (or an empty
      // one, which no map describes) goes the cp.async way of v2.
      if (params.num_pages <= 0 || params.num_pages > INT_MAX / kPageSize) {
        launch_variant<Variant::kCpAsyncFenced>(params, unused, stream);
      } else if (variant == Variant::kTma) {
        launch_variant<Variant::kTma>(params, cache_tensor_map(params), stream);
      } else {
        launch_variant<Variant::kTmaEarlyPv>(params, cache_tensor_map(params), stream);
      }
      break;
  }
}

}  // namespace snapmla::cuda::sm90
