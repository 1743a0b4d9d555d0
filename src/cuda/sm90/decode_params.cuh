// What the host side of mla_decode (src/cuda/decode.cu) hands to the sm90
// split-KV decode kernel and its combine kernel. All tensors are contiguous
// (src/core/api.cpp checks), so only the few strides needed are kept.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "core/schedule.h"
#include "cuda/sm90/mma.cuh"
#include "cuda/sm90/token_quant.cuh"
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

// ---- device pieces shared by the decode kernels (mma.sync and wgmma) ----

__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// The pages [page_begin, page_end) of sequence `batch` (s_k tokens) that a
// CTA's SchedulePart covers.
struct SequencePiece {
  int batch;
  int s_k;
  int page_begin;
  int page_end;
};
__device__ __forceinline__ SequencePiece sequence_piece(const DecodeKernelParams& p, const SchedulePart& part,
                                                        int batch) {
  SequencePiece piece;
  piece.batch = batch;
  piece.s_k = max(p.cache_seqlens[batch], 0);
  piece.page_begin = batch == part.begin_batch ? part.begin_page : 0;
  piece.page_end = batch == part.end_batch ? part.end_page : pages_for_tokens(piece.s_k);
  return piece;
}

// Valid tokens of the piece's logical page `page` and its physical index. A
// page index outside the pool (or past the block table's row) gives 0 valid
// tokens (so the page is never read and counts as masked) and physical 0; the
// `reporter` thread flags it in p.status.
// In two steps for callers that hide the block table's latency: the entry
// (a global load; -1 past the table's row), then its checks.
__device__ __forceinline__ int64_t block_table_entry(const DecodeKernelParams& p, const SequencePiece& piece, int page) {
  return page < p.max_pages ? p.block_table[static_cast<int64_t>(piece.batch) * p.max_pages + page] : -1;
}
__device__ __forceinline__ int resolve_entry(const DecodeKernelParams& p, const SequencePiece& piece, int page,
                                             int64_t id, bool reporter, int64_t* physical) {
  if (id < 0 || id >= p.num_pages) {
    if (reporter) atomicOr(p.status, kStatusBadPage);
    *physical = 0;
    return 0;
  }
  *physical = id;
  return min(kPageSize, piece.s_k - page * kPageSize);
}
__device__ __forceinline__ int resolve_page(const DecodeKernelParams& p, const SequencePiece& piece, int page,
                                            bool reporter, int64_t* physical) {
  return resolve_entry(p, piece, page, block_table_entry(p, piece, page), reporter, physical);
}

// The walk over a CTA's pages in order, across the pieces of its SchedulePart;
// past the last page, piece.batch = part.end_batch + 1.
struct PageCursor {
  SequencePiece piece;
  int page;
};
__device__ __forceinline__ void skip_finished_pieces(const DecodeKernelParams& p, const SchedulePart& part,
                                                     PageCursor& c) {
  while (c.page >= c.piece.page_end) {
    if (c.piece.batch >= part.end_batch) {
      c.piece.batch = part.end_batch + 1;
      c.piece.page_end = c.page + 1;  // stops the walk
      return;
    }
    c.piece = sequence_piece(p, part, c.piece.batch + 1);
    c.page = c.piece.page_begin;
  }
}
__device__ __forceinline__ PageCursor first_page(const DecodeKernelParams& p, const SchedulePart& part) {
  // A part with no work (end_batch < begin_batch, begin_batch may be the batch
  // size) has no piece to read: the walk is over before it starts.
  if (part.end_batch < part.begin_batch) return PageCursor{SequencePiece{part.end_batch + 1, 0, 0, 1}, 0};
  PageCursor c{sequence_piece(p, part, part.begin_batch), 0};
  c.page = c.piece.page_begin;
  skip_finished_pieces(p, part, c);
  return c;
}
__device__ __forceinline__ void next_page(const DecodeKernelParams& p, const SchedulePart& part, PageCursor& c) {
  ++c.page;
  skip_finished_pieces(p, part, c);
}
__device__ __forceinline__ bool has_page(const SchedulePart& part, const PageCursor& c) {
  return c.piece.batch <= part.end_batch;
}

// 2^x on MUFU.EX2 alone: the ftz form skips exp2f's rescaling around results
// below 2^-126, which only differ from 0 for tokens whose weight relative to
// the row's running maximum is below 2^-126 (invisible after normalisation).
__device__ __forceinline__ float exp2_ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Shared-memory tiles that wgmma reads with a swizzle start 1024-byte aligned.
__host__ __device__ constexpr int align1024(int bytes) { return (bytes + 1023) / 1024 * 1024; }

// Tokens of the piece's sequence that tile row r sees (0 for padding rows).
// Causal MTP: query i of s_q sees the first s_k - s_q + i + 1 tokens.
__device__ __forceinline__ int visible_tokens(const DecodeKernelParams& p, const SequencePiece& piece, int r) {
  const int limit = p.causal ? max(0, min(piece.s_k - p.s_q + r / p.h_q + 1, piece.s_k)) : piece.s_k;
  return r < p.rows ? limit : 0;
}
// visible_tokens of a thread's two fragment rows tile_row0 + local_row[half].
__device__ __forceinline__ void visible_tokens_of_rows(const DecodeKernelParams& p, const SequencePiece& piece,
                                                       int tile_row0, const int (&local_row)[2], int (&visible)[2]) {
#pragma unroll
  for (int half = 0; half < 2; ++half) visible[half] = visible_tokens(p, piece, tile_row0 + local_row[half]);
}

// The fp8 query tile of rows [tile_row0, tile_row0 + kRows) of the piece's
// sequence into shared memory: copied (cp.async, not committed) when given
// pre-quantized, else quantized here by the cache's code. nope_offset(row,
// chunk) / rope_offset(row, chunk) are the byte offsets from smem of 16-byte
// chunk `chunk` of a row's NoPE / RoPE bytes in the kernel's layout; padding
// rows get zeros and scale 1.
template <int kRows, class NopeOffset, class RopeOffset>
__device__ __forceinline__ void load_query_fp8(const DecodeKernelParams& p, const SequencePiece& piece,
                                               int tile_row0, int thread, int threads, uint8_t* smem,
                                               NopeOffset nope_offset, RopeOffset rope_offset,
                                               float* q_scale_smem) {
  constexpr int kNopeChunks = kNopeDim / 16, kRopeChunks = kRopeDim * 2 / 16;
  const uint32_t smem_base = smem_address(smem);
  const int64_t batch_row0 = static_cast<int64_t>(piece.batch) * p.rows;
  if (p.q_nope != nullptr) {
#pragma unroll 1
    for (int idx = thread; idx < kRows * kNopeChunks; idx += threads) {
      const int row = idx / kNopeChunks, chunk = idx % kNopeChunks;
      const bool valid = tile_row0 + row < p.rows;
      const uint8_t* src = p.q_nope + (batch_row0 + tile_row0 + row) * kNopeDim + chunk * 16;
      cp_async_16(smem_base + nope_offset(row, chunk), valid ? src : p.q_nope, valid);
    }
#pragma unroll 1
    for (int idx = thread; idx < kRows * kRopeChunks; idx += threads) {
      const int row = idx / kRopeChunks, chunk = idx % kRopeChunks;
      const bool valid = tile_row0 + row < p.rows;
      const uint8_t* src =
          reinterpret_cast<const uint8_t*>(p.q_rope + (batch_row0 + tile_row0 + row) * kRopeDim) + chunk * 16;
      cp_async_16(smem_base + rope_offset(row, chunk), valid ? src : reinterpret_cast<const uint8_t*>(p.q_rope),
                  valid);
    }
#pragma unroll 1
    for (int row = thread; row < kRows; row += threads)
      q_scale_smem[row] = tile_row0 + row < p.rows ? p.q_scale[batch_row0 + tile_row0 + row] : 1.0f;
    return;
  }
  // One warp per query row in token_quant's lane layout (lane l: NoPE chunk
  // l; lanes < 8: RoPE chunk l). quantize_row writes chunk l at base + 16 l,
  // so each lane's base moves its chunk to its swizzled place.
  const int lane = thread & 31;
#pragma unroll 1
  for (int row = thread >> 5; row < kRows; row += threads >> 5) {
    uint8_t* nope_row = smem + nope_offset(row, lane) - 16 * lane;
    uint16_t* rope_row = reinterpret_cast<uint16_t*>(smem + rope_offset(row, lane & 7) - 16 * lane);
    if (tile_row0 + row < p.rows) {
      const uint16_t* src = p.q + (batch_row0 + tile_row0 + row) * kHeadDim;
      float nope[token_quant::kNopePerLane], rope[token_quant::kRopePerLane];
      token_quant::load_values<true>(src + token_quant::kNopePerLane * lane, nope);
      if (lane < token_quant::kRopeLanes) {
        token_quant::load_values<true>(src + kNopeDim + token_quant::kRopePerLane * lane, rope);
      } else {
#pragma unroll
        for (int i = 0; i < token_quant::kRopePerLane; ++i) rope[i] = 0.0f;
      }
      token_quant::quantize_row<true>(lane, nope, rope, nope_row, &q_scale_smem[row], rope_row);
    } else {
      *reinterpret_cast<uint4*>(nope_row + 16 * lane) = make_uint4(0, 0, 0, 0);
      if (lane < token_quant::kRopeLanes) *reinterpret_cast<uint4*>(rope_row + 8 * lane) = make_uint4(0, 0, 0, 0);
      if (lane == 0) q_scale_smem[row] = 1.0f;
    }
  }
}

// Where a piece's result goes: straight to out / lse when its sequence has
// one split, else to the split's partials (global split index).
struct PieceOutput {
  bool direct;
  int64_t split_index;
};
__device__ __forceinline__ PieceOutput piece_output(const DecodeKernelParams& p, const SchedulePart& part,
                                                    int batch) {
  PieceOutput out;
  out.direct = p.num_splits[batch + 1] - p.num_splits[batch] <= 1;
  const int split = batch == part.begin_batch ? part.first_split : 0;
  out.split_index = static_cast<int64_t>(p.num_splits[batch]) + split;
  return out;
}

// Writes one thread's part of tile row r (skipped for padding rows):
// kPairs dim pairs dim0 + 8 j + {0, 1} of O / l, with O's unnormalised pair j
// from pair_at(j), as bf16 out or fp32 partials; and, if writes_lse, the
// row's lse (natural log in out, log2 in the partials) from the running
// maximum m (log2 units), l (units of the P scale) and the P scale (1 for bf16).
template <int kPairs, class PairAt>
__device__ __forceinline__ void store_output_row(const DecodeKernelParams& p, const PieceOutput& out, int batch,
                                                 int r, int dim0, float row_max, float l, float p_scale,
                                                 bool writes_lse, PairAt pair_at) {
  const float inv_l = l > 0.0f ? 1.0f / l : 0.0f;
  const float lse2 = l > 0.0f ? row_max + log2f(l * p_scale) : -__builtin_huge_valf();
  if (r >= p.rows) return;
  if (out.direct) {
    uint16_t* out_row = p.out + (static_cast<int64_t>(batch) * p.rows + r) * kHeadDimV + dim0;
#pragma unroll
    for (int j = 0; j < kPairs; ++j) {
      const float2 o = pair_at(j);
      *reinterpret_cast<uint32_t*>(out_row + 8 * j) = token_quant::bf16x2_bits(o.x * inv_l, o.y * inv_l);
    }
    if (writes_lse) {
      const int i = r / p.h_q, h = r % p.h_q;
      p.lse[(static_cast<int64_t>(batch) * p.h_q + h) * p.s_q + i] = lse2 * 0.69314718055994531f;
    }
  } else {
    float* out_row = p.partial_out + (out.split_index * p.rows + r) * kHeadDimV + dim0;
#pragma unroll
    for (int j = 0; j < kPairs; ++j) {
      const float2 o = pair_at(j);
      *reinterpret_cast<float2*>(out_row + 8 * j) = make_float2(o.x * inv_l, o.y * inv_l);
    }
    if (writes_lse) p.partial_lse2[out.split_index * p.rows + r] = lse2;
  }
}

}  // namespace snapmla::cuda::sm90

namespace snapmla::cuda {

// Returns the decode kernels' status flags on `device_index` (kStatusBadPage...)
// accumulated since the last call, and clears them. Synchronises the device.
unsigned int read_and_clear_decode_status(int device_index);

}  // namespace snapmla::cuda
