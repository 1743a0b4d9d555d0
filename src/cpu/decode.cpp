// CPU backend for decode: the float64 reference, rounded to the kernel's
// output types. Slow, exact; used where no Hopper GPU is present.
#include <cmath>
#include <vector>

#include "core/numeric.h"
#include "core/schedule.h"
#include "cpu/backend.h"
#include "cpu/host_tensor.h"
#include "cpu/reference.h"

namespace snapmla::cpu {

void get_mla_metadata(const TensorView& cache_seqlens, int /*q_rows*/, const DecodeSchedule& schedule) {
  compute_decode_schedule(cache_seqlens.ptr<const int32_t>(), static_cast<int>(cache_seqlens.shape[0]),
                          static_cast<int>(schedule.tile_scheduler_metadata.shape[0]),
                          schedule.tile_scheduler_metadata.ptr<int32_t>(), schedule.num_splits.ptr<int32_t>());
}

void mla_decode(const DecodeParams& params) {
  const double softmax_scale =
      params.softmax_scale > 0.0f ? params.softmax_scale : 1.0 / std::sqrt(static_cast<double>(kHeadDim));

  // A pre-quantized fp8 query is attended with its dequantized values, the
  // numbers the kernel's fp8 MMAs multiply.
  TensorView q = params.q;
  std::vector<double> dequantized;
  if (params.q_nope.defined()) {
    const int64_t batch = params.q_nope.shape[0], s_q = params.q_nope.shape[1], h_q = params.q_nope.shape[2];
    dequantized.resize(static_cast<size_t>(batch * s_q * h_q) * kHeadDim);
    int64_t r = 0;
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t i = 0; i < s_q; ++i)
        for (int64_t h = 0; h < h_q; ++h, ++r) {
          const double scale = load_real(params.q_scale, element_offset(params.q_scale, b, i, h));
          const int64_t nope = element_offset(params.q_nope, b, i, h), rope = element_offset(params.q_rope, b, i, h);
          double* dst = &dequantized[r * kHeadDim];
          for (int d = 0; d < kNopeDim; ++d) dst[d] = load_real(params.q_nope, nope + d) * scale;
          for (int d = 0; d < kRopeDim; ++d) dst[kNopeDim + d] = load_real(params.q_rope, rope + d) * scale;
        }
    q = TensorView::contiguous(dequantized.data(), DType::kFloat64, Device::cpu(), {batch, s_q, h_q, kHeadDim});
  }

  const reference::DecodeResult ref = reference::decode_paged(q, params.cache, params.block_table,
                                                              params.cache_seqlens, softmax_scale, params.causal);
  const int64_t batch = q.shape[0], s_q = q.shape[1], h_q = q.shape[2];
  int64_t r = 0;
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t i = 0; i < s_q; ++i)
      for (int64_t h = 0; h < h_q; ++h, ++r) {
        uint16_t* out = params.out.ptr<uint16_t>() + element_offset(params.out, b, i, h);
        for (int d = 0; d < kHeadDimV; ++d)
          out[d * params.out.stride[3]] = float_to_bf16_bits(static_cast<float>(ref.out[r * kHeadDimV + d]));
      }
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t h = 0; h < h_q; ++h)
      for (int64_t i = 0; i < s_q; ++i)
        params.lse.ptr<float>()[element_offset(params.lse, b, h, i)] =
            static_cast<float>(ref.lse[(b * h_q + h) * s_q + i]);
}

}  // namespace snapmla::cpu
