// Fused query quantization (SnapMLA's "Fused-Q-Quant"): each (batch, query
// token, head) row of q becomes e4m3 NoPE + f32 scale + bf16 RoPE / scale,
// the same per-row format as the fp8 cache (token_quant.cuh), in one launch
// with one warp per row.
#include <cuda_runtime.h>

#include "cuda/backend.h"
#include "cuda/check.h"
#include "cuda/sm90/token_quant.cuh"

namespace snapmla::cuda {
namespace {

using namespace token_quant;

// Element strides of a [b, s_q, h_q, ...] view's three outer dims.
struct RowStrides {
  int64_t batch = 0, token = 0, head = 0;
  __device__ __forceinline__ int64_t offset(int64_t b, int64_t s, int64_t h) const {
    return b * batch + s * token + h * head;
  }
};

RowStrides outer_strides(const TensorView& t) {
  RowStrides r;
  r.batch = t.stride[0];
  r.token = t.stride[1];
  r.head = t.stride[2];
  return r;
}

struct QueryArgs {
  const uint16_t* q = nullptr;  // bf16 bits
  RowStrides q_strides;
  uint8_t* q_nope = nullptr;
  RowStrides q_nope_strides;
  float* q_scale = nullptr;
  RowStrides q_scale_strides;
  uint16_t* q_rope = nullptr;
  RowStrides q_rope_strides;
  int64_t num_rows = 0;
  int64_t s_q = 0, h_q = 0;
};

template <bool kAligned>
__global__ void __launch_bounds__(kRowsPerBlock * kWarpSize) quantize_query_kernel(const QueryArgs a) {
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarpSize;
  if (row >= a.num_rows) return;
  const int64_t h = row % a.h_q;
  const int64_t s = (row / a.h_q) % a.s_q;
  const int64_t b = row / (a.h_q * a.s_q);

  const uint16_t* q_row = a.q + a.q_strides.offset(b, s, h);
  float nope[kNopePerLane];
  load_values<kAligned>(q_row + kNopePerLane * lane, nope);
  float rope[kRopePerLane] = {};
  if (lane < kRopeLanes) load_values<kAligned>(q_row + kNopeDim + kRopePerLane * lane, rope);
  quantize_row<kAligned>(lane, nope, rope, a.q_nope + a.q_nope_strides.offset(b, s, h),
                         a.q_scale + a.q_scale_strides.offset(b, s, h), a.q_rope + a.q_rope_strides.offset(b, s, h));
}

bool outer_strides_aligned16(const TensorView& t, int64_t element_bytes) {
  return host_aligned16(t.data, {t.stride[0] * element_bytes, t.stride[1] * element_bytes,
                                 t.stride[2] * element_bytes});
}

}  // namespace

void quantize_query(const TensorView& q, const TensorView& q_nope, const TensorView& q_scale,
                    const TensorView& q_rope, StreamHandle stream) {
  const int64_t num_rows = q.size(0) * q.size(1) * q.size(2);
  if (num_rows == 0) return;
  ScopedCudaDevice device(q.device.index);

  QueryArgs a;
  a.q = q.ptr<const uint16_t>();
  a.q_strides = outer_strides(q);
  a.q_nope = q_nope.ptr<uint8_t>();
  a.q_nope_strides = outer_strides(q_nope);
  a.q_scale = q_scale.ptr<float>();
  a.q_scale_strides = outer_strides(q_scale);
  a.q_rope = q_rope.ptr<uint16_t>();
  a.q_rope_strides = outer_strides(q_rope);
  a.num_rows = num_rows;
  a.s_q = q.size(1);
  a.h_q = q.size(2);

  const bool aligned = outer_strides_aligned16(q, 2) && outer_strides_aligned16(q_nope, 1) &&
                       outer_strides_aligned16(q_rope, 2);
  const dim3 grid(row_blocks(num_rows)), block(kRowsPerBlock * kWarpSize);
  const auto cuda_stream = static_cast<cudaStream_t>(stream);
  if (aligned)
    quantize_query_kernel<true><<<grid, block, 0, cuda_stream>>>(a);
  else
    quantize_query_kernel<false><<<grid, block, 0, cuda_stream>>>(a);
  SNAPMLA_CUDA_CHECK_LAUNCH();
}

}  // namespace snapmla::cuda
