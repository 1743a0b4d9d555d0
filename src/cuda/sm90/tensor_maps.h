// TMA tensor maps of the paged KV cache pools, for the wgmma decode kernels'
// page loads. Encoded on the host (cuTensorMapEncodeTiled, taken from the
// driver the runtime loaded: no libcuda link) and cached per pool, since an
// engine decodes on one pool for its lifetime.
#pragma once

#include <cuda.h>

#include "cuda/sm90/decode_params.cuh"

namespace snapmla::cuda::sm90 {

// Whether TMA can address the pool: its row coordinate (page * 64 + token) is
// an int32, and an empty pool has no map.
bool pool_fits_tma(const DecodeKernelParams& params);

// bf16 pool: [num_pages * 64 rows x 576 bf16], boxes of 64 rows x 64 bf16
// (one 128-byte row each) with the 128-byte swizzle of the wgmma tiles.
const CUtensorMap& bf16_cache_map(const DecodeKernelParams& params);

// fp8 pool: the e4m3 NoPE bytes [rows x 512] in boxes of 64 rows x 128 B and
// the bf16 RoPE [rows x 64] in boxes of 64 x 64, both 128-byte swizzled (the
// kernel's K8 and K rope tiles), and the per-token scales [num_pages x 64 f32],
// one page per box.
struct Fp8CacheMaps {
  CUtensorMap nope;
  CUtensorMap rope;
  CUtensorMap scale;
};
const Fp8CacheMaps& fp8_cache_maps(const DecodeKernelParams& params);

}  // namespace snapmla::cuda::sm90
