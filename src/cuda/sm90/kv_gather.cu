// Fused fetch + dequantize: gathers cache slots into contiguous bf16 rows
// (prefill over a cached prefix). One warp per row, 16-byte accesses,
// dequantization in registers: k = bf16(e4m3 * scale), k_pe = bf16(rope * scale).
// An index outside [0, num_pages * 64) yields a row of zeros (never a read
// outside the pool).
#include <cuda_runtime.h>

#include "cuda/backend.h"
#include "cuda/check.h"
#include "cuda/sm90/token_quant.cuh"

namespace snapmla::cuda {
namespace {

using namespace token_quant;

struct GatherOutputs {
  const void* indices = nullptr;
  bool indices_int64 = false;
  int64_t num_rows = 0;
  uint16_t* k_nope = nullptr;  // bf16 bits
  int64_t k_nope_row_stride = 0;
  uint16_t* k_pe = nullptr;
  int64_t k_pe_row_stride = 0;
};

template <KvFormat kFormat, bool kAligned>
__global__ void __launch_bounds__(kRowsPerBlock * kWarpSize)
    gather_kv_kernel(const PagedCacheRows cache, const GatherOutputs out) {
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarpSize;
  if (row >= out.num_rows) return;

  const int64_t slot = load_index(out.indices, out.indices_int64, row);
  uint16_t* nope_out = out.k_nope + row * out.k_nope_row_stride + kNopePerLane * lane;
  uint16_t* rope_out = out.k_pe + row * out.k_pe_row_stride + kRopePerLane * lane;
  if (slot < 0 || slot >= cache.num_slots) {
    const uint4 zero = make_uint4(0, 0, 0, 0);
    store16<kAligned>(nope_out, zero);
    store16<kAligned>(nope_out + 8, zero);
    if (lane < kRopeLanes) store16<kAligned>(rope_out, zero);
    return;
  }

  if constexpr (kFormat == KvFormat::kFP8) {
    const float scale = cache.scale[cache.scale_offset(slot)];
    const uint4 codes =
        load16<kAligned>(static_cast<const uint8_t*>(cache.nope) + cache.nope_offset(slot) + kNopePerLane * lane);
    const uint32_t words[4] = {codes.x, codes.y, codes.z, codes.w};
    float values[kNopePerLane];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float2 lo = e4m3x2_to_float2(words[k] & 0xffffu);
      const float2 hi = e4m3x2_to_float2(words[k] >> 16);
      values[4 * k] = __fmul_rn(lo.x, scale);
      values[4 * k + 1] = __fmul_rn(lo.y, scale);
      values[4 * k + 2] = __fmul_rn(hi.x, scale);
      values[4 * k + 3] = __fmul_rn(hi.y, scale);
    }
    store16<kAligned>(nope_out, pack_bf16x8(values));
    store16<kAligned>(nope_out + 8, pack_bf16x8(values + 8));
    if (lane < kRopeLanes) {
      float rope[kRopePerLane];
      load_values<kAligned>(cache.rope + cache.rope_offset(slot) + kRopePerLane * lane, rope);
#pragma unroll
      for (int i = 0; i < kRopePerLane; ++i) rope[i] = __fmul_rn(rope[i], scale);
      store16<kAligned>(rope_out, pack_bf16x8(rope));
    }
  } else {
    const uint16_t* nope_in = static_cast<const uint16_t*>(cache.nope) + cache.nope_offset(slot) + kNopePerLane * lane;
    store16<kAligned>(nope_out, load16<kAligned>(nope_in));
    store16<kAligned>(nope_out + 8, load16<kAligned>(nope_in + 8));
    if (lane < kRopeLanes)
      store16<kAligned>(rope_out, load16<kAligned>(cache.rope + cache.rope_offset(slot) + kRopePerLane * lane));
  }
}

template <KvFormat kFormat>
void launch_gather(const PagedCacheRows& cache, const GatherOutputs& out, bool aligned, cudaStream_t stream) {
  const dim3 grid(row_blocks(out.num_rows)), block(kRowsPerBlock * kWarpSize);
  if (aligned)
    gather_kv_kernel<kFormat, true><<<grid, block, 0, stream>>>(cache, out);
  else
    gather_kv_kernel<kFormat, false><<<grid, block, 0, stream>>>(cache, out);
  SNAPMLA_CUDA_CHECK_LAUNCH();
}

}  // namespace

void gather_kv_cache(const KvCacheView& cache, const TensorView& indices, const TensorView& k_nope,
                     const TensorView& k_pe, StreamHandle stream) {
  const int64_t num_rows = indices.numel();
  if (num_rows == 0) return;
  ScopedCudaDevice device(k_nope.device.index);

  GatherOutputs out;
  out.indices = indices.data;
  out.indices_int64 = indices.dtype == DType::kInt64;
  out.num_rows = num_rows;
  out.k_nope = k_nope.ptr<uint16_t>();
  out.k_nope_row_stride = k_nope.stride[0];
  out.k_pe = k_pe.ptr<uint16_t>();
  out.k_pe_row_stride = k_pe.stride[0];

  const PagedCacheRows rows = paged_cache_rows(cache);
  const bool aligned = cache_rows_aligned16(rows, cache.format) &&
                       host_aligned16(k_nope.data, {k_nope.stride[0] * 2}) &&
                       host_aligned16(k_pe.data, {k_pe.stride[0] * 2});
  const auto cuda_stream = static_cast<cudaStream_t>(stream);
  if (cache.format == KvFormat::kFP8)
    launch_gather<KvFormat::kFP8>(rows, out, aligned, cuda_stream);
  else
    launch_gather<KvFormat::kBF16>(rows, out, aligned, cuda_stream);
}

}  // namespace snapmla::cuda
