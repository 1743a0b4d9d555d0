// The sm_90a fp8 split-KV MLA decode kernel on Hopper's fp8 tensor cores
// (wgmma). Same contract, schedule walk, split partials and query prologue as
// the mma.sync kernel (decode_kernel.cuh), which ptxas lowers to f16 HMMA on
// sm_90: e4m3 operands reach the fp8 tensor cores only through wgmma.
//
// CTA: 64 query rows (rows [64 x, 64 x + 64) of a sequence; missing rows are
// zero padding), 3 warpgroups: a producer (page copies, V^T) and two math
// warpgroups in a "seesaw" (v7): the CTA's n-th page (counted over all pieces
// of its SchedulePart) belongs to math warpgroup n % 2, which computes its
// scores and its P^; BOTH math warpgroups then add that page's P^ V into
// their half of O, pages strictly in order (every page's P scale meets an
// accumulator that has seen all earlier pages and no later one: SnapMLA's
// order). While one warpgroup runs its softmax on the CUDA cores, the other
// keeps the tensor cores busy with a QK or a PV.
//
// Owner of page n (warpgroup n % 2):
//   QK   S[64 rows x 64 tokens] fp32: bf16 m64n64k16 x 4 over the RoPE dims
//        into S, e4m3 m64n64k32 over the NoPE dims in 2 chunks of 256 dims,
//        each into a fresh fragment T added to S in fp32 (Hopper's fp8 MMA
//        keeps fewer than fp32's accumulator bits; DeepGEMM's promotion).
//   softmax on the page alone: x = S q_scale k_scale scale_log2 (log2 units),
//        m_n = max x, e = 2^(x - m_n), f = e k_scale (V's per-token scale
//        folded into P), P scale s_n = max f / 448, P^ = e4m3(f / s_n) into
//        P tile n % 4 (K-major SW64, V^T's token order), and per row (m_n,
//        s_n) plus this thread's part of sum e. Quantizing relative to the
//        page's own maximum gives the same P^ as relative to the running
//        maximum (P^ is invariant to a per-row factor), so no exchange
//        between the warpgroups precedes it.
// Every math warpgroup g, page n in order:
//   PV   acc_n = P^_n V^_n for its dims [256 g, 256 g + 256) (four n64
//        quarters, each a fresh fragment), added to O with one FFMA per
//        element: O += acc_n (s_n 2^(m_n - mu)), l += esum_n 2^(m_n - mu).
//        mu is O's reference maximum, raised (and O, l rescaled) only when a
//        page's m_n exceeds it by more than kLazyRescaleLog2, so factors stay
//        <= 2^kLazyRescaleLog2 and the rescale is rare. Both warpgroups apply
//        the same updates to the same published numbers, so their mu and l
//        agree bit for bit.
//
// Shared memory (tiles 1024-byte aligned; wgmma.cuh states the layouts):
//   Q8      4 SW128 tiles [64 rows x 128 B]: tile c holds NoPE dims [128 c, 128 c + 128)
//   Q rope  1 SW128 tile [64 rows x 64 bf16]
//   Q scale 64 f32
//   2 stages (page n in stage n % 2) of: K8 4 SW128 tiles [64 tokens x 128 B], K rope SW128
//           [64 x 64 bf16], 64 f32 token scales (masked tokens: zero-filled, so all finite), valid count
//   2 V^T   SW64 [512 dims x 64 B] (page n in buffer n % 2): row d holds dim d of the page's 64
//           tokens, tokens of each 16-token group in the order {0,1,8,9, 2,3,10,11, 4,5,12,13,
//           6,7,14,15}, so that a thread's own S columns 8 j + 2 (lane % 4) + {0, 1} are 4
//           consecutive k bytes of a row of P^.
//   4 P^    SW64 [64 rows x 64 tokens] e4m3 in the same token order, and per row float2 (m_n, s_n)
//           and float[4] (the quad lanes' parts of sum e).
//   mbarriers: stage full / empty, V^T full / empty (two of each), P full / empty (four of each).
#pragma once

#include <cuda_runtime.h>

#include <cfloat>
#include <cstdint>

#include "core/numeric.h"
#include "core/schedule.h"
#include "cuda/sm90/decode_params.cuh"
#include "cuda/sm90/dependent_launch.cuh"
#include "cuda/sm90/mma.cuh"
#include "cuda/sm90/tensor_maps.h"
#include "cuda/sm90/token_quant.cuh"
#include "cuda/sm90/wgmma.cuh"
#include "snapmla/kv_format.h"

namespace snapmla::cuda::sm90::wgmma_decode {

// The producer's V^T build issues this many ldmatrix.x4 before their permutes
// and stores (v6; ptxas cannot hoist an ldmatrix above an earlier st.shared).
// v6 had 8 (56 producer registers); 4 measured the same.
inline constexpr int kVtLoadsInFlight = 4;

inline constexpr int kRows = 64;  // the wgmma M
inline constexpr int kWarpGroups = 2;  // math warpgroups
inline constexpr int kMathThreads = kWarpGroups * 128;
inline constexpr int kProducerThreads = 128;
inline constexpr int kThreads = kMathThreads + kProducerThreads;
inline constexpr int kWarps = kMathThreads / 32;  // the V^T walk's (virtual) warps
// setmaxnreg budgets, within the CTA's launch pool (384 x 168; a v8 try with
// 48 / 232 hung in setmaxnreg.inc). Both regions are spill-free.
inline constexpr int kProducerRegisters = 56;
inline constexpr int kMathRegisters = 224;
static_assert(kProducerThreads * kProducerRegisters + kMathThreads * kMathRegisters <=
                  kThreads * wgmma::launch_registers_per_thread(kThreads),
              "setmaxnreg budgets exceed the CTA's register pool");
inline constexpr int kDimsPerWarpGroup = kHeadDimV / kWarpGroups;  // 256 output dims per warpgroup
inline constexpr int kPvN = 64;                                    // the PV wgmma N
inline constexpr int kPvSteps = kDimsPerWarpGroup / kPvN;          // PV fragments per page
inline constexpr int kPvRegs = kPvN / 2;                           // fp32 registers per PV fragment
inline constexpr int kTileRowBytes = 128;                          // SW128 row
inline constexpr int kTileBytes = kRows * kTileRowBytes;           // one [64 x 128 B] tile
inline constexpr int kNopeTiles = kNopeDim / kTileRowBytes;        // 4 SW128 tiles
inline constexpr int kNopeChunks = kNopeDim / 16;                  // 16-byte chunks per NoPE row
inline constexpr int kRopeChunks = kRopeDim * 2 / 16;              // per RoPE row
inline constexpr int kVtRowBytes = kPageSize;                      // e4m3 tokens per V^T row
inline constexpr int kSRegs = kPageSize / 2;                       // S fragment (m64n64) registers
inline constexpr float kNegInf = -__builtin_huge_valf();
// O's reference maximum lags a page's maximum by at most this (log2 units):
// page factors stay <= 256, far from fp32's range.
inline constexpr float kLazyRescaleLog2 = 8.0f;
static_assert(kPageSize == 64 && kRows == 64, "tile shapes assume 64-token pages and 64-row CTAs");
static_assert(kRopeDim * 2 == kTileRowBytes, "a RoPE row must be one SW128 row");
static_assert(kVtRowBytes == 64, "V^T rows must be one SW64 row (and the odd row's offset bit 6)");

// Phase trace (built only with -DSNAPMLA_DECODE_TRACE; scripts/gpu-check.sh
// trace): clock64() at phase boundaries of the first kTracePages pages of
// CTA (0, 0), per role (0, 1: math warpgroups; 2: producer) and page. Math
// events: 0 score entry, 1 stage full, 2 QK done, 8 scaled, 9 max, 10 exp and
// P scale, 11 P^ stored, 3 P published; 4 PV entry, 5 P full, 6 V^T full,
// 7 PV done. Producer events: 0 loop top, 1 stage full, 2 V^T empty, 3 V^T
// built, 4 stage empty, 5 copies issued. It found the v10 page time to be the
// producer's serial chain (docs/perf-notes.md, v11).
#ifdef SNAPMLA_DECODE_TRACE
inline constexpr int kTracePages = 48;
__device__ long long g_decode_trace[3][kTracePages][12];
#define SNAPMLA_TRACE(role, n, event)                                                                 \
  do {                                                                                               \
    if (blockIdx.x == 0 && blockIdx.y == 0 && (threadIdx.x & 127) == 0 && (n) < kTracePages)         \
      g_decode_trace[role][n][event] = clock64();                                                    \
  } while (0)
#else
#define SNAPMLA_TRACE(role, n, event) \
  do {                                \
  } while (0)
#endif

// Per-page buffers: page n uses number n % count; the owner of page n is
// math warpgroup n % 2 (three stages plus two V^T buffers exceed 227 KB).
// Four P^ buffers (v11; two before): with two, the owner of page n could not
// store its P^ before the OTHER warpgroup had added page n - 2, which tied
// each softmax to the other warpgroup's PV (the v10 trace: up to ~1200 cycles
// of a ~3000-cycle page).
inline constexpr int kStages = 2;
inline constexpr int kVtBuffers = 2;
inline constexpr int kPBuffers = 4;
// The buffer page n (>= 0) uses; unsigned, so that a power-of-two count is a mask.
__device__ __forceinline__ int buffer_of(int n, int count) {
  return static_cast<int>(static_cast<unsigned>(n) % static_cast<unsigned>(count));
}

struct Smem {
  static constexpr int kQ = 0;
  static constexpr int kQRope = kQ + kNopeTiles * kTileBytes;
  static constexpr int kQScale = kQRope + kTileBytes;
  static constexpr int kStage0 = align1024(kQScale + kRows * 4);
  static constexpr int kStageRope = kNopeTiles * kTileBytes;
  static constexpr int kStageScale = kStageRope + kTileBytes;
  static constexpr int kStageValid = kStageScale + kPageSize * 4;  // written by the producer
  static constexpr int kStageBytes = align1024(kStageValid + 4);
  static constexpr int kVt = kStage0 + kStages * kStageBytes;
  static constexpr int kVtBytes = kHeadDimV * kVtRowBytes;
  static constexpr int kPTile = kVt + kVtBuffers * kVtBytes;
  static constexpr int kPTileBytes = kRows * kVtRowBytes;
  // Per P buffer: [64 rows] float2 (m_n, s_n), then [64 rows][4 quad lanes] f32 sum e.
  static constexpr int kPageStats = kPTile + kPBuffers * kPTileBytes;
  static constexpr int kRowStatsBytes = kRows * 8;
  static constexpr int kPageStatsBytes = kRowStatsBytes + kRows * 4 * 4;
  static constexpr int kBarriers = kPageStats + kPBuffers * kPageStatsBytes;
  static constexpr int kStageFull = kBarriers;
  static constexpr int kStageEmpty = kStageFull + kStages * 8;
  static constexpr int kVtFull = kStageEmpty + kStages * 8;
  static constexpr int kVtEmpty = kVtFull + kVtBuffers * 8;
  static constexpr int kPFull = kVtEmpty + kVtBuffers * 8;
  static constexpr int kPEmpty = kPFull + kPBuffers * 8;
  static constexpr int kBytes = kPEmpty + kPBuffers * 8;
  // The dynamic shared memory base is aligned up to 1024 at run time.
  static constexpr int kAllocBytes = kBytes + 1024;
  static_assert(kAllocBytes <= 227 * 1024, "wgmma decode tile does not fit in shared memory");
  static_assert(kQ % 1024 == 0 && kQRope % 1024 == 0 && kStage0 % 1024 == 0 && kStageBytes % 1024 == 0 &&
                    kStageRope % 1024 == 0 && kVt % 1024 == 0 && kPTile % 1024 == 0 && kPTileBytes % 1024 == 0,
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
//
// Bank conflicts (v8): V^T rows 2p are 128 B apart, so with every lane
// storing dim 2p first, pairs p and p + 4 (same SW64 phase p % 4) hit the
// same bank (2-way, half the banks idle). Lanes with p >= 4 store dim 2p + 1
// first: an odd row is 16 words further, so the first store of lanes p < 4
// covers banks 0-15 and of lanes p >= 4 banks 16-31, and likewise the second.
// The second store's offset and selector are the first's ^ 64 (rows 2p and
// 2p + 1; bit 6 of an even row's offset is 0) and ^ 0x1111 (0x6420 <-> 0x7531).
struct VtThreadOffsets {
  uint32_t k_read;    // even steps' ldmatrix offset in the K8 stack
  uint32_t vt_write;  // offset in V^T of step 0, h 0 of the first store (dim 2p, or 2p + 1)
  uint32_t perm_1st;  // prmt selector giving the first store's bytes (0x6420: dim 2p, 0x7531: 2p + 1)
};
__device__ __forceinline__ VtThreadOffsets vt_thread_offsets(int warp, int lane) {
  const int row = 16 * (warp & 3) + (lane & 7) + 8 * ((lane >> 3) & 1);
  const int c0 = 2 * (warp >> 2) + (lane >> 4);
  const int pair = lane >> 2;
  const bool odd_first = pair >= 4;
  VtThreadOffsets o;
  o.k_read = wgmma::sw128_offset(row, c0);
  const uint32_t even_dim = wgmma::sw64_offset(32 * (warp >> 2) + 2 * pair, warp & 3) + 4 * (lane & 3);
  // Rows 2p and 2p + 1 share the SW64 phase ((row / 2) % 4), so the odd one is 64 B further.
  o.vt_write = odd_first ? even_dim + kVtRowBytes : even_dim;
  o.perm_1st = odd_first ? 0x7531u : 0x6420u;
  return o;
}
inline constexpr int kVtUnits = (kPageSize / 16) * (kNopeDim / 32);  // 64
inline constexpr int kVtSteps = kVtUnits / kWarps;                   // 8 per warp
static_assert(kVtSteps * kWarps == kVtUnits, "V^T units must split evenly");
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
        const uint32_t rows = vt + (64 * step + 16 * h) * kVtRowBytes;
        st_shared_u32(rows + o.vt_write, byte_perm(r[i][2 * h], r[i][2 * h + 1], o.perm_1st));
        st_shared_u32(rows + (o.vt_write ^ kVtRowBytes), byte_perm(r[i][2 * h], r[i][2 * h + 1], o.perm_1st ^ 0x1111u));
      }
    }
  }
}
static_assert(kVtSteps % kVtLoadsInFlight == 0, "V^T load batches must split a virtual warp's steps");

// QK's fp32 promotion interval: the NoPE dot product is accumulated by the
// fp8 tensor core over kQkPromotionTiles x 128 dims (8 k steps) into a fresh
// fragment, then added to S in fp32 (Hopper's fp8 MMA keeps fewer than
// fp32's accumulator bits; DeepGEMM promotes every 128). v10: 256 instead of
// 128 halves the owner's serial wait-add round trips per page (4 -> 2; the
// ablation run in docs/perf-notes.md put all four at ~12% of the page time);
// the kernel-vs-emulation error is checked by the GPU tests.
inline constexpr int kQkPromotionTiles = 2;
inline constexpr int kQkChunks = kNopeTiles / kQkPromotionTiles;
static_assert(kNopeTiles % kQkPromotionTiles == 0, "promotion chunks must split the NoPE tiles");

// Issues the 4 e4m3 k steps of NoPE tile `tile` (128 dims) for the page's 64
// tokens into t (accumulating unless it is the first tile of a chunk), from
// descriptor low words (wgmma::desc_at) of Q8 and of the stage's K8.
__device__ __forceinline__ void issue_qk_tile(float (&t)[kSRegs], uint32_t q_desc, uint32_t k_desc, int tile) {
#pragma unroll
  for (int k = 0; k < kTileRowBytes / 32; ++k) {
    const uint32_t offset = tile * kTileBytes + 32 * k;
    wgmma::mma_64x64x32_e4m3_ss(t, wgmma::desc_at(q_desc, offset, wgmma::Swizzle::k128B),
                                wgmma::desc_at(k_desc, offset, wgmma::Swizzle::k128B),
                                k > 0 || tile % kQkPromotionTiles != 0);
  }
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

// Producer warpgroup (thread = 0..127): for the CTA's n-th page (all pieces
// in order, n counted from 0), stage, V^T buffer n % 2 and phase parity
// (n / 2) % 2:
//   wait stage full (the page's copies landed: each copier arrives through
//   cp.async.mbarrier.arrive.noinc when its copies land, plus thread 0 after
//   writing the valid-token count, so nobody waits for copies; the owner
//   fences to the async proxy after its wait) and V^T empty (both math
//   warpgroups done with the PV of page n - 2) -> build V^T -> fence -> arrive
//   on V^T full (128) -> producer barrier (every copier is done reading the
//   stage) -> wait stage empty (the owner's QK read it, 128 arrivals) -> copy
//   page n + 2 into it.
// (v7 waited for its own copies at the top of each iteration, so a late V^T
// build or stage-empty wait also delayed stage full: 0-5% slower.)
// Prefetching pages 4 ahead into L2 (cp.async.bulk.prefetch, block-table
// entries resolved an iteration early) was 2-4% slower (v9 notes): the page
// time is not the copies' latency.
// kTma (v12): a page with all its tokens valid is loaded by TMA, six boxes
// issued by thread 0 (the copy issue had cost the producer ~850 cycles of
// its ~3200-cycle page in the v10 trace: 21 cp.async per thread); a partial
// or bad page by cp.async with zero-filled rows, as without kTma.
inline constexpr int kProducerBarrier = 2;  // named barrier id (the math warpgroups use 1)
inline constexpr uint32_t kTmaPageBytes = kNopeTiles * kTileBytes + kTileBytes + kPageSize * 4;
template <bool kTma>
__device__ __forceinline__ void run_producer(const DecodeKernelParams& p, const SchedulePart& part,
                                             uint32_t smem_base, uint8_t* smem, int thread,
                                             const Fp8CacheMaps* maps) {
  const int warp = thread >> 5, lane = thread & 31;
  auto stage_base = [&](int stage) { return smem_base + Smem::kStage0 + stage * Smem::kStageBytes; };
  auto stage_full = [&](int stage) { return smem_base + Smem::kStageFull + 8 * stage; };
  if (kTma && thread == 0) {
    wgmma::prefetch_tensor_map(&maps->nope);
    wgmma::prefetch_tensor_map(&maps->rope);
    wgmma::prefetch_tensor_map(&maps->scale);
  }
  // Stage full completes after 129 arrivals (every producer thread, and thread 0 once more
  // after writing the valid count) and, for a TMA page, its bytes.
  auto copy_resolved = [&](int64_t physical, int valid, int stage) {
    const uint32_t bar = stage_full(stage);
    if (kTma && valid == kPageSize) {
      if (thread == 0) {
        *reinterpret_cast<int*>(smem + Smem::kStage0 + stage * Smem::kStageBytes + Smem::kStageValid) = valid;
        wgmma::mbarrier_arrive_expect_tx(bar, kTmaPageBytes);
        const int row = static_cast<int>(physical) * kPageSize;
#pragma unroll
        for (int tile = 0; tile < kNopeTiles; ++tile)
          wgmma::tma_load_2d(stage_base(stage) + tile * kTileBytes, &maps->nope, tile * kTileRowBytes, row, bar);
        wgmma::tma_load_2d(stage_base(stage) + Smem::kStageRope, &maps->rope, 0, row, bar);
        wgmma::tma_load_2d(stage_base(stage) + Smem::kStageScale, &maps->scale, 0, static_cast<int>(physical), bar);
      }
      wgmma::mbarrier_arrive(bar);
      return;
    }
    load_resolved_page<kProducerThreads>(p, physical, valid, stage_base(stage), thread);
    cp_async_arrive_noinc(bar);
    if (thread == 0) {
      *reinterpret_cast<int*>(smem + Smem::kStage0 + stage * Smem::kStageBytes + Smem::kStageValid) = valid;
      wgmma::mbarrier_arrive(bar);
    }
  };
  PageCursor compute = first_page(p, part);
  PageCursor ahead = compute;
#pragma unroll 1
  for (int n = 0; n < kStages && has_page(part, ahead); ++n) {
    int64_t physical;
    const int valid = resolve_page(p, ahead.piece, ahead.page, thread == 0, &physical);
    copy_resolved(physical, valid, n);
    next_page(p, part, ahead);
  }
#pragma unroll 1
  for (int n = 0; has_page(part, compute); ++n, next_page(p, part, compute)) {
    const int stage = buffer_of(n, kStages), vt_buffer = buffer_of(n, kVtBuffers);
    SNAPMLA_TRACE(2, n, 0);
    // The page ahead's block-table load is in flight during the V^T build
    // (its copy cannot be: it refills this page's stage, V^T's source), and
    // checked only after it (v12: v6-v11 checked it at once, which put one
    // global-memory latency, 300-600 cycles in the v10 trace, on the
    // producer's per-page chain, the kernel's critical path).
    const bool copy_ahead = has_page(part, ahead);
    const int64_t ahead_entry = copy_ahead ? block_table_entry(p, ahead.piece, ahead.page) : -1;
    wgmma::mbarrier_wait(stage_full(stage), (n / kStages) & 1);
    SNAPMLA_TRACE(2, n, 1);
    if (n >= 2) wgmma::mbarrier_wait(smem_base + Smem::kVtEmpty + 8 * vt_buffer, ((n >> 1) - 1) & 1);
    SNAPMLA_TRACE(2, n, 2);
    const uint32_t vt = smem_base + Smem::kVt + vt_buffer * Smem::kVtBytes;
    // The V^T unit walk for 8 warps, run as virtual warps w and w + 4.
#pragma unroll 1
    for (int half = 0; half < 2; ++half)
      build_vt_steps<kVtLoadsInFlight>(stage_base(stage), vt, vt_thread_offsets(warp + 4 * half, lane), 0,
                                       kVtSteps);
    wgmma::fence_proxy_async_shared();
    wgmma::mbarrier_arrive(smem_base + Smem::kVtFull + 8 * vt_buffer);
    SNAPMLA_TRACE(2, n, 3);
    if (copy_ahead) {
      wgmma::named_barrier_sync(kProducerBarrier, kProducerThreads);  // nobody reads the stage any more
      wgmma::mbarrier_wait(smem_base + Smem::kStageEmpty + 8 * stage, (n / kStages) & 1);
      SNAPMLA_TRACE(2, n, 4);
      int64_t ahead_physical;
      const int ahead_valid = resolve_entry(p, ahead.piece, ahead.page, ahead_entry, thread == 0, &ahead_physical);
      copy_resolved(ahead_physical, ahead_valid, stage);
      SNAPMLA_TRACE(2, n, 5);
      next_page(p, part, ahead);
    }
  }
}

// maps: the pool's TMA maps (tensor_maps.h); unused without kTma.
template <bool kTma>
__global__ void __launch_bounds__(kThreads, 1)
    mla_decode_fp8_wgmma_kernel(const DecodeKernelParams p, const __grid_constant__ Fp8CacheMaps maps) {
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
  wait_for_prior_kernel();  // the schedule, query and cache come from earlier kernels
  release_next_kernel();   // the combine, or the next step's first kernel
  const SchedulePart part = load_schedule_part(p.tile_scheduler_metadata, blockIdx.y);

  if (tid == 0) {
    for (int i = 0; i < 2; ++i) {
      wgmma::mbarrier_init(smem_base + Smem::kStageFull + 8 * i, kProducerThreads + 1);  // copiers + valid count
      wgmma::mbarrier_init(smem_base + Smem::kStageEmpty + 8 * i, 128);  // the page's owner
      wgmma::mbarrier_init(smem_base + Smem::kVtFull + 8 * i, kProducerThreads);
      wgmma::mbarrier_init(smem_base + Smem::kVtEmpty + 8 * i, kMathThreads);
    }
    for (int i = 0; i < kPBuffers; ++i) {
      wgmma::mbarrier_init(smem_base + Smem::kPFull + 8 * i, 128);  // the page's owner
      wgmma::mbarrier_init(smem_base + Smem::kPEmpty + 8 * i, kMathThreads);
    }
    if constexpr (kTma) wgmma::fence_mbarrier_init();
  }
  __syncthreads();  // the last CTA-wide barrier: from here on the roles synchronise apart
  if (warp_group == kWarpGroups) {
    wgmma::set_max_registers_decrease<kProducerRegisters>();
    run_producer<kTma>(p, part, smem_base, smem, tid - kMathThreads, &maps);
    return;
  }
  wgmma::set_max_registers_increase<kMathRegisters>();
  // Barrier of the two math warpgroups (the producer never joins one).
  auto math_sync = [] { wgmma::named_barrier_sync(1, kMathThreads); };

  float* q_scale_smem = reinterpret_cast<float*>(smem + Smem::kQScale);
  // Loop-invariant descriptor low words.
  const uint32_t q_desc = wgmma::desc_low_word(smem_base + Smem::kQ);
  const uint32_t q_rope_desc = wgmma::desc_low_word(smem_base + Smem::kQRope);
  const uint32_t p_desc = wgmma::desc_low_word(smem_base + Smem::kPTile);
  const uint32_t vt_desc =
      wgmma::desc_low_word(smem_base + Smem::kVt + warp_group * kDimsPerWarpGroup * kVtRowBytes);
  const uint32_t stage_desc = wgmma::desc_low_word(smem_base + Smem::kStage0 + warp_group * Smem::kStageBytes);
  // Page n's barrier of a kind whose buffers (kStages, kVtBuffers, kPBuffers: `count`) it
  // uses in turn, and the phase parity of its use.
  auto barrier = [&](int kind, int n, int count) { return smem_base + kind + 8 * buffer_of(n, count); };
  auto parity = [](int n, int count) { return (static_cast<uint32_t>(n) / count) & 1u; };
  int page_count = 0;  // pages of the CTA before the current piece

  for (int batch = part.begin_batch; batch <= part.end_batch; ++batch) {
    const SequencePiece piece = sequence_piece(p, part, batch);
    const int n_begin = page_count;
    const int n_end = n_begin + max(piece.page_end - piece.page_begin, 0);
    page_count = n_end;

    // ---- prologue: the query tile, quantized here unless given (as v1) ----
    math_sync();  // both warpgroups are done with the previous piece's Q
    load_query_fp8<kRows>(
        p, piece, tile_row0, tid, kMathThreads, smem, [](int row, int chunk) { return Smem::kQ + nope_offset(row, chunk); },
        [](int row, int chunk) { return Smem::kQRope + wgmma::sw128_offset(row, chunk); }, q_scale_smem);
    cp_async_wait<0>();
    wgmma::fence_proxy_async_shared();
    math_sync();  // Q and its scales, visible to wgmma
    // Kept positive (an all-zero query row has scale 0 and scores 0 either way), so that
    // it commutes with the page maximum.
    const float row_scale[2] = {fmaxf(q_scale_smem[local_row[0]] * p.scale_log2, FLT_MIN),
                                fmaxf(q_scale_smem[local_row[1]] * p.scale_log2, FLT_MIN)};
    int visible[2];
    visible_tokens_of_rows(p, piece, tile_row0, local_row, visible);

    // ---- per-row state (identical in both warpgroups) ----
    float mu[2] = {kNegInf, kNegInf};  // O's reference maximum, log2 units
    float l_part[2] = {0.0f, 0.0f};    // this quad lane's part of l, units of 2^mu
    float acc[128];  // O[row, 256 g + 8 j + 2 (lane % 4) + {0,1}] at 4 j + {0,1} (row) / {2,3} (row + 8)
#pragma unroll
    for (int i = 0; i < 128; ++i) acc[i] = 0.0f;

    // ---- owner: scores, softmax and P^ of page n (piece page `page`) ----
    auto score_page = [&](int n, int page) {
      const uint32_t stage_base = smem_base + Smem::kStage0 + buffer_of(n, kStages) * Smem::kStageBytes;
      SNAPMLA_TRACE(warp_group, n, 0);
      wgmma::mbarrier_wait(barrier(Smem::kStageFull, n, kStages), parity(n, kStages));
      SNAPMLA_TRACE(warp_group, n, 1);
      // The copies were cp.async writes (generic proxy), nobody fenced them, and wgmma reads
      // through the async proxy.
      wgmma::fence_proxy_async_shared();
      float s[kSRegs], t[kSRegs];
#pragma unroll
      for (int i = 0; i < kSRegs; ++i) s[i] = t[i] = 0.0f;
      wgmma::fence_registers(s);
      wgmma::fence_registers(t);
      wgmma::fence();
#pragma unroll
      for (int k = 0; k < kRopeDim * 2 / 32; ++k)
        wgmma::mma_64x64x16_bf16_ss(s, wgmma::desc_at(q_rope_desc, 32 * k, wgmma::Swizzle::k128B),
                                    wgmma::desc_at(stage_desc, Smem::kStageRope + 32 * k, wgmma::Swizzle::k128B),
                                    k > 0);
      // NoPE in kQkChunks chunks of kQkPromotionTiles * 128 dims, each into
      // the fresh fragment T, then added to S in fp32.
      auto issue_nope_chunk = [&](int chunk) {
#pragma unroll
        for (int tile = 0; tile < kQkPromotionTiles; ++tile) issue_qk_tile(t, q_desc, stage_desc, chunk * kQkPromotionTiles + tile);
        wgmma::commit();
      };
      issue_nope_chunk(0);
#pragma unroll
      for (int chunk = 0; chunk < kQkChunks; ++chunk) {
        wgmma::wait<0>();
        wgmma::fence_registers(s);
        wgmma::fence_registers(t);
#pragma unroll
        for (int i = 0; i < kSRegs; ++i) s[i] += t[i];
        if (chunk + 1 < kQkChunks) {
          wgmma::fence_registers(t);
          wgmma::fence();
          issue_nope_chunk(chunk + 1);
        }
      }
      SNAPMLA_TRACE(warp_group, n, 2);
      // s[4 j + c]: row local_row[c / 2], page token 8 j + 2 (lane % 4) + (c & 1).
      const int token0 = 2 * quad_lane;
      const float* k_scale_smem = reinterpret_cast<const float*>(smem + (stage_base - smem_base) + Smem::kStageScale);
      float2 k_scale[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) k_scale[j] = *reinterpret_cast<const float2*>(k_scale_smem + token0 + 8 * j);
      const int valid_tokens = *reinterpret_cast<const int*>(smem + (stage_base - smem_base) + Smem::kStageValid);
      // QK is complete and the scales and valid count are read: the stage may be refilled.
      wgmma::mbarrier_arrive(barrier(Smem::kStageEmpty, n, kStages));

      int keep_below[2];  // tokens of the page this row sees
#pragma unroll
      for (int half = 0; half < 2; ++half) keep_below[half] = min(valid_tokens, visible[half] - page * kPageSize);
      // x' = S k_scale; the row factor (q scale x softmax scale x log2 e, > 0,
      // so it commutes with max) is applied inside the exponent's FMA (v11):
      // x = x' row_scale, m_n = max x' row_scale.
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int c = 0; c < 4; ++c) s[4 * j + c] *= (c & 1) ? k_scale[j].y : k_scale[j].x;
      // Only the last page of a sequence (or a causal one) masks anything.
      if (min(keep_below[0], keep_below[1]) < kPageSize) {
#pragma unroll
        for (int j = 0; j < 8; ++j)
#pragma unroll
          for (int c = 0; c < 4; ++c)
            if (token0 + 8 * j + (c & 1) >= keep_below[c >> 1]) s[4 * j + c] = kNegInf;
      }
      // Reductions in kChains independent chains per row (v11; one serial
      // chain of 16 dependent operations before), then across the quad.
      constexpr int kChains = 4;
      float chain[2][kChains];
#pragma unroll
      for (int half = 0; half < 2; ++half)
#pragma unroll
        for (int k = 0; k < kChains; ++k) chain[half][k] = kNegInf;
#pragma unroll
      for (int i = 0; i < kSRegs; ++i) chain[(i >> 1) & 1][(i >> 2) % kChains] = fmaxf(chain[(i >> 1) & 1][(i >> 2) % kChains], s[i]);
      SNAPMLA_TRACE(warp_group, n, 8);
      float page_max[2], base[2];  // m_n (log2 units) and the exponent's offset
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const float x_max = quad_max(fmaxf(fmaxf(chain[half][0], chain[half][1]), fmaxf(chain[half][2], chain[half][3])));
        page_max[half] = x_max == kNegInf ? kNegInf : x_max * row_scale[half];
        base[half] = x_max == kNegInf ? 0.0f : page_max[half];
      }
      SNAPMLA_TRACE(warp_group, n, 9);
      // e = 2^(x - m_n), f = e k_scale in place (a row that sees nothing of
      // the page: every x is -inf and e = 0, without -inf - -inf).
      float e_chain[2][kChains], f_chain[2][kChains];
#pragma unroll
      for (int half = 0; half < 2; ++half)
#pragma unroll
        for (int k = 0; k < kChains; ++k) e_chain[half][k] = f_chain[half][k] = 0.0f;
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int half = c >> 1, k = j % kChains;
          const float e = exp2_ftz(fmaf(s[4 * j + c], row_scale[half], -base[half]));
          e_chain[half][k] += e;
          s[4 * j + c] = e * ((c & 1) ? k_scale[j].y : k_scale[j].x);
          f_chain[half][k] = fmaxf(f_chain[half][k], s[4 * j + c]);
        }
      float e_sum[2], f_max[2], inv_scale[2];
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        e_sum[half] = (e_chain[half][0] + e_chain[half][1]) + (e_chain[half][2] + e_chain[half][3]);
        f_max[half] = quad_max(fmaxf(fmaxf(f_chain[half][0], f_chain[half][1]), fmaxf(f_chain[half][2], f_chain[half][3])));
        // Approximate reciprocal (v11; the IEEE divisions were four
        // slow-path-guarded sequences on the owner's chain): s_n inv_scale
        // = 1 within a few ulp, far below the e4m3 rounding of P^.
        const bool any = f_max[half] > 0.0f;
        inv_scale[half] = any ? __fdividef(kE4M3Max, f_max[half]) : 1.0f;
        f_max[half] = any ? f_max[half] * (1.0f / kE4M3Max) : 1.0f;  // now s_n
      }
      SNAPMLA_TRACE(warp_group, n, 10);
      // The buffer's previous page (n - kPBuffers) is done in both warpgroups' PV.
      if (n >= kPBuffers) wgmma::mbarrier_wait(barrier(Smem::kPEmpty, n, kPBuffers), parity(n, kPBuffers) ^ 1u);
      const uint32_t p_tile = smem_base + Smem::kPTile + buffer_of(n, kPBuffers) * Smem::kPTileBytes;
      // Token group jj of row r holds, at bytes 4 q .. 4 q + 3, tokens {2q,
      // 2q+1, 8+2q, 9+2q} of the group (V^T's order): exactly thread q's
      // columns j = 2 jj and 2 jj + 1.
#pragma unroll
      for (int jj = 0; jj < 4; ++jj)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int j0 = 2 * jj, c0 = 2 * half;
          const float factor = inv_scale[half];
          const uint32_t lo = token_quant::e4m3x2_bits(s[4 * j0 + c0] * factor, s[4 * j0 + c0 + 1] * factor);
          const uint32_t hi =
              token_quant::e4m3x2_bits(s[4 * (j0 + 1) + c0] * factor, s[4 * (j0 + 1) + c0 + 1] * factor);
          st_shared_u32(p_tile + wgmma::sw64_offset(local_row[half], jj) + 4 * quad_lane, lo | (hi << 16));
        }
      SNAPMLA_TRACE(warp_group, n, 11);
      uint8_t* stats = smem + Smem::kPageStats + buffer_of(n, kPBuffers) * Smem::kPageStatsBytes;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        if (quad_lane == 0)
          reinterpret_cast<float2*>(stats)[local_row[half]] = make_float2(page_max[half], f_max[half]);
        reinterpret_cast<float*>(stats + Smem::kRowStatsBytes)[4 * local_row[half] + quad_lane] = e_sum[half];
      }
      wgmma::fence_proxy_async_shared();
      wgmma::mbarrier_arrive(barrier(Smem::kPFull, n, kPBuffers));
      SNAPMLA_TRACE(warp_group, n, 3);
    };

    // ---- every math warpgroup: O += P^_n V^_n for its 256 dims ----
    // Each page's product is formed in a fresh fragment and added in fp32 (as
    // v1): the fp8 MMA's accumulator keeps ~13 mantissa bits (DeepSeek-V3
    // report; SageAttention2's "FP22"), and accumulating every page into O
    // through it would truncate O once per page. Four n64 fragments, two in
    // flight: the fp32 add of one runs while the next is on the tensor cores.
    auto accumulate_page = [&](int n) {
      SNAPMLA_TRACE(warp_group, n, 4);
      wgmma::mbarrier_wait(barrier(Smem::kPFull, n, kPBuffers), parity(n, kPBuffers));
      SNAPMLA_TRACE(warp_group, n, 5);
      wgmma::mbarrier_wait(barrier(Smem::kVtFull, n, kVtBuffers), parity(n, kVtBuffers));
      SNAPMLA_TRACE(warp_group, n, 6);
      // P^ from shared memory (SS). Loading it into registers as the A
      // operand (RS) measured the same (v8 notes) and costs 8 registers.
      const uint32_t p_page = p_desc + ((buffer_of(n, kPBuffers) * Smem::kPTileBytes) >> 4);
      const uint32_t vt_page = vt_desc + ((buffer_of(n, kVtBuffers) * Smem::kVtBytes) >> 4);
      float product[2][kPvRegs];
      auto issue_pv = [&](int step, float (&d)[kPvRegs]) {
        wgmma::fence_registers(d);
        wgmma::fence();
#pragma unroll
        for (int kk = 0; kk < 2; ++kk)
          wgmma::mma_64x64x32_e4m3_ss(
              d, wgmma::desc_at(p_page, 32 * kk, wgmma::Swizzle::k64B),
              wgmma::desc_at(vt_page, step * kPvN * kVtRowBytes + 32 * kk, wgmma::Swizzle::k64B), kk > 0);
        wgmma::commit();
      };
      // v11: the first two fragments go to the tensor cores before the page's
      // statistics are read and turned into factors (a chain of shared loads,
      // exp2 and a vote: ~300 cycles the v10 trace showed between "P full"
      // and the first PV).
      issue_pv(0, product[0]);
      issue_pv(1, product[1]);
      const uint8_t* stats = smem + Smem::kPageStats + buffer_of(n, kPBuffers) * Smem::kPageStatsBytes;
      float factor[2];
      bool rescale = false;
      float rescale_by[2] = {1.0f, 1.0f};
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const float2 page = reinterpret_cast<const float2*>(stats)[local_row[half]];
        const float e_sum = reinterpret_cast<const float*>(stats + Smem::kRowStatsBytes)[4 * local_row[half] + quad_lane];
        if (page.x > mu[half] + kLazyRescaleLog2) {  // false for m_n = -inf
          rescale_by[half] = mu[half] == kNegInf ? 0.0f : exp2f(mu[half] - page.x);
          mu[half] = page.x;
          rescale = true;
        }
        const float weight = page.x == kNegInf ? 0.0f : exp2f(page.x - mu[half]);
        l_part[half] = fmaf(l_part[half], rescale_by[half], e_sum * weight);
        factor[half] = page.y * weight;
      }
      if (__any_sync(0xffffffffu, rescale)) {
#pragma unroll
        for (int i = 0; i < 128; ++i) acc[i] *= rescale_by[(i >> 1) & 1];
      }
      // product[4 j + c] of step n is dim kPvN n + 8 j + 2 (lane % 4) + (c & 1)
      // of the warpgroup's 256: acc index kPvRegs n + 4 j + c.
      auto add_pv = [&](int step, float (&d)[kPvRegs]) {
        wgmma::fence_registers(d);
#pragma unroll
        for (int i = 0; i < kPvRegs; ++i) {
          float& o = acc[kPvRegs * step + i];
          o = fmaf(d[i], factor[(i >> 1) & 1], o);
        }
      };
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
      // This warpgroup's PV has read V^T and P^ (and the stats, above).
      wgmma::mbarrier_arrive(barrier(Smem::kPEmpty, n, kPBuffers));
      wgmma::mbarrier_arrive(barrier(Smem::kVtEmpty, n, kVtBuffers));
      SNAPMLA_TRACE(warp_group, n, 7);
    };

    // The seesaw: own pages' scores, each followed by the PV of every page up
    // to it in order. The warpgroup that does not own the piece's first page
    // starts after that page's P^ is out, so that the two warpgroups' softmax
    // phases fall on each other's tensor-core phases.
    int next_pv = n_begin;
    const int first_own = n_begin + ((n_begin & 1) != warp_group ? 1 : 0);
    if (first_own != n_begin && first_own < n_end)
      wgmma::mbarrier_wait(barrier(Smem::kPFull, n_begin, kPBuffers), parity(n_begin, kPBuffers));
#pragma unroll 1
    for (int n = first_own; n < n_end; n += 2) {
      score_page(n, piece.page_begin + (n - n_begin));
#pragma unroll 1
      for (; next_pv <= n; ++next_pv) accumulate_page(next_pv);
    }
#pragma unroll 1
    for (; next_pv < n_end; ++next_pv) accumulate_page(next_pv);

    // ---- epilogue: out / lse or the split's partials (as v1) ----
    const PieceOutput output = piece_output(p, part, batch);
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int c0 = 2 * half;
      store_output_row<kDimsPerWarpGroup / 8>(
          p, output, batch, tile_row0 + local_row[half], warp_group * kDimsPerWarpGroup + 2 * quad_lane, mu[half],
          quad_sum(l_part[half]), 1.0f, warp_group == 0 && quad_lane == 0,
          [&](int j) { return make_float2(acc[4 * j + c0], acc[4 * j + c0 + 1]); });
    }
  }
}

}  // namespace snapmla::cuda::sm90::wgmma_decode
