#include "cuda/sm90/tensor_maps.h"

#include <cudaTypedefs.h>

#include <climits>
#include <string>

#include "cuda/check.h"
#include "snapmla/error.h"

namespace snapmla::cuda::sm90 {

namespace {

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

// A 2D map of `rows` rows of `row_elements` elements (`row_bytes` apart),
// read in boxes of box_rows x box_elements.
CUtensorMap encode_2d(const char* argument, CUtensorMapDataType type, const void* data, uint64_t row_elements,
                      uint64_t rows, uint64_t row_bytes, uint32_t box_elements, uint32_t box_rows,
                      CUtensorMapSwizzle swizzle) {
  CUtensorMap map;
  const cuuint64_t dims[2] = {row_elements, rows};
  const cuuint64_t strides[1] = {row_bytes};
  const cuuint32_t box[2] = {box_elements, box_rows};
  const cuuint32_t element_strides[2] = {1, 1};
  const CUresult result =
      tensor_map_encoder()(&map, type, 2, const_cast<void*>(data), dims, strides, box, element_strides,
                           CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                           CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (result != CUDA_SUCCESS)
    throw Error(argument, "cannot be described by a TMA tensor map (cuTensorMapEncodeTiled error " +
                              std::to_string(static_cast<int>(result)) + ")");
  return map;
}

}  // namespace

bool pool_fits_tma(const DecodeKernelParams& params) {
  return params.num_pages > 0 && params.num_pages <= INT_MAX / kPageSize;
}

// What a pool's maps encode: its arrays' addresses and its size. Keyed on all
// of them, a cached map is the one encode would give, also when a pool is
// freed and another allocated at the same address.
struct PoolKey {
  const void* arrays[3];
  int64_t num_pages;
  bool operator==(const PoolKey&) const = default;
};

// The maps of the pool last launched on, per host thread (launches may come
// from several); `encode` runs when the pool changes.
template <class Maps, class Encode>
const Maps& cached(const PoolKey& key, Encode encode) {
  thread_local PoolKey cached_key{{nullptr, nullptr, nullptr}, -1};
  thread_local Maps maps;
  if (!(cached_key == key)) {
    maps = encode(static_cast<uint64_t>(key.num_pages) * kPageSize);
    cached_key = key;
  }
  return maps;
}

const CUtensorMap& bf16_cache_map(const DecodeKernelParams& params) {
  return cached<CUtensorMap>({{params.kv_bf16, nullptr, nullptr}, params.num_pages}, [&](uint64_t rows) {
    return encode_2d("kv_cache", CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, params.kv_bf16, kHeadDim, rows, kHeadDim * 2, 64,
                     kPageSize, CU_TENSOR_MAP_SWIZZLE_128B);
  });
}

const Fp8CacheMaps& fp8_cache_maps(const DecodeKernelParams& params) {
  return cached<Fp8CacheMaps>({{params.kv_nope, params.kv_rope, params.kv_scale}, params.num_pages}, [&](uint64_t rows) {
    Fp8CacheMaps maps;
    maps.nope = encode_2d("kv_cache", CU_TENSOR_MAP_DATA_TYPE_UINT8, params.kv_nope, kNopeDim, rows, kNopeDim, 128,
                          kPageSize, CU_TENSOR_MAP_SWIZZLE_128B);
    maps.rope = encode_2d("kv_cache", CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, params.kv_rope, kRopeDim, rows, kRopeDim * 2,
                          kRopeDim, kPageSize, CU_TENSOR_MAP_SWIZZLE_128B);
    maps.scale = encode_2d("kv_cache", CU_TENSOR_MAP_DATA_TYPE_FLOAT32, params.kv_scale, kPageSize, rows / kPageSize,
                           kPageSize * 4, kPageSize, 1, CU_TENSOR_MAP_SWIZZLE_NONE);
    return maps;
  });
}

}  // namespace snapmla::cuda::sm90
