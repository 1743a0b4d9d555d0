// Writing to and reading from the paged cache: one call per operation, any
// device. CPU views run the reference backend; CUDA views run the sm90 kernels.
#pragma once

#include "snapmla/kv_format.h"
#include "snapmla/tensor.h"

namespace snapmla {

using StreamHandle = void*;  // cudaStream_t on CUDA devices; ignored on the CPU

enum class RopeStyle : uint8_t {
  kNone,         // k_pe is written as given (already rotated)
  kInterleaved,  // pairs (2i, 2i+1) rotate together: DeepSeek checkpoints
  kNeox,         // halves (i, i+32) rotate together: GPT-NeoX "rotate_half"
};

struct KvWriteOptions {
  RopeStyle rope = RopeStyle::kNone;
  TensorView positions;  // [n] int32/int64, required when rope != kNone
  TensorView cos_sin;    // [max_pos, 64] f32: cos in [:32], sin in [32:], required when rope != kNone
  // CUDA only: int32 [1] counter that the kernel increments for every token
  // with a non-finite value (such tokens are not written). The CPU backend
  // throws Error("c_kv"/"k_pe") instead.
  TensorView nonfinite_count;
};

// Quantizes (fp8) or copies (bf16) n new tokens into `cache` at slot_mapping.
//   c_kv [n, 512] bf16 or f32, k_pe [n, 64] bf16 or f32, slot_mapping [n] int32/int64 (-1 = skip).
// The CPU backend raises Error for a slot outside the cache, a position outside
// cos_sin or a non-finite value. The CUDA kernel cannot raise without a host
// synchronisation: it never writes outside the cache, skips such tokens, and
// counts the non-finite ones in options.nonfinite_count. Two tokens with the
// same slot in one call leave that slot undefined on the GPU.
void write_kv_cache(const TensorView& c_kv, const TensorView& k_pe, const TensorView& slot_mapping,
                    const KvCacheView& cache, const KvWriteOptions& options = {},
                    StreamHandle stream = nullptr);

// Gathers tokens of a paged cache into contiguous bf16 (prefill with a cached prefix).
// An index outside the cache is an Error on the CPU and a zero row on the GPU.
//   indices [n] int32/int64 slots; k_nope [n, 512] bf16; k_pe [n, 64] bf16 (both times the scale for fp8).
void gather_kv_cache(const KvCacheView& cache, const TensorView& indices, const TensorView& k_nope,
                     const TensorView& k_pe, StreamHandle stream = nullptr);

// Query-side quantization with the same scale-domain alignment as the cache:
//   q [b, s_q, h_q, 576] bf16 -> q_nope [.., 512] e4m3, q_scale [b, s_q, h_q] f32 = amax/448,
//   q_rope [.., 64] bf16 = q_pe / q_scale.
void quantize_query(const TensorView& q, const TensorView& q_nope, const TensorView& q_scale,
                    const TensorView& q_rope, StreamHandle stream = nullptr);

}  // namespace snapmla
