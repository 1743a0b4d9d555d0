// What the host side of mla_decode (src/cuda/decode.cu) hands to the sm90
// split-KV decode kernel and its combine kernel. All tensors are contiguous
// (src/core/api.cpp checks), so only the few strides needed are kept.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "snapmla/kv_format.h"

namespace snapmla::cuda::sm90 {

struct DecodeKernelParams {
  // Query: bf16 [b, s_q, h_q, 576], or (fp8, pre-quantized) e4m3 [.., 512] +
  // f32 scale [b, s_q, h_q] + bf16 rope [.., 64]. Row r of a batch is (i, h) = (r / h_q, r % h_q),
  // so a batch's rows are contiguous in all of them.
  const uint16_t* q = nullptr;
  const uint8_t* q_nope = nullptr;
  const float* q_scale = nullptr;
  const uint16_t* q_rope = nullptr;

  // Cache pages (contiguous): bf16 data [pages, 64, 576], or fp8 nope [pages, 64, 512],
  // scale [pages, 64], rope [pages, 64, 64].
  const uint16_t* kv_bf16 = nullptr;
  const uint8_t* kv_nope = nullptr;
  const float* kv_scale = nullptr;
  const uint16_t* kv_rope = nullptr;
  int64_t num_pages = 0;

  const int32_t* block_table = nullptr;  // [batch, max_pages]
  int max_pages = 0;
  const int32_t* cache_seqlens = nullptr;  // [batch]

  int batch = 0;
  int s_q = 1;
  int h_q = 1;
  int rows = 1;  // s_q * h_q
  bool causal = true;
  float scale_log2 = 0.0f;  // softmax_scale * log2(e)

  const int32_t* tile_scheduler_metadata = nullptr;  // [num_parts, 8]
  const int32_t* num_splits = nullptr;               // [batch + 1]
  int num_parts = 1;

  uint16_t* out = nullptr;  // bf16 [b, s_q, h_q, 512]
  float* lse = nullptr;     // [b, h_q, s_q], natural log

  // Workspace: split s of a sequence (global index num_splits[b] + s) keeps
  // O normalised, fp32 [split, rows, 512], and its lse in log2 units [split, rows].
  float* partial_out = nullptr;
  float* partial_lse2 = nullptr;

  // Set to a non-zero value when a page index outside the pool (or past the
  // block table's row) was met; that page was treated as masked.
  unsigned int* status = nullptr;
};

inline constexpr unsigned int kStatusBadPage = 1u;

// Row groups of 16 query rows per CTA: 1, 2 or 4 (4 warps each).
int decode_row_groups(int rows);
inline int decode_rows_per_cta(int row_groups) { return 16 * row_groups; }

// One per cache format (src/cuda/sm90/decode_bf16.cu, decode_fp8.cu).
void launch_decode_bf16(const DecodeKernelParams& params, int row_groups, cudaStream_t stream);
void launch_decode_fp8(const DecodeKernelParams& params, int row_groups, cudaStream_t stream);

// Merges the split partials of sequences with more than one split into out / lse.
void launch_decode_combine(const DecodeKernelParams& params, cudaStream_t stream);

}  // namespace snapmla::cuda::sm90

namespace snapmla::cuda {

// Returns the decode kernels' status flags on `device_index` (kStatusBadPage...)
// accumulated since the last call, and clears them. Synchronises the device.
unsigned int read_and_clear_decode_status(int device_index);

}  // namespace snapmla::cuda
