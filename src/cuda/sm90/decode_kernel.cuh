// The sm90 split-KV MLA decode kernel, one template for both cache formats.
//
// Grid (row tiles, SM parts). A CTA owns 16 * kRowGroups query rows and walks
// the (sequence, page range) pieces of its SchedulePart (src/core/schedule.h).
// Each row group of 16 rows has 4 warps:
//   QK   warp q computes S for its 16 rows x tokens [16 q, 16 q + 16) of the page,
//        over all 576 dims (mma.sync; fp8: e4m3 m16n8k32 over the 512 NoPE dims,
//        promoted to fp32 every 128 dims, then bf16 m16n8k16 over the 64 RoPE
//        dims into the same fragment).
//   softmax  row maxima (and fp8 P-scale maxima) are exchanged between the 4
//        warps through shared memory; every warp then holds the same row state
//        (m, P scale) and its own partial row sum l.
//   PV   warp q owns output dims [128 q, 128 q + 128) for the 16 rows: 64 fp32
//        registers per thread, P read back from shared memory.
// K/V pages are double buffered with cp.async into XOR-swizzled shared memory
// (16-byte chunk c of row r lives at chunk c ^ (r & 7)), so every ldmatrix
// phase of 8 rows hits 8 distinct bank groups. Pages are added strictly in
// order, which the fp8 per-page P scale needs (SnapMLA's order enforcement).
//
// fp8 PV: e4m3 mma needs both operands K-major, so each page's V^T (dims x
// tokens) is built in shared memory from the K tile already there (ldmatrix
// .trans on byte pairs + prmt). That transpose leaves the tokens of each
// 16-token group in the order {0,1,8,9, 2,3,10,11, 4,5,12,13, 6,7,14,15}
// along the reduction axis; P is stored in the same order, which happens to
// make each thread's 4 P bytes of a row one 32-bit store.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "core/numeric.h"
#include "core/schedule.h"
#include "cuda/sm90/decode_params.cuh"
#include "cuda/sm90/dependent_launch.cuh"
#include "cuda/sm90/mma.cuh"
#include "cuda/sm90/token_quant.cuh"
#include "snapmla/kv_format.h"

namespace snapmla::cuda::sm90 {

inline constexpr int kWarpsPerRowGroup = 4;
inline constexpr int kRowsPerGroup = 16;
inline constexpr int kTokensPerWarp = kPageSize / kWarpsPerRowGroup;  // 16
inline constexpr int kDimsPerWarp = kHeadDimV / kWarpsPerRowGroup;    // 128
inline constexpr int kOutTilesPerWarp = kDimsPerWarp / 8;             // 16 n8 tiles
inline constexpr float kNegInf = -__builtin_huge_valf();

__host__ __device__ constexpr int align128(int bytes) { return (bytes + 127) / 128 * 128; }

// Shared-memory map of one CTA. Row strides of P / V^T are padded by 16 bytes
// instead of swizzled: 80 B and 144 B strides make 8 consecutive rows cover all
// 32 banks for ldmatrix.
template <KvFormat kFormat, int kRowGroups>
struct DecodeSmem {
  static constexpr bool kFp8 = kFormat == KvFormat::kFP8;
  static constexpr int kRows = kRowsPerGroup * kRowGroups;

  // bf16: one 1152-byte row per query row / token; fp8: NoPE and RoPE apart.
  static constexpr int kQRowBytes = kFp8 ? kNopeDim : kHeadDim * 2;
  static constexpr int kKRowBytes = kQRowBytes;
  static constexpr int kRopeRowBytes = kRopeDim * 2;  // fp8 only
  static constexpr int kPRowBytes = kFp8 ? kPageSize + 16 : kPageSize * 2 + 16;
  static constexpr int kVtRowBytes = kPageSize + 16;

  static constexpr int kQ = 0;
  static constexpr int kQRope = align128(kQ + kRows * kQRowBytes);
  static constexpr int kQScale = align128(kQRope + (kFp8 ? kRows * kRopeRowBytes : 0));
  static constexpr int kStage0 = align128(kQScale + (kFp8 ? kRows * 4 : 0));
  // Within a stage: K rows, then (fp8) RoPE rows and the 64 token scales.
  static constexpr int kStageRope = kPageSize * kKRowBytes;
  static constexpr int kStageScale = kStageRope + (kFp8 ? kPageSize * kRopeRowBytes : 0);
  static constexpr int kStageBytes = align128(kStageScale + (kFp8 ? kPageSize * 4 : 0));
  static constexpr int kVt = kStage0 + 2 * kStageBytes;
  static constexpr int kP = align128(kVt + (kFp8 ? kHeadDimV * kVtRowBytes : 0));
  static constexpr int kRedMax = align128(kP + kRows * kPRowBytes);
  static constexpr int kRedAux = kRedMax + kRows * kWarpsPerRowGroup * 4;  // fp8 P-scale maxima; row sums
  static constexpr int kBytes = align128(kRedAux + kRows * kWarpsPerRowGroup * 4);
  static_assert(kBytes <= 227 * 1024, "decode tile does not fit in shared memory");
};

// Byte offset of 16-byte chunk `chunk` of row `row` in a swizzled tile.
__device__ __forceinline__ uint32_t swizzled(int row, int row_bytes, int chunk) {
  return static_cast<uint32_t>(row * row_bytes + ((chunk ^ (row & 7)) << 4));
}

// S (16 rows x 16 tokens, two n8 tiles) += A (rows x k) . B (tokens x k)^T
// over k steps [k_begin, k_end) of 32 bytes each, both tiles swizzled.
template <bool kE4M3>
__device__ __forceinline__ void qk_steps(float (&s)[2][4], uint32_t a_tile, int a_row_bytes, uint32_t b_tile,
                                         int b_row_bytes, int a_row, int b_row, int lane, int k_begin, int k_end) {
  const int a_half = lane >> 4;         // A matrices 2, 3 hold k bytes 16..31
  const int b_half = (lane >> 3) & 1;   // B matrices 1, 3 hold k bytes 16..31
#pragma unroll 2
  for (int k = k_begin; k < k_end; ++k) {
    uint32_t a[4], b[4];
    ldmatrix_x4(a, a_tile + swizzled(a_row, a_row_bytes, 2 * k + a_half));
    ldmatrix_x4(b, b_tile + swizzled(b_row, b_row_bytes, 2 * k + b_half));
    if constexpr (kE4M3) {
      mma_e4m3_16x8x32(s[0], a, b[0], b[1]);
      mma_e4m3_16x8x32(s[1], a, b[2], b[3]);
    } else {
      mma_bf16_16x8x16(s[0], a, b[0], b[1]);
      mma_bf16_16x8x16(s[1], a, b[2], b[3]);
    }
  }
}

template <KvFormat kFormat, int kRowGroups>
__global__ void __launch_bounds__(kRowGroups * kWarpsPerRowGroup * 32, 1)
    mla_decode_kernel(const DecodeKernelParams p) {
  using Smem = DecodeSmem<kFormat, kRowGroups>;
  constexpr bool kFp8 = Smem::kFp8;
  constexpr int kThreads = kRowGroups * kWarpsPerRowGroup * 32;
  constexpr int kWarps = kThreads / 32;
  constexpr int kRows = Smem::kRows;

  extern __shared__ __align__(128) uint8_t smem[];
  const uint32_t smem_base = smem_address(smem);

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int row_group = warp / kWarpsPerRowGroup;
  const int quarter = warp % kWarpsPerRowGroup;  // token block in QK, dim block in PV
  const int group_row = lane >> 2;               // fragment rows group_row and group_row + 8
  const int quad_lane = lane & 3;
  const int tile_row0 = blockIdx.x * kRows;

  // Tile-local rows of this thread's accumulator fragments.
  // (Kept few on purpose: with 4 row groups a thread has 128 registers, 64 of
  // them the O accumulator; anything cheap is recomputed where it is used.)
  const int local_row[2] = {row_group * kRowsPerGroup + group_row, row_group * kRowsPerGroup + group_row + 8};

  float* red_max = reinterpret_cast<float*>(smem + Smem::kRedMax);
  float* red_aux = reinterpret_cast<float*>(smem + Smem::kRedAux);

  wait_for_prior_kernel();  // the schedule, query and cache come from earlier kernels
  release_next_kernel();   // the combine, or the next step's first kernel
  const SchedulePart part = load_schedule_part(p.tile_scheduler_metadata, blockIdx.y);

  for (int batch = part.begin_batch; batch <= part.end_batch; ++batch) {
    const SequencePiece piece = sequence_piece(p, part, batch);
    const int page_begin = piece.page_begin, page_end = piece.page_end;

    auto load_page = [&](int page, int stage) {
      int64_t physical;
      const int valid_rows = resolve_page(p, piece, page, tid == 0, &physical);
      const uint32_t stage_base = smem_base + Smem::kStage0 + stage * Smem::kStageBytes;
      if constexpr (!kFp8) {
        constexpr int kChunks = kHeadDim * 2 / 16;  // 72 per token
        const uint8_t* src_page = reinterpret_cast<const uint8_t*>(p.kv_bf16) + physical * kPageSize * kHeadDim * 2;
#pragma unroll 1
        for (int idx = tid; idx < kPageSize * kChunks; idx += kThreads) {
          const int row = idx / kChunks, chunk = idx % kChunks;
          const bool valid = row < valid_rows;
          const uint8_t* src = valid ? src_page + row * kHeadDim * 2 + chunk * 16 : src_page;
          cp_async_16(stage_base + swizzled(row, Smem::kKRowBytes, chunk), src, valid);
        }
      } else {
        constexpr int kNopeChunks = kNopeDim / 16;     // 32 per token
        constexpr int kRopeChunks = kRopeDim * 2 / 16;  // 8 per token
        const uint8_t* nope_page = p.kv_nope + physical * kPageSize * kNopeDim;
#pragma unroll 1
        for (int idx = tid; idx < kPageSize * kNopeChunks; idx += kThreads) {
          const int row = idx / kNopeChunks, chunk = idx % kNopeChunks;
          const bool valid = row < valid_rows;
          cp_async_16(stage_base + swizzled(row, Smem::kKRowBytes, chunk),
                      valid ? nope_page + row * kNopeDim + chunk * 16 : nope_page, valid);
        }
        const uint8_t* rope_page =
            reinterpret_cast<const uint8_t*>(p.kv_rope) + physical * kPageSize * kRopeDim * 2;
#pragma unroll 1
        for (int idx = tid; idx < kPageSize * kRopeChunks; idx += kThreads) {
          const int row = idx / kRopeChunks, chunk = idx % kRopeChunks;
          const bool valid = row < valid_rows;
          cp_async_16(stage_base + Smem::kStageRope + swizzled(row, Smem::kRopeRowBytes, chunk),
                      valid ? rope_page + row * kRopeDim * 2 + chunk * 16 : rope_page, valid);
        }
        // One 4-byte copy per token so that masked tokens get scale 0: their
        // f = e * scale must be 0 even where the cache slot holds garbage.
        const float* scale_page = p.kv_scale + physical * kPageSize;
        if (tid < kPageSize) {
          const bool valid = tid < valid_rows;
          cp_async_4(stage_base + Smem::kStageScale + tid * 4, valid ? scale_page + tid : scale_page, valid);
        }
      }
    };

    // ---- prologue: the query tile (fp8: quantized here unless given) ----
    __syncthreads();  // the previous sequence is done with Q, P and the stages
    if constexpr (!kFp8) {
      constexpr int kChunks = kHeadDim * 2 / 16;
      const int64_t batch_row0 = static_cast<int64_t>(batch) * p.rows;
#pragma unroll 1
      for (int idx = tid; idx < kRows * kChunks; idx += kThreads) {
        const int row = idx / kChunks, chunk = idx % kChunks;
        const bool valid = tile_row0 + row < p.rows;
        const uint8_t* src = reinterpret_cast<const uint8_t*>(p.q + (batch_row0 + tile_row0 + row) * kHeadDim);
        cp_async_16(smem_base + Smem::kQ + swizzled(row, Smem::kQRowBytes, chunk),
                    valid ? src + chunk * 16 : reinterpret_cast<const uint8_t*>(p.q), valid);
      }
    } else {
      load_query_fp8<kRows>(
          p, piece, tile_row0, tid, kThreads, smem,
          [](int row, int chunk) { return Smem::kQ + swizzled(row, Smem::kQRowBytes, chunk); },
          [](int row, int chunk) { return Smem::kQRope + swizzled(row, Smem::kRopeRowBytes, chunk); },
          reinterpret_cast<float*>(smem + Smem::kQScale));
    }
    if (page_begin < page_end) load_page(page_begin, 0);
    cp_async_commit();

    // ---- per-row state ----
    int visible[2];
    visible_tokens_of_rows(p, piece, tile_row0, local_row, visible);
    float row_max[2] = {kNegInf, kNegInf};  // m, log2 units
    float p_scale[2] = {1.0f, 1.0f};        // fp8: current P scale s_p
    float row_sum[2] = {0.0f, 0.0f};        // this thread's share of l (units of s_p)
    // Score multiplier of each row: softmax_scale * log2(e), times the query scale (fp8).
    float row_scale[2] = {p.scale_log2, p.scale_log2};
    float acc[kOutTilesPerWarp][4];
#pragma unroll
    for (int n = 0; n < kOutTilesPerWarp; ++n)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[n][c] = 0.0f;

    for (int page = page_begin; page < page_end; ++page) {
      const int stage = (page - page_begin) & 1;
      cp_async_wait<0>();
      __syncthreads();  // this page (and Q) landed; everyone is done with the other stage
      if (page + 1 < page_end) load_page(page + 1, stage ^ 1);
      cp_async_commit();

      const uint32_t stage_base = smem_base + Smem::kStage0 + stage * Smem::kStageBytes;
      const float* k_scale_smem = reinterpret_cast<const float*>(smem + Smem::kStage0 + stage * Smem::kStageBytes +
                                                                 Smem::kStageScale);
      if constexpr (kFp8) {
        if (page == page_begin) {
          const float* q_scale_smem = reinterpret_cast<const float*>(smem + Smem::kQScale);
          row_scale[0] = q_scale_smem[local_row[0]] * p.scale_log2;
          row_scale[1] = q_scale_smem[local_row[1]] * p.scale_log2;
        }
        // V^T of this page: unit (token group g, 32 dims) per warp instruction.
        const uint32_t vt_base = smem_base + Smem::kVt;
#pragma unroll 1
        for (int unit = warp; unit < (kPageSize / 16) * (kNopeDim / 32); unit += kWarps) {
          const int token_group = unit & 3, chunk0 = (unit >> 2) * 2;
          const int matrix = lane >> 3;
          const int token = token_group * 16 + (lane & 7) + 8 * (matrix & 1);
          uint32_t r[4];
          ldmatrix_x4_trans(r, stage_base + swizzled(token, Smem::kKRowBytes, chunk0 + (matrix >> 1)));
          // r[0]/r[1]: tokens 2q, 2q+1 / 8+2q, 9+2q of dims (2p, 2p+1), p = lane / 4.
          const int pair = lane >> 2;
          const uint32_t column = token_group * 16 + 4 * quad_lane;
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int dim = (chunk0 + h) * 16 + 2 * pair;
            st_shared_u32(vt_base + dim * Smem::kVtRowBytes + column, byte_perm(r[2 * h], r[2 * h + 1], 0x6420));
            st_shared_u32(vt_base + (dim + 1) * Smem::kVtRowBytes + column,
                          byte_perm(r[2 * h], r[2 * h + 1], 0x7531));
          }
        }
      }

      // ---- S = Q K^T for 16 rows x this warp's 16 tokens ----
      float s[2][4];
#pragma unroll
      for (int t = 0; t < 2; ++t)
#pragma unroll
        for (int c = 0; c < 4; ++c) s[t][c] = 0.0f;
      const int a_row = row_group * kRowsPerGroup + (lane & 15);
      const int b_row = quarter * kTokensPerWarp + (lane & 7) + ((lane >> 4) << 3);
      if constexpr (kFp8) {
        // Hopper's fp8 MMA keeps fewer accumulator bits than fp32: add each
        // 128-dim chunk into a fresh fragment and promote it to fp32.
#pragma unroll 1
        for (int chunk = 0; chunk < kNopeDim / 128; ++chunk) {
          float part_s[2][4] = {};
          qk_steps<true>(part_s, smem_base + Smem::kQ, Smem::kQRowBytes, stage_base, Smem::kKRowBytes, a_row, b_row,
                         lane, chunk * 4, chunk * 4 + 4);
#pragma unroll
          for (int t = 0; t < 2; ++t)
#pragma unroll
            for (int c = 0; c < 4; ++c) s[t][c] += part_s[t][c];
        }
        qk_steps<false>(s, smem_base + Smem::kQRope, Smem::kRopeRowBytes, stage_base + Smem::kStageRope,
                        Smem::kRopeRowBytes, a_row, b_row, lane, 0, kRopeDim * 2 / 32);
      } else {
        qk_steps<false>(s, smem_base + Smem::kQ, Smem::kQRowBytes, stage_base, Smem::kKRowBytes, a_row, b_row, lane,
                        0, kHeadDim * 2 / 32);
      }

      // ---- online softmax over this page (x, e, f computed in place in s) ----
      int64_t physical_unused;
      const int valid_tokens = resolve_page(p, piece, page, tid == 0, &physical_unused);
      const int page_token0 = page * kPageSize;
      float local_max[2] = {kNegInf, kNegInf};
#pragma unroll
      for (int t = 0; t < 2; ++t)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int token = quarter * kTokensPerWarp + 8 * t + 2 * quad_lane + (c & 1);
          const int half = c >> 1;
          const bool keep = token < valid_tokens && page_token0 + token < visible[half];
          float score = s[t][c] * row_scale[half];
          if constexpr (kFp8) score *= k_scale_smem[token];
          s[t][c] = keep ? score : kNegInf;
          local_max[half] = fmaxf(local_max[half], s[t][c]);
        }
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        local_max[half] = quad_max(local_max[half]);
        if (quad_lane == 0) red_max[local_row[half] * kWarpsPerRowGroup + quarter] = local_max[half];
      }
      __syncthreads();

      float new_max[2], e_sum[2] = {0.0f, 0.0f};
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const float4 m4 = *reinterpret_cast<const float4*>(&red_max[local_row[half] * kWarpsPerRowGroup]);
        new_max[half] = fmaxf(fmaxf(row_max[half], fmaxf(m4.x, m4.y)), fmaxf(m4.z, m4.w));
      }
#pragma unroll
      for (int t = 0; t < 2; ++t)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          // Nothing seen yet (m = -inf): every x is -inf and e = 0, without -inf - -inf.
          const float base = new_max[c >> 1] == kNegInf ? 0.0f : new_max[c >> 1];
          s[t][c] = exp2f(s[t][c] - base);
          e_sum[c >> 1] += s[t][c];
        }

      float beta[2];
      if constexpr (kFp8) {
        // Fold the V scale into P (masked tokens: e = 0, and their scale was
        // zero-filled), then one e4m3 scale per (row, page).
        float f_max[2] = {0.0f, 0.0f};
#pragma unroll
        for (int t = 0; t < 2; ++t)
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            const int token = quarter * kTokensPerWarp + 8 * t + 2 * quad_lane + (c & 1);
            s[t][c] *= k_scale_smem[token];
            f_max[c >> 1] = fmaxf(f_max[c >> 1], s[t][c]);
          }
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          f_max[half] = quad_max(f_max[half]);
          if (quad_lane == 0) red_aux[local_row[half] * kWarpsPerRowGroup + quarter] = f_max[half];
        }
        __syncthreads();
        uint8_t* p_smem = smem + Smem::kP;
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const float4 f4 = *reinterpret_cast<const float4*>(&red_aux[local_row[half] * kWarpsPerRowGroup]);
          const float page_f_max = fmaxf(fmaxf(f4.x, f4.y), fmaxf(f4.z, f4.w));
          const bool any = page_f_max > 0.0f;
          const float new_scale = any ? page_f_max / kE4M3Max : 1.0f;
          const float inv_scale = any ? kE4M3Max / page_f_max : 1.0f;
          beta[half] = row_max[half] == kNegInf ? 0.0f
                                                : exp2f(row_max[half] - new_max[half]) * (p_scale[half] * inv_scale);
          row_sum[half] = fmaf(row_sum[half], beta[half], e_sum[half] * inv_scale);
          p_scale[half] = new_scale;
          const int c0 = 2 * half;
          const uint32_t lo = token_quant::e4m3x2_bits(s[0][c0] * inv_scale, s[0][c0 + 1] * inv_scale);
          const uint32_t hi = token_quant::e4m3x2_bits(s[1][c0] * inv_scale, s[1][c0 + 1] * inv_scale);
          // Reduction-axis order of the V^T tile: this thread's tokens
          // {2q, 2q+1, 8+2q, 9+2q} of the warp's group are columns 4q..4q+3.
          *reinterpret_cast<uint32_t*>(p_smem + local_row[half] * Smem::kPRowBytes + quarter * kTokensPerWarp +
                                       4 * quad_lane) = lo | (hi << 16);
        }
      } else {
        uint8_t* p_smem = smem + Smem::kP;
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          beta[half] = row_max[half] == kNegInf ? 0.0f : exp2f(row_max[half] - new_max[half]);
          row_sum[half] = fmaf(row_sum[half], beta[half], e_sum[half]);
          const int c0 = 2 * half;
#pragma unroll
          for (int t = 0; t < 2; ++t) {
            const int token = quarter * kTokensPerWarp + 8 * t + 2 * quad_lane;
            *reinterpret_cast<uint32_t*>(p_smem + local_row[half] * Smem::kPRowBytes + token * 2) =
                token_quant::bf16x2_bits(s[t][c0], s[t][c0 + 1]);
          }
        }
      }
      row_max[0] = new_max[0];
      row_max[1] = new_max[1];
      __syncthreads();  // P (and V^T) complete

      // ---- O = O * beta + P V for 16 rows x this warp's 128 dims ----
      const uint32_t p_base = smem_base + Smem::kP;
      const int p_row = row_group * kRowsPerGroup + (lane & 15);
      const int p_half = lane >> 4;
      if constexpr (kFp8) {
        uint32_t a[2][4];
#pragma unroll
        for (int k = 0; k < 2; ++k) ldmatrix_x4(a[k], p_base + p_row * Smem::kPRowBytes + 32 * k + 16 * p_half);
        // One ldmatrix gives both k steps of one n8 tile: matrices 0..3 are
        // the tile's 8 dims x token bytes [0,16), [16,32), [32,48), [48,64).
        const uint32_t vt_lane = smem_base + Smem::kVt +
                                 (quarter * kDimsPerWarp + (lane & 7)) * Smem::kVtRowBytes + 16 * (lane >> 3);
#pragma unroll
        for (int n = 0; n < kOutTilesPerWarp; ++n) {
          uint32_t b[4];
          ldmatrix_x4(b, vt_lane + 8 * n * Smem::kVtRowBytes);
          float page_product[4] = {};
          mma_e4m3_16x8x32(page_product, a[0], b[0], b[1]);
          mma_e4m3_16x8x32(page_product, a[1], b[2], b[3]);
          // Promote this page's product to fp32 (see QK above).
#pragma unroll
          for (int c = 0; c < 4; ++c) acc[n][c] = fmaf(acc[n][c], beta[c >> 1], page_product[c]);
        }
      } else {
        uint32_t a[4][4];
#pragma unroll
        for (int k = 0; k < 4; ++k) ldmatrix_x4(a[k], p_base + p_row * Smem::kPRowBytes + 32 * k + 16 * p_half);
#pragma unroll
        for (int n = 0; n < kOutTilesPerWarp; ++n)
#pragma unroll
          for (int c = 0; c < 4; ++c) acc[n][c] *= beta[c >> 1];
        const int v_token = (lane & 7) + (((lane >> 3) & 1) << 3);
        const int v_chunk_half = lane >> 4;
#pragma unroll
        for (int j = 0; j < kOutTilesPerWarp / 2; ++j) {
          const int chunk = quarter * (kDimsPerWarp / 8) + 2 * j + v_chunk_half;
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            uint32_t b[4];
            ldmatrix_x4_trans(b, stage_base + swizzled(16 * k + v_token, Smem::kKRowBytes, chunk));
            mma_bf16_16x8x16(acc[2 * j], a[k], b[0], b[1]);
            mma_bf16_16x8x16(acc[2 * j + 1], a[k], b[2], b[3]);
          }
        }
      }
    }
    cp_async_wait<0>();  // nothing may land in a stage after the next sequence reuses it

    // ---- epilogue: l over the 4 warps, then out / lse or the split's partials ----
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const float quad_total = quad_sum(row_sum[half]);
      if (quad_lane == 0) red_aux[local_row[half] * kWarpsPerRowGroup + quarter] = quad_total;
    }
    __syncthreads();
    const PieceOutput output = piece_output(p, part, batch);
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const float4 l4 = *reinterpret_cast<const float4*>(&red_aux[local_row[half] * kWarpsPerRowGroup]);
      const int c0 = 2 * half;
      store_output_row<kOutTilesPerWarp>(p, output, batch, tile_row0 + local_row[half],
                                         quarter * kDimsPerWarp + 2 * quad_lane, row_max[half],
                                         (l4.x + l4.y) + (l4.z + l4.w), p_scale[half], quarter == 0 && quad_lane == 0,
                                         [&](int n) { return make_float2(acc[n][c0], acc[n][c0 + 1]); });
    }
  }
}

}  // namespace snapmla::cuda::sm90
