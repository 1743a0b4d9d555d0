// The CUDA (sm90) backend. Arguments arrive validated by src/core/api.cpp;
// only compiled when SNAPMLA_WITH_CUDA is defined.
#pragma once

#include "snapmla/decode.h"
#include "snapmla/kv_cache.h"

namespace snapmla::cuda {

// Throws snapmla::Error naming `argument` unless `device` is a compute
// capability 9.x GPU that the driver can use.
void require_hopper(Device device, const char* argument);
bool hopper_available();
int multiprocessor_count(int device_index);

void write_kv_cache(const TensorView& c_kv, const TensorView& k_pe, const TensorView& slot_mapping,
                    const KvCacheView& cache, const KvWriteOptions& options, StreamHandle stream);
void gather_kv_cache(const KvCacheView& cache, const TensorView& indices, const TensorView& k_nope,
                     const TensorView& k_pe, StreamHandle stream);
void quantize_query(const TensorView& q, const TensorView& q_nope, const TensorView& q_scale,
                    const TensorView& q_rope, StreamHandle stream);
void get_mla_metadata(const TensorView& cache_seqlens, int q_rows, const DecodeSchedule& schedule,
                      StreamHandle stream);
void mla_decode(const DecodeParams& params, StreamHandle stream);

}  // namespace snapmla::cuda
