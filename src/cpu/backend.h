// The CPU reference backend. Arguments arrive validated by src/core/api.cpp.
#pragma once

#include "snapmla/decode.h"
#include "snapmla/kv_cache.h"

namespace snapmla::cpu {

void write_kv_cache(const TensorView& c_kv, const TensorView& k_pe, const TensorView& slot_mapping,
                    const KvCacheView& cache, const KvWriteOptions& options);
void gather_kv_cache(const KvCacheView& cache, const TensorView& indices, const TensorView& k_nope,
                     const TensorView& k_pe);
void quantize_query(const TensorView& q, const TensorView& q_nope, const TensorView& q_scale,
                    const TensorView& q_rope);
void get_mla_metadata(const TensorView& cache_seqlens, int q_rows, const DecodeSchedule& schedule);
void mla_decode(const DecodeParams& params);

}  // namespace snapmla::cpu
