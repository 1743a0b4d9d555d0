// The sm_90a fp8 split-KV MLA decode kernel on Hopper's fp8 tensor cores
// (wgmma). Same contract, schedule walk, split partials, query prologue and
// online-softmax / P-quantization math as the mma.sync kernel
// (decode_kernel.cuh), which ptxas lowers to f16 HMMA on sm_90: e4m3 operands
// reach the fp8 tensor cores only through wgmma.
//
// CTA: 64 query rows (rows [64 x, 64 x + 64) of a sequence; missing rows are
// zero padding) and 2 math warpgroups (256 threads), walking the
// (sequence, page range) pieces of its SchedulePart with pages strictly in
// order (each page's P scale is applied to an accumulator that has seen all
// earlier pages and no later one: SnapMLA's order enforcement).
//
// Per page, warpgroup g:
//   QK   S[64 rows x 32 tokens] for the page's tokens [32 g, 32 g + 32) in fp32
//        registers: bf16 m64n32k16 x 4 over the RoPE dims into S, and e4m3
//        m64n32k32 over the NoPE dims in 4 chunks of 128 dims, each into a
//        fresh fragment T (two in flight) that is then added to S in fp32
//        (Hopper's fp8 MMA keeps fewer than fp32's accumulator bits;
//        DeepGEMM's promotion). While each chunk runs, all 256 threads build a
//        quarter of the page's V^T.
//   softmax  v1's math on the warpgroup's 32 columns, in registers (a row
//        lives in one quad of lanes), with ONE shared-memory exchange per
//        page: each warpgroup publishes, per row, the maximum m_g of its x
//        and the maximum f_g of its f' = 2^(x - m_g) k_scale. With the page's
//        m = max(m_old, m_0, m_1) and c_g = 2^(m_g - m), every token's
//        f = 2^(x - m) k_scale is f' c_g (exact up to rounding), and max f =
//        max_g f_g c_g exactly (rounding is monotonic), so the P scale s_p =
//        max f / 448 is that of the quantized values. P^ = e4m3(f' c_g / s_p)
//        goes to a shared K-major SW64 tile in V^T's token order.
//   PV   warpgroup g: O[:, 256 g, 256 g + 256) (128 fp32 registers) =
//        O * beta + P^ V^ with P^ and V^ from shared memory (SS), in four
//        n64 quarters with two in flight, each into a fresh fragment that is
//        added to O in fp32 while the next quarter runs (see the PV step).
//   Each warpgroup keeps its own part of l (both apply the same beta),
//   summed in the epilogue.
//
// Barriers per page: 3 (top: the previous PV is done with V^T and P^;
// exchange; before PV: V^T, P^ and the next page's stage are visible).
//
// Shared memory (tiles 1024-byte aligned; wgmma.cuh states the layouts):
//   Q8      4 SW128 tiles [64 rows x 128 B]: tile c holds NoPE dims [128 c, 128 c + 128)
//   Q rope  1 SW128 tile [64 rows x 64 bf16]
//   Q scale 64 f32
//   3 stages of: K8 4 SW128 tiles [64 tokens x 128 B], K rope SW128 [64 x 64 bf16],
//           64 f32 token scales (masked tokens: zero-filled, so all of them are finite)
//   V^T     SW64 [512 dims x 64 B]: row d holds dim d of the page's 64 tokens,
//           tokens of each 16-token group in the order {0,1,8,9, 2,3,10,11,
//           4,5,12,13, 6,7,14,15}, so that a thread's own S columns
//           8 j + 2 (lane % 4) + {0, 1} are 4 consecutive k bytes of a row of P^.
//   P^      SW64 [64 rows x 64 tokens] e4m3 in the same token order.
//   exchange [2 warpgroups][64 rows] float2 (m_g, f_g), and [2][64] f32 l (epilogue).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "core/numeric.h"
#include "core/schedule.h"
#include "cuda/sm90/decode_params.cuh"
#include "cuda/sm90/mma.cuh"
#include "cuda/sm90/token_quant.cuh"
#include "cuda/sm90/wgmma.cuh"
#include "snapmla/kv_format.h"

namespace snapmla::cuda::sm90::wgmma_decode {

// ---- switches (compile time; the proven v3 path is the other value) ----
// PV in four pipelined n64 quarters (two fragments of 32 registers in
// flight) instead of two serial n128 halves (v3).
inline constexpr bool kPvQuarterPipeline = true;
// v5: a third, producer warpgroup issues the page copies and builds each
// page's V^T (into one of two buffers) while the two math warpgroups compute,
// handing both over through mbarriers; the math warpgroups keep v4's per-page
// math. Off (v4): the math warpgroups copy and build V^T themselves.
// On by default since it was measured (docs/perf-notes.md, v5); -DSNAPMLA_PRODUCER_WARPGROUP=0
// builds v4 (no producer) for comparison.
#ifndef SNAPMLA_PRODUCER_WARPGROUP
#define SNAPMLA_PRODUCER_WARPGROUP 1
#endif
inline constexpr bool kProducerWarpgroup = SNAPMLA_PRODUCER_WARPGROUP != 0;
// v6 (producer only): the V^T build issues kVtLoadsInFlight ldmatrix.x4 before
// their permutes and stores (v5: one; ptxas cannot hoist an ldmatrix above the
// previous step's st.shared, so every step paid the full ldmatrix latency),
// and the block-table entry of the page ahead is read before the V^T build
// rather than after it. Needs the producer's 56 registers (math 224).
// -DSNAPMLA_DECODE_V6=0 builds v5 (one load in flight, 40 / 232; same SASS up to
// three equivalent inverted predicates).
#ifndef SNAPMLA_DECODE_V6
#define SNAPMLA_DECODE_V6 1
#endif
inline constexpr bool kProducerV6 = kProducerWarpgroup && SNAPMLA_DECODE_V6 != 0;
inline constexpr int kVtLoadsInFlight = kProducerV6 ? 8 : 1;

inline constexpr int kRows = 64;  // the wgmma M
inline constexpr int kWarpGroups = 2;  // math warpgroups
inline constexpr int kMathThreads = kWarpGroups * 128;
inline constexpr int kProducerThreads = 128;
inline constexpr int kThreads = kMathThreads + (kProducerWarpgroup ? kProducerThreads : 0);
inline constexpr int kWarps = kMathThreads / 32;  // math warps
// setmaxnreg budgets: 128 x producer + 256 x math <= 64 K registers (v5: 40 / 232;
// v6: 56 / 224, the math warpgroups' page loop needs at most 222 with 0 spills).
inline constexpr int kProducerRegisters = kProducerV6 ? 56 : 40;
inline constexpr int kMathRegisters = kProducerV6 ? 224 : 232;
static_assert(kProducerThreads * kProducerRegisters + kMathThreads * kMathRegisters <= 64 * 1024,
              "setmaxnreg budgets exceed the register file");
inline constexpr int kDimsPerWarpGroup = kHeadDimV / kWarpGroups;  // 256 output dims per warpgroup
inline constexpr int kPvN = kPvQuarterPipeline ? 64 : 128;         // the PV wgmma N
inline constexpr int kPvSteps = kDimsPerWarpGroup / kPvN;          // PV fragments per page
inline constexpr int kPvRegs = kPvN / 2;                           // fp32 registers per PV fragment
inline constexpr int kTileRowBytes = 128;                          // SW128 row
inline constexpr int kTileBytes = kRows * kTileRowBytes;           // one [64 x 128 B] tile
inline constexpr int kNopeTiles = kNopeDim / kTileRowBytes;        // 4 QK chunks
inline constexpr int kNopeChunks = kNopeDim / 16;                  // 16-byte chunks per NoPE row
inline constexpr int kRopeChunks = kRopeDim * 2 / 16;              // per RoPE row
inline constexpr int kVtRowBytes = kPageSize;                      // e4m3 tokens per V^T row
inline constexpr int kTokensPerWarpGroup = kPageSize / kWarpGroups;  // S columns per warpgroup
inline constexpr int kSRegs = kTokensPerWarpGroup / 2;               // S fragment (m64n32) registers
inline constexpr float kNegInf = -__builtin_huge_valf();
static_assert(kPageSize == 64 && kRows == 64, "tile shapes assume 64-token pages and 64-row CTAs");
static_assert(kRopeDim * 2 == kTileRowBytes, "a RoPE row must be one SW128 row");
static_assert(kVtRowBytes == 64, "V^T rows must be one SW64 row");

__host__ __device__ constexpr int align1024(int bytes) { return (bytes + 1023) / 1024 * 1024; }

// Page stages. v4: two pages in flight while one is computed (one CTA per
// SM, so the cp.async queue is the only latency hiding there is). v5: two
// stages and two V^T buffers (three stages and two V^T buffers exceed 227 KB);
// the producer refills a stage as soon as the math warpgroups have read it
// (after QK), about one page ahead.
inline constexpr int kStages = kProducerWarpgroup ? 2 : 3;
inline constexpr int kVtBuffers = kProducerWarpgroup ? 2 : 1;

struct Smem {
  static constexpr int kQ = 0;
  static constexpr int kQRope = kQ + kNopeTiles * kTileBytes;
  static constexpr int kQScale = kQRope + kTileBytes;
  static constexpr int kStage0 = align1024(kQScale + kRows * 4);
  static constexpr int kStageRope = kNopeTiles * kTileBytes;
  static constexpr int kStageScale = kStageRope + kTileBytes;
  // v5: the page's valid-token count, written by the producer.
  static constexpr int kStageValid = kStageScale + kPageSize * 4;
  static constexpr int kStageBytes = align1024(kStageValid + 4);
  static constexpr int kVt = kStage0 + kStages * kStageBytes;
  static constexpr int kVtBytes = kHeadDimV * kVtRowBytes;
  static constexpr int kPTile = kVt + kVtBuffers * kVtBytes;
  // [2 warpgroups][64 rows] float2 (m_g, f_g), then [2][64] f32 l.
  static constexpr int kExchange = kPTile + kRows * kVtRowBytes;
  static constexpr int kExchangeSlots = kWarpGroups * kRows;
  static constexpr int kSumExchange = kExchange + kExchangeSlots * 8;
  // v5 mbarriers: stage full / empty [kStages], V^T full / empty [kVtBuffers].
  static constexpr int kBarriers = kSumExchange + kExchangeSlots * 4;
  static constexpr int kStageFull = kBarriers;
  static constexpr int kStageEmpty = kStageFull + kStages * 8;
  static constexpr int kVtFull = kStageEmpty + kStages * 8;
  static constexpr int kVtEmpty = kVtFull + kVtBuffers * 8;
  static constexpr int kBytes = kVtEmpty + kVtBuffers * 8;
  // The dynamic shared memory base is aligned up to 1024 at run time.
  static constexpr int kAllocBytes = kBytes + 1024;
  static_assert(kAllocBytes <= 227 * 1024, "wgmma decode tile does not fit in shared memory");
  static_assert(kQ % 1024 == 0 && kQRope % 1024 == 0 && kStage0 % 1024 == 0 && kStageBytes % 1024 == 0 &&
                    kStageRope % 1024 == 0 && kVt % 1024 == 0 && kPTile % 1024 == 0,
                "wgmma operand tiles must be 1024-byte aligned");
};

// Byte offset of 16-byte chunk `chunk` (0..31) of NoPE row `row` in a 4-tile
// SW128 stack (Q8 or a stage's K8): tile chunk / 8, chunk chunk % 8 in it.
__device__ __forceinline__ uint32_t nope_offset(int row, int chunk) {
  return static_cast<uint32_t>((chunk >> 3) * kTileBytes) + wgmma::sw128_offset(row, chunk & 7);
}

// The page's V^T from its K8 tiles, in kVtUnits units of (16-token group,
// 32 dims), one per warp and step: unit u = warp + 8 step = (token group
// u % 4 = warp % 4, dims [32 (u / 4), 32 (u / 4) + 32) = 32 (warp / 4) + 64 step
// + [0, 32)). ldmatrix.trans on 16-bit pairs gives lane l, for dim pair
// p = l / 4 (dims 2p, 2p+1 of a 16-dim chunk) and q = l % 4, the bytes
// [tok 2q: d 2p, d 2p+1 | tok 2q+1: d 2p, d 2p+1] of the group's first 8
// tokens (r[0]) and of tokens 8.. (r[1]); prmt 0x6420 / 0x7531 makes dim 2p /
// 2p+1's bytes for tokens {2q, 2q+1, 8+2q, 9+2q}: positions 4q..4q+3 of the
// group, the permuted order above. SW64 chunk index = token group.
//
// Every address is a per-thread offset plus a compile-time constant of the
// step: lane l reads token row 16 (warp % 4) + l % 8 + 8 ((l / 8) % 2), NoPE
// chunk c = c0 + 4 step with c0 = 2 (warp / 4) + l / 16 < 4, i.e. tile step / 2
// and in-tile chunk c0 + 4 (step % 2), whose swizzled place (c0 + 4 (step % 2))
// ^ (row % 8) = ((c0 ^ row % 8) ^ 4 (step % 2)): bit 6 of the offset flips with
// the step's parity. It writes V^T rows d = 32 (warp / 4) + 64 step + 16 h + 2p
// (+1), whose SW64 phase (d / 2) % 4 = p % 4 does not depend on the step.
struct VtThreadOffsets {
  uint32_t k_read;    // even steps' ldmatrix offset in the K8 stack
  uint32_t vt_write;  // offset in V^T of step 0, h 0, dim 2p
};
__device__ __forceinline__ VtThreadOffsets vt_thread_offsets(int warp, int lane) {
  const int row = 16 * (warp & 3) + (lane & 7) + 8 * ((lane >> 3) & 1);
  const int c0 = 2 * (warp >> 2) + (lane >> 4);
  const int pair = lane >> 2;
  VtThreadOffsets o;
  o.k_read = wgmma::sw128_offset(row, c0);
  o.vt_write = wgmma::sw64_offset(32 * (warp >> 2) + 2 * pair, warp & 3) + 4 * (lane & 3);
  return o;
}
inline constexpr int kVtUnits = (kPageSize / 16) * (kNopeDim / 32);  // 64
inline constexpr int kVtSteps = kVtUnits / kWarps;                   // 8 per warp
inline constexpr int kVtStepsPerChunk = kVtSteps / kNopeTiles;       // 2 per warp per QK chunk
static_assert(kVtStepsPerChunk * kWarps * kNopeTiles == kVtUnits, "V^T units must split evenly");
static_assert(kWarps == 8, "the V^T unit walk assumes token group = warp % 4");

// Steps go in batches of kLoads: all the batch's ldmatrix first, then its
// permutes and stores, so that kLoads loads are in flight at once (the asm
// statements are volatile, so this source order is the issue order).
template <int kLoads = 1>
__device__ __forceinline__ void build_vt_steps(uint32_t k_tiles, uint32_t vt, const VtThreadOffsets& o,
                                               int step_begin, int step_end) {
#pragma unroll
  for (int step0 = step_begin; step0 < step_end; step0 += kLoads) {
    uint32_t r[kLoads][4];
#pragma unroll
    for (int i = 0; i < kLoads; ++i) {
      const int step = step0 + i;
      ldmatrix_x4_trans(r[i], k_tiles + (step >> 1) * kTileBytes + (o.k_read ^ ((step & 1) << 6)));
    }
#pragma unroll
    for (int i = 0; i < kLoads; ++i) {
      const int step = step0 + i;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const uint32_t dst = vt + o.vt_write + (64 * step + 16 * h) * kVtRowBytes;
        st_shared_u32(dst, byte_perm(r[i][2 * h], r[i][2 * h + 1], 0x6420));
        st_shared_u32(dst + kVtRowBytes, byte_perm(r[i][2 * h], r[i][2 * h + 1], 0x7531));
      }
    }
  }
}
static_assert(kVtSteps % kVtLoadsInFlight == 0, "V^T load batches must split a virtual warp's steps");

// Issues the 4 e4m3 k steps of NoPE chunk `chunk` for 32 tokens into the
// fresh fragment t, from descriptor low words (wgmma::desc_at) of Q8 and of
// the warpgroup's first K8 token row.
__device__ __forceinline__ void issue_qk_chunk(float (&t)[kSRegs], uint32_t q_desc, uint32_t k_desc, int chunk) {
#pragma unroll
  for (int k = 0; k < kTileRowBytes / 32; ++k) {
    const uint32_t offset = chunk * kTileBytes + 32 * k;
    wgmma::mma_64x32x32_e4m3_ss(t, wgmma::desc_at(q_desc, offset, wgmma::Swizzle::k128B),
                                wgmma::desc_at(k_desc, offset, wgmma::Swizzle::k128B), k > 0);
  }
}

// The PV shape of a fragment's size: m64n64k32 (kPvQuarterPipeline) or m64n128k32.
__device__ __forceinline__ void mma_pv(float (&d)[32], uint64_t p_desc, uint64_t v_desc, bool accumulate) {
  wgmma::mma_64x64x32_e4m3_ss(d, p_desc, v_desc, accumulate);
}
__device__ __forceinline__ void mma_pv(float (&d)[64], uint64_t p_desc, uint64_t v_desc, bool accumulate) {
  wgmma::mma_64x128x32_e4m3_ss(d, p_desc, v_desc, accumulate);
}

// 2^x on MUFU.EX2 alone: the ftz form skips exp2f's rescaling around results
// below 2^-126, which only differ from 0 for tokens whose weight relative to
// the row's running maximum is below 2^-126 (invisible after normalisation).
__device__ __forceinline__ float exp2_ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Copies physical page `physical` (valid_rows of its tokens; resolve_page)
// into the stage at stage_base with kCopyThreads threads (this one:
// `thread`); load_page resolves the piece's page `page` first and returns its
// valid tokens (the reporter thread flags a bad page). Thread t copies
// 16-byte chunks of rows t / C + 8 i (C threads per row): the row step is a
// multiple of 8, so the swizzle (a function of row % 8) is the same for all of
// a thread's rows and each copy is base + constant. A masked row's source is
// still a slot of the same in-pool page (never read: source size 0), so no
// address select is needed.
template <int kCopyThreads>
__device__ __forceinline__ void load_resolved_page(const DecodeKernelParams& p, int64_t physical, int valid_rows,
                                                   uint32_t stage_base, int thread) {
  const uint8_t* nope_page = p.kv_nope + physical * kPageSize * kNopeDim;
  {
    // 256 threads: one chunk of rows t / 32 + 8 i; 128: chunks c, c + 16 of rows t / 16 + 8 i.
    constexpr int kRowStep = kCopyThreads / kNopeChunks >= 8 ? kCopyThreads / kNopeChunks : 8;
    constexpr int kThreadsPerRow = kCopyThreads / kRowStep;
    constexpr int kChunkCopies = kNopeChunks / kThreadsPerRow;
    static_assert(kRowStep % 8 == 0 && kPageSize % kRowStep == 0 && kNopeChunks % kThreadsPerRow == 0,
                  "NoPE copy rows must keep their swizzle phase");
    const int row0 = thread / kThreadsPerRow, chunk = thread % kThreadsPerRow;
#pragma unroll 1
    for (int k = 0; k < kChunkCopies; ++k) {
      const uint32_t dst = stage_base + nope_offset(row0, chunk + kThreadsPerRow * k);
      const uint8_t* src = nope_page + row0 * kNopeDim + (chunk + kThreadsPerRow * k) * 16;
#pragma unroll
      for (int i = 0; i < kPageSize / kRowStep; ++i) {
        const bool valid = row0 + kRowStep * i < valid_rows;
        cp_async_16(dst + kRowStep * kTileRowBytes * i, src + kRowStep * kNopeDim * i, valid);
      }
    }
  }
  const uint8_t* rope_page = reinterpret_cast<const uint8_t*>(p.kv_rope) + physical * kPageSize * kRopeDim * 2;
  {
    constexpr int kRowStep = kCopyThreads / kRopeChunks;
    static_assert(kCopyThreads % kRopeChunks == 0 && kRowStep % 8 == 0 && kPageSize % kRowStep == 0,
                  "RoPE copy rows must keep their swizzle phase");
    const int row0 = thread / kRopeChunks, chunk = thread % kRopeChunks;
    const uint32_t dst = stage_base + Smem::kStageRope + wgmma::sw128_offset(row0, chunk);
    const uint8_t* src = rope_page + row0 * kRopeDim * 2 + chunk * 16;
#pragma unroll
    for (int i = 0; i < kPageSize / kRowStep; ++i) {
      const bool valid = row0 + kRowStep * i < valid_rows;
      cp_async_16(dst + kRowStep * kTileRowBytes * i, src + kRowStep * kRopeDim * 2 * i, valid);
    }
  }
  // Masked tokens get scale 0 (their f = e * scale must be 0 whatever the slot holds).
  const float* scale_page = p.kv_scale + physical * kPageSize;
  if (thread < kPageSize) {
    const bool valid = thread < valid_rows;
    cp_async_4(stage_base + Smem::kStageScale + thread * 4, valid ? scale_page + thread : scale_page, valid);
  }
}
template <int kCopyThreads>
__device__ __forceinline__ int load_page(const DecodeKernelParams& p, const SequencePiece& piece, int page,
                                         uint32_t stage_base, int thread, bool reporter) {
  int64_t physical;
  const int valid_rows = resolve_page(p, piece, page, reporter, &physical);
  load_resolved_page<kCopyThreads>(p, physical, valid_rows, stage_base, thread);
  return valid_rows;
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

// v5 producer warpgroup (thread = 0..127): for the CTA's n-th page (all pieces
// in order, n counted from 0), stage n % kStages and V^T buffer n % 2, phase
// parity (n / kStages) % 2 and (n / 2) % 2:
//   copies land (cp.async groups, one per page, kStages - 1 younger ones
//   allowed) -> fence to the async proxy -> arrive on stage full (128);
//   wait stage full (all copies of the page, for V^T) and V^T empty (both
//   math warpgroups done with the PV of page n - 2) -> build V^T -> fence ->
//   arrive on V^T full (128); wait stage empty (the math warpgroups read it,
//   256 arrivals) -> copy page n + kStages into it.
// The page's valid-token count goes next to its scales (thread 0, st.shared
// before its arrive), for the math warpgroups' mask.
__device__ __forceinline__ void run_producer(const DecodeKernelParams& p, const SchedulePart& part,
                                             uint32_t smem_base, uint8_t* smem, int thread) {
  const int warp = thread >> 5, lane = thread & 31;
  auto stage_base = [&](int stage) { return smem_base + Smem::kStage0 + stage * Smem::kStageBytes; };
  auto copy = [&](const PageCursor& c, int stage) {
    const int valid = load_page<kProducerThreads>(p, c.piece, c.page, stage_base(stage), thread, thread == 0);
    if (thread == 0) *reinterpret_cast<int*>(smem + Smem::kStage0 + stage * Smem::kStageBytes + Smem::kStageValid) = valid;
  };
  // v6: the resolved block-table entry of `ahead`, read one V^T build before its copy.
  auto copy_resolved = [&](int64_t physical, int valid, int stage) {
    load_resolved_page<kProducerThreads>(p, physical, valid, stage_base(stage), thread);
    if (thread == 0) *reinterpret_cast<int*>(smem + Smem::kStage0 + stage * Smem::kStageBytes + Smem::kStageValid) = valid;
  };
  PageCursor compute = first_page(p, part);
  PageCursor ahead = compute;
#pragma unroll 1
  for (int n = 0; n < kStages; ++n) {
    if (has_page(part, ahead)) {
      copy(ahead, n);
      next_page(p, part, ahead);
    }
    cp_async_commit();
  }
#pragma unroll 1
  for (int n = 0; has_page(part, compute); ++n, next_page(p, part, compute)) {
    const int stage = n % kStages, vt_buffer = n & 1;
    const uint32_t full = smem_base + Smem::kStageFull + 8 * stage;
    cp_async_wait<kStages - 1>();
    wgmma::fence_proxy_async_shared();
    wgmma::mbarrier_arrive(full);
    wgmma::mbarrier_wait(full, (n / kStages) & 1);
    // v6: the page ahead's block-table load is in flight during the V^T build
    // (its copy cannot be: it refills this page's stage, V^T's source).
    const bool copy_ahead = has_page(part, ahead);
    int64_t ahead_physical = 0;
    int ahead_valid = 0;
    if (kProducerV6 && copy_ahead)
      ahead_valid = resolve_page(p, ahead.piece, ahead.page, thread == 0, &ahead_physical);
    if (n >= 2) wgmma::mbarrier_wait(smem_base + Smem::kVtEmpty + 8 * vt_buffer, ((n >> 1) - 1) & 1);
    const uint32_t vt = smem_base + Smem::kVt + vt_buffer * Smem::kVtBytes;
    // The v4 V^T unit walk for 8 warps, run as virtual warps w and w + 4.
#pragma unroll 1
    for (int half = 0; half < 2; ++half)
      build_vt_steps<kVtLoadsInFlight>(stage_base(stage), vt, vt_thread_offsets(warp + 4 * half, lane), 0,
                                       kVtSteps);
    wgmma::fence_proxy_async_shared();
    wgmma::mbarrier_arrive(smem_base + Smem::kVtFull + 8 * vt_buffer);
    if (copy_ahead) {
      wgmma::mbarrier_wait(smem_base + Smem::kStageEmpty + 8 * stage, (n / kStages) & 1);
      if constexpr (kProducerV6) {
        copy_resolved(ahead_physical, ahead_valid, stage);
      } else {
        copy(ahead, stage);
      }
      next_page(p, part, ahead);
    }
    cp_async_commit();
  }
  cp_async_wait<0>();
}

__global__ void __launch_bounds__(kThreads, 1) mla_decode_fp8_wgmma_kernel(const DecodeKernelParams p) {
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  // The swizzle is a function of address bits 4..9, so tiles start 1024-byte aligned.
  const uint32_t raw_base = smem_address(smem_raw);
  const uint32_t smem_base = (raw_base + 1023u) & ~1023u;
  uint8_t* smem = smem_raw + (smem_base - raw_base);

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  // Through a shuffle so that the compiler knows it is warp-uniform (the
  // descriptors then stay in uniform registers).
  const int warp_group = __shfl_sync(0xffffffffu, warp >> 2, 0);
  const int group_warp = warp & 3;     // fragment rows [16 w, 16 w + 16)
  const int group_row = lane >> 2;
  const int quad_lane = lane & 3;
  const int tile_row0 = blockIdx.x * kRows;
  const int local_row[2] = {16 * group_warp + group_row, 16 * group_warp + group_row + 8};
  const SchedulePart part = load_schedule_part(p.tile_scheduler_metadata, blockIdx.y);

  if constexpr (kProducerWarpgroup) {
    if (tid == 0) {
      for (int i = 0; i < kStages; ++i) {
        wgmma::mbarrier_init(smem_base + Smem::kStageFull + 8 * i, kProducerThreads);
        wgmma::mbarrier_init(smem_base + Smem::kStageEmpty + 8 * i, kMathThreads);
      }
      for (int i = 0; i < kVtBuffers; ++i) {
        wgmma::mbarrier_init(smem_base + Smem::kVtFull + 8 * i, kProducerThreads);
        wgmma::mbarrier_init(smem_base + Smem::kVtEmpty + 8 * i, kMathThreads);
      }
    }
    __syncthreads();  // the last CTA-wide barrier: from here on the roles synchronise apart
    if (warp_group == kWarpGroups) {
      wgmma::set_max_registers_decrease<kProducerRegisters>();
      run_producer(p, part, smem_base, smem, tid - kMathThreads);
      return;
    }
    wgmma::set_max_registers_increase<kMathRegisters>();
  }
  // Barrier of the two math warpgroups (the producer never joins one).
  auto math_sync = [] {
    if constexpr (kProducerWarpgroup) {
      wgmma::named_barrier_sync(1, kMathThreads);
    } else {
      __syncthreads();
    }
  };
  int page_count = 0;  // v5: pages computed so far (all pieces), for stage, buffer and phases

  float* q_scale_smem = reinterpret_cast<float*>(smem + Smem::kQScale);
  const uint32_t q_tiles = smem_base + Smem::kQ;
  const uint32_t q_rope_tile = smem_base + Smem::kQRope;
  const uint32_t vt_base = smem_base + Smem::kVt;
  const uint32_t p_tile = smem_base + Smem::kPTile;
  float2* max_exchange = reinterpret_cast<float2*>(smem + Smem::kExchange);
  float* sum_exchange = reinterpret_cast<float*>(smem + Smem::kSumExchange);
  // Loop-invariant descriptor low words.
  const uint32_t q_desc = wgmma::desc_low_word(q_tiles);
  const uint32_t q_rope_desc = wgmma::desc_low_word(q_rope_tile);
  const uint32_t p_desc = wgmma::desc_low_word(p_tile);
  const uint32_t vt_desc = wgmma::desc_low_word(vt_base + warp_group * kDimsPerWarpGroup * kVtRowBytes);
  const VtThreadOffsets vt_offsets = vt_thread_offsets(warp, lane);

  for (int batch = part.begin_batch; batch <= part.end_batch; ++batch) {
    const SequencePiece piece = sequence_piece(p, part, batch);
    const int page_begin = piece.page_begin, page_end = piece.page_end;

    // ---- prologue: the query tile, quantized here unless given (as v1) ----
    math_sync();  // the previous sequence is done with Q (v4: and the stages)
    load_query_fp8<kRows>(
        p, piece, tile_row0, tid, kMathThreads, smem, [](int row, int chunk) { return Smem::kQ + nope_offset(row, chunk); },
        [](int row, int chunk) { return Smem::kQRope + wgmma::sw128_offset(row, chunk); }, q_scale_smem);
    // One cp.async group per page (possibly empty): the prologue's two, then
    // one per iteration for the page two ahead. valid_ahead[i]: valid tokens
    // of page + i (read from the block table once, by its copy).
    int valid_ahead[2] = {0, 0};
    if constexpr (!kProducerWarpgroup) {
      const uint32_t stage0 = smem_base + Smem::kStage0;
      if (page_begin < page_end) valid_ahead[0] = load_page<kMathThreads>(p, piece, page_begin, stage0, tid, tid == 0);
      cp_async_commit();
      if (page_begin + 1 < page_end)
        valid_ahead[1] = load_page<kMathThreads>(p, piece, page_begin + 1, stage0 + Smem::kStageBytes, tid, tid == 0);
      cp_async_commit();
    }

    // ---- per-row state (identical in both warpgroups) ----
    int visible[2];
    visible_tokens_of_rows(p, piece, tile_row0, local_row, visible);
    float row_max[2] = {kNegInf, kNegInf};  // m, log2 units
    float p_scale[2] = {1.0f, 1.0f};        // current P scale s_p
    float row_sum[2] = {0.0f, 0.0f};        // this thread's share of its warpgroup's part of l (units of s_p)
    float acc[128];  // O[row, 256 g + 8 j + 2 (lane % 4) + {0,1}] at 4 j + {0,1} (row) / {2,3} (row + 8)
#pragma unroll
    for (int i = 0; i < 128; ++i) acc[i] = 0.0f;
    float s[kSRegs], t[2][kSRegs];
#pragma unroll
    for (int i = 0; i < kSRegs; ++i) s[i] = t[0][i] = t[1][i] = 0.0f;

    // Issues page `page`'s QK from stage `stage` (visible to wgmma): RoPE into
    // S, NoPE chunks 0 and 1 into T[0], T[1] (three commit groups in all:
    // RoPE + chunk 0, chunk 1; chunks 2 and 3 are issued as T frees up).
    auto issue_qk = [&](int stage) {
      // Warp-uniform; the shuffle lets the compiler keep it in a uniform register.
      const uint32_t k_desc = __shfl_sync(
          0xffffffffu,
          wgmma::desc_low_word(smem_base + Smem::kStage0 + stage * Smem::kStageBytes +
                               warp_group * kTokensPerWarpGroup * kTileRowBytes),
          0);
      wgmma::fence_registers(s);
      wgmma::fence_registers(t[0]);
      wgmma::fence_registers(t[1]);
      wgmma::fence();
#pragma unroll
      for (int k = 0; k < kRopeDim * 2 / 32; ++k)
        wgmma::mma_64x32x16_bf16_ss(s, wgmma::desc_at(q_rope_desc, 32 * k, wgmma::Swizzle::k128B),
                                    wgmma::desc_at(k_desc, Smem::kStageRope + 32 * k, wgmma::Swizzle::k128B), k > 0);
      issue_qk_chunk(t[0], q_desc, k_desc, 0);
      wgmma::commit();
      issue_qk_chunk(t[1], q_desc, k_desc, 1);
      wgmma::commit();
    };

    // v4: the first page's wait below also covers Q (its copies are in that group).
    if constexpr (kProducerWarpgroup) {
      cp_async_wait<0>();
      wgmma::fence_proxy_async_shared();
    }
    math_sync();  // the query scales (v5: and Q, visible to wgmma)
    const float row_scale[2] = {q_scale_smem[local_row[0]] * p.scale_log2, q_scale_smem[local_row[1]] * p.scale_log2};

    for (int page = page_begin; page < page_end; ++page, ++page_count) {
      const int stage = kProducerWarpgroup ? page_count % kStages : (page - page_begin) % kStages;
      int valid_tokens;
      if constexpr (kProducerWarpgroup) {
        wgmma::mbarrier_wait(smem_base + Smem::kStageFull + 8 * stage, (page_count / kStages) & 1);
        valid_tokens = *reinterpret_cast<const int*>(smem + Smem::kStage0 + stage * Smem::kStageBytes +
                                                      Smem::kStageValid);
      } else {
        cp_async_wait<1>();  // all but the newest group (the next page's) have landed
        wgmma::fence_proxy_async_shared();
        // This page (and Q) landed and is visible to wgmma; both warpgroups are
        // done with the previous page's V^T and P^ (each waited for its PV) and
        // with the stage the copy below refills.
        __syncthreads();
        valid_tokens = valid_ahead[0];
        valid_ahead[0] = valid_ahead[1];
        valid_ahead[1] = page + 2 < page_end ? load_page<kMathThreads>(p, piece, page + 2,
                                                                       smem_base + Smem::kStage0 +
                                                                           (stage + 2) % kStages * Smem::kStageBytes,
                                                                       tid, tid == 0)
                                             : 0;
        cp_async_commit();
      }

      const uint32_t stage_base = smem_base + Smem::kStage0 + stage * Smem::kStageBytes;
      const float* k_scale_smem =
          reinterpret_cast<const float*>(smem + Smem::kStage0 + stage * Smem::kStageBytes + Smem::kStageScale);
      // Issued after the copy so that the block-table load's latency hides under it.
      issue_qk(stage);
      // NoPE chunk c goes into T[c % 2]; two chunks are in flight.
      const uint32_t k_desc = __shfl_sync(
          0xffffffffu, wgmma::desc_low_word(stage_base + warp_group * kTokensPerWarpGroup * kTileRowBytes), 0);
#pragma unroll
      for (int chunk = 0; chunk < kNopeTiles; ++chunk) {
        if constexpr (!kProducerWarpgroup)
          build_vt_steps(stage_base, vt_base, vt_offsets, chunk * kVtStepsPerChunk, (chunk + 1) * kVtStepsPerChunk);
        // Groups in flight: this chunk's (with the RoPE steps for chunk 0) and the next one's.
        if (chunk + 1 < kNopeTiles) {
          wgmma::wait<1>();
        } else {
          wgmma::wait<0>();
        }
        float(&done)[kSRegs] = t[chunk & 1];
        wgmma::fence_registers(s);
        wgmma::fence_registers(done);
#pragma unroll
        for (int i = 0; i < kSRegs; ++i) s[i] += done[i];
        if (chunk + 2 < kNopeTiles) {
          wgmma::fence_registers(done);
          wgmma::fence();
          issue_qk_chunk(done, q_desc, k_desc, chunk + 2);
          wgmma::commit();
        }
      }

      // ---- online softmax, one exchange (see the top of the file) ----
      // s[4 j + c]: row local_row[c / 2], page token token0 + 8 j + (c & 1).
      const int token0 = warp_group * kTokensPerWarpGroup + 2 * quad_lane;
      float2 k_scale[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) k_scale[j] = *reinterpret_cast<const float2*>(k_scale_smem + token0 + 8 * j);
      // v5: QK is complete and the scales and valid count are read: the stage may be refilled.
      if constexpr (kProducerWarpgroup) wgmma::mbarrier_arrive(smem_base + Smem::kStageEmpty + 8 * stage);
      const int page_token0 = page * kPageSize;
      int keep_below[2];  // tokens of the page this row sees
#pragma unroll
      for (int half = 0; half < 2; ++half) keep_below[half] = min(valid_tokens, visible[half] - page_token0);
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const float score = s[4 * j + c] * row_scale[c >> 1];
          s[4 * j + c] = score * ((c & 1) ? k_scale[j].y : k_scale[j].x);
        }
      // Only the last page of a sequence (or a causal one) masks anything.
      if (min(keep_below[0], keep_below[1]) < kPageSize) {
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
          for (int c = 0; c < 4; ++c)
            if (token0 + 8 * j + (c & 1) >= keep_below[c >> 1]) s[4 * j + c] = kNegInf;
      }
      float group_max[2] = {kNegInf, kNegInf};  // m_g
#pragma unroll
      for (int i = 0; i < kSRegs; ++i) group_max[(i >> 1) & 1] = fmaxf(group_max[(i >> 1) & 1], s[i]);
#pragma unroll
      for (int half = 0; half < 2; ++half) group_max[half] = quad_max(group_max[half]);
      // e' = 2^(x - m_g) and f' = e' k_scale in place (nothing seen in this
      // half: every x is -inf and e' = 0, without -inf - -inf).
      float e_sum[2] = {0.0f, 0.0f}, group_f_max[2] = {0.0f, 0.0f};
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int half = c >> 1;
          const float base = group_max[half] == kNegInf ? 0.0f : group_max[half];
          const float e = exp2_ftz(s[4 * j + c] - base);
          e_sum[half] += e;
          s[4 * j + c] = e * ((c & 1) ? k_scale[j].y : k_scale[j].x);
          group_f_max[half] = fmaxf(group_f_max[half], s[4 * j + c]);
        }
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        group_f_max[half] = quad_max(group_f_max[half]);
        if (quad_lane == 0)
          max_exchange[warp_group * kRows + local_row[half]] = make_float2(group_max[half], group_f_max[half]);
      }
      math_sync();
      float own_factor[2], beta[2];  // c_g / s_p for this warpgroup's f'; O's rescale
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const float2 other = max_exchange[(warp_group ^ 1) * kRows + local_row[half]];
        // Both warpgroups evaluate the same expressions on the same values, so
        // m, s_p and beta agree bit for bit (max is exact and commutative).
        const float new_max = fmaxf(row_max[half], fmaxf(group_max[half], other.x));
        const float own_c = group_max[half] == kNegInf ? 0.0f : exp2f(group_max[half] - new_max);
        const float other_c = other.x == kNegInf ? 0.0f : exp2f(other.x - new_max);
        const float page_f_max = fmaxf(group_f_max[half] * own_c, other.y * other_c);
        const bool any = page_f_max > 0.0f;
        const float new_scale = any ? page_f_max / kE4M3Max : 1.0f;
        const float inv_scale = any ? kE4M3Max / page_f_max : 1.0f;
        beta[half] =
            row_max[half] == kNegInf ? 0.0f : exp2f(row_max[half] - new_max) * (p_scale[half] * inv_scale);
        own_factor[half] = own_c * inv_scale;
        row_sum[half] = fmaf(row_sum[half], beta[half], e_sum[half] * own_factor[half]);
        p_scale[half] = new_scale;
        row_max[half] = new_max;
      }
      // P^ into the shared tile: token group 2 g + jj of row r holds, at bytes
      // 4 q .. 4 q + 3, tokens {2q, 2q+1, 8+2q, 9+2q} of the group (V^T's
      // order): exactly thread q's columns j = 2 jj and 2 jj + 1.
#pragma unroll
      for (int jj = 0; jj < 2; ++jj)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int j0 = 2 * jj, c0 = 2 * half;
          const float factor = own_factor[half];
          const uint32_t lo = token_quant::e4m3x2_bits(s[4 * j0 + c0] * factor, s[4 * j0 + c0 + 1] * factor);
          const uint32_t hi =
              token_quant::e4m3x2_bits(s[4 * (j0 + 1) + c0] * factor, s[4 * (j0 + 1) + c0 + 1] * factor);
          st_shared_u32(p_tile + wgmma::sw64_offset(local_row[half], 2 * warp_group + jj) + 4 * quad_lane,
                        lo | (hi << 16));
        }

      wgmma::fence_proxy_async_shared();
      math_sync();  // both halves of P^ (v4: and V^T) complete and visible to wgmma
      const int vt_buffer = kProducerWarpgroup ? page_count & 1 : 0;
      if constexpr (kProducerWarpgroup)
        wgmma::mbarrier_wait(smem_base + Smem::kVtFull + 8 * vt_buffer, (page_count >> 1) & 1);

      // ---- O = O * beta + P^ V^ for this warpgroup's 256 dims ----
      // The page's product is formed in a fresh fragment and added in fp32
      // (as v1): the fp8 MMA's accumulator keeps ~13 mantissa bits (DeepSeek-V3
      // report; SageAttention2's "FP22"), and accumulating every page into O
      // through it would truncate O once per page. The 256 dims go as kPvSteps
      // fragments of kPvN (two in flight when kPvQuarterPipeline).
      float product[2][kPvRegs];
      auto issue_pv = [&](int step, float (&d)[kPvRegs]) {
        wgmma::fence_registers(d);
        wgmma::fence();
#pragma unroll
        for (int kk = 0; kk < 2; ++kk) {
          const uint64_t p_operand = wgmma::desc_at(p_desc, 32 * kk, wgmma::Swizzle::k64B);
          const uint64_t v_operand =
              wgmma::desc_at(vt_desc, vt_buffer * Smem::kVtBytes + step * kPvN * kVtRowBytes + 32 * kk,
                             wgmma::Swizzle::k64B);
          mma_pv(d, p_operand, v_operand, kk > 0);
        }
        wgmma::commit();
      };
      // product[4 j + c] of step n is dim kPvN n + 8 j + 2 (lane % 4) + (c & 1)
      // of the warpgroup's 256: acc index kPvRegs n + 4 j + c.
      auto add_pv = [&](int step, float (&d)[kPvRegs]) {
        wgmma::fence_registers(d);
#pragma unroll
        for (int i = 0; i < kPvRegs; ++i) {
          float& o = acc[kPvRegs * step + i];
          o = fmaf(o, beta[(i >> 1) & 1], d[i]);
        }
      };
      if constexpr (kPvQuarterPipeline) {
        issue_pv(0, product[0]);
        issue_pv(1, product[1]);
#pragma unroll
        for (int step = 0; step < kPvSteps; ++step) {
          if (step + 1 < kPvSteps) {
            wgmma::wait<1>();
          } else {
            wgmma::wait<0>();
          }
          add_pv(step, product[step & 1]);
          if (step + 2 < kPvSteps) issue_pv(step + 2, product[step & 1]);
        }
      } else {
#pragma unroll
        for (int step = 0; step < kPvSteps; ++step) {
          issue_pv(step, product[0]);
          wgmma::wait<0>();
          add_pv(step, product[0]);
        }
      }
      // v5: this warpgroup's PV has read V^T (and P^; the next exchange barrier guards P^).
      if constexpr (kProducerWarpgroup) wgmma::mbarrier_arrive(smem_base + Smem::kVtEmpty + 8 * vt_buffer);
    }
    cp_async_wait<0>();  // nothing may land in a stage after the next sequence reuses it

    // ---- epilogue: out / lse or the split's partials (as v1) ----
    const PieceOutput output = piece_output(p, part, batch);
    float row_l[2];
    // l = the two warpgroups' parts, added in the same order in both.
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      row_l[half] = quad_sum(row_sum[half]);
      if (quad_lane == 0) sum_exchange[warp_group * kRows + local_row[half]] = row_l[half];
    }
    math_sync();
#pragma unroll
    for (int half = 0; half < 2; ++half)
      row_l[half] = sum_exchange[local_row[half]] + sum_exchange[kRows + local_row[half]];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int c0 = 2 * half;
      store_output_row<kDimsPerWarpGroup / 8>(
          p, output, batch, tile_row0 + local_row[half], warp_group * kDimsPerWarpGroup + 2 * quad_lane,
          row_max[half], row_l[half], p_scale[half], warp_group == 0 && quad_lane == 0,
          [&](int j) { return make_float2(acc[4 * j + c0], acc[4 * j + c0 + 1]); });
    }
  }
}

}  // namespace snapmla::cuda::sm90::wgmma_decode
