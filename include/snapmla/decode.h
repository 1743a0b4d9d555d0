// MLA decode over the paged latent cache (absorbed form), FlashMLA's problem shape:
//   out[b, i, h, :] = softmax(q[b, i, h, :] . K^T * softmax_scale) . V
// with K = cache rows (576 dims) and V = their first 512 dims.
#pragma once

#include <cstddef>

#include "snapmla/kv_cache.h"
#include "snapmla/kv_format.h"
#include "snapmla/tensor.h"

namespace snapmla {

inline constexpr int kMaxQueryRows = 512;  // h_q * s_q
inline constexpr int kMaxQueryLen = 4;     // s_q (MTP)

// Split-KV schedule, computed once per batch shape (FlashMLA's get_mla_metadata):
//   tile_scheduler_metadata [num_sm_parts, 8] int32, num_splits [batch + 1] int32.
struct DecodeSchedule {
  TensorView tile_scheduler_metadata;
  TensorView num_splits;
};

// Number of SM parts the schedule divides the KV work into on `device` for a
// query of s_q * h_q rows; the size of tile_scheduler_metadata's first dim.
int decode_num_sm_parts(Device device, int q_rows);

// Fills `schedule` from cache_seqlens [batch] int32 (same device as the schedule tensors).
void get_mla_metadata(const TensorView& cache_seqlens, int q_rows, const DecodeSchedule& schedule,
                      StreamHandle stream = nullptr);

// Bytes of scratch (split-KV partial outputs) mla_decode needs.
size_t decode_workspace_bytes(int batch, int s_q, int h_q, int num_sm_parts);

struct DecodeParams {
  TensorView q;              // [b, s_q, h_q, 576] bf16
  // Optional pre-quantized query for the fp8 format (from quantize_query); when
  // given, q may be left undefined.
  TensorView q_nope;         // [b, s_q, h_q, 512] e4m3
  TensorView q_scale;        // [b, s_q, h_q] f32
  TensorView q_rope;         // [b, s_q, h_q, 64] bf16
  KvCacheView cache;
  TensorView block_table;    // [b, max_pages] int32
  TensorView cache_seqlens;  // [b] int32, 0 allowed
  float softmax_scale = 0.0f;  // 0 means 1/sqrt(576)
  bool causal = true;        // s_q > 1: query i sees tokens < s_k - s_q + i + 1
  TensorView out;            // [b, s_q, h_q, 512] bf16
  TensorView lse;            // [b, h_q, s_q] f32 (natural log; -inf for an empty row)
  DecodeSchedule schedule;   // CUDA: from get_mla_metadata
  TensorView workspace;      // CUDA: uint8 [decode_workspace_bytes(...)]
  // Copy cache_seqlens and block_table to the host and check them before
  // launching (a synchronisation; turn off inside CUDA-graph capture). The
  // kernels never read outside the cache either way.
  bool check_indices = true;
};

void mla_decode(const DecodeParams& params, StreamHandle stream = nullptr);

}  // namespace snapmla
