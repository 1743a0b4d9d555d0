// The sm_90a split-KV MLA decode kernel for the bf16 cache on Hopper's
// warpgroup MMA (wgmma). Same contract as the other decode kernels
// (DecodeKernelParams, the SchedulePart walk, the split partials that the
// combine kernel merges, store_output_row), after the algorithm of FlashMLA's
// dense sm90 kernel (two math warpgroups in a "seesaw").
//
// CTA: 64 query rows (rows [64 x, 64 x + 64) of a sequence; missing rows are
// zero padding), 3 warpgroups: WG0 and WG1 compute, WG2 copies pages
// (cp.async; setmaxnreg gives the math warpgroups the registers). A piece's
// pages are taken in pairs (a, b) = (2 i, 2 i + 1) of its local page index:
// page a always lives in stage 0 and is "owned" by WG0, page b in stage 1,
// owned by WG1.
//
// Per pair (m: the running row maximum in log2 units, shared by both):
//   WG0: S_a = Q K_a^T (computed during the previous pair), m_a = max(m,
//        max S_a), P_a = 2^(S_a - m_a), O_0 = O_0 alpha_a + P_a V_a[:, 0:256]
//        (RS: P_a from registers), with alpha_a = 2^(m - m_a).
//   WG1: (after m_a is published) m_b = max(m_a, max S_b), P_b = 2^(S_b - m_b)
//        into shared memory, O_1 = O_1 alpha_a alpha_b + P_b V_b[:, 256:512] (RS).
//   WG0: (after m_b is published) P_a' = P_a alpha_b into shared memory.
//   WG1: O_1 += P_a' V_a[:, 256:512] (SS).
//   WG0: O_0 = O_0 alpha_b + P_b V_b[:, 0:256] (SS); then S_{a+2}.
//   WG1: then S_{b+2}.
// So each warpgroup owns half of the output dims (O = 64 x 256 fp32, 128
// registers per thread) and sees every page, while the QK of one page
// overlaps the other warpgroup's softmax. Each keeps its own part of the row
// sum l (both scaled to the same m); the epilogue adds them.
//
// Shared memory (every tile [64 rows x 128 B] bf16, SW128 K-major, 1024-byte aligned):
//   Q       9 tiles: tile c holds dims [64 c, 64 c + 64) of the 64 query rows.
//   stage s 9 tiles of one page: tile c holds dims [64 c, 64 c + 64) of its 64
//           tokens (rows past the page's valid tokens are zero-filled: the
//           cache slots behind them may hold NaN, and 0 x NaN = NaN in the MMA).
//           Tiles 0..7 are also V, read as an MN-major B ([dims x tokens]: a
//           token's 64 dims of a tile are one 128-byte row), no transpose.
//           Tile 8 (the RoPE dims) is dead after the owner's QK, so it then
//           holds the owner's P [64 rows x 64 tokens] for the other warpgroup.
//   exchange: m_a, m_b [64] f32, l parts [2][64] f32, valid tokens [2], mbarriers.
//
// Page stage handoff (producer <-> math), per stage s and half h: half h is
// what warpgroup h reads after the owner's QK: V tiles [4 h, 4 h + 4), plus
// tile 8 (P) when h is the non-owner (1 - s). empty[s][h]: warpgroup h's PV
// read of it completed (128 arrivals). The producer refills the owner's half
// first (its RS PV ends first). How a fill is announced (kTma, chosen per
// launch in decode_bf16_wgmma.cu): one full barrier per tile, full[s][t],
// arrived only once the tile is visible to wgmma, so the math warpgroups'
// waits need no proxy fence.
//   kTma: whole pages by TMA, one 64 x 64 box per tile on its own full[s][t]
//     (QK starts on the first tiles while the rest lands), written through
//     the async proxy; pages with missing tokens (zero-filled rows) and pages
//     outside the pool (never read) go the cp.async way below. WG1 issues its
//     RS PV of page b before storing P_b for WG0 (the stores and their proxy
//     fence overlap the MMA instead of delaying its issue).
//   !kTma (a pool no TMA map describes): cp.async; the producer waits for its
//     own copies, fences them for the async proxy and then arrives (count 1);
//     WG1 stores P_b before its PV.
// (Measured alternatives, docs/perf-notes.md "bf16 decode on wgmma": cp.async
// with asynchronous arrivals and a proxy fence in the math warpgroups, and
// TMA without the early PV, were up to 7% slower; they are gone.)
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "core/schedule.h"
#include "cuda/sm90/decode_params.cuh"
#include "cuda/sm90/dependent_launch.cuh"
#include "cuda/sm90/mma.cuh"
#include "cuda/sm90/token_quant.cuh"
#include "cuda/sm90/wgmma.cuh"
#include "snapmla/kv_format.h"

namespace snapmla::cuda::sm90::bf16_wgmma_decode {

inline constexpr int kRows = 64;  // the wgmma M
inline constexpr int kMathThreads = 256;
inline constexpr int kProducerThreads = 128;
inline constexpr int kThreads = kMathThreads + kProducerThreads;
// setmaxnreg budgets, within the CTA's launch pool (384 x 168).
inline constexpr int kProducerRegisters = 40;
inline constexpr int kMathRegisters = 232;
static_assert(kProducerThreads * kProducerRegisters + kMathThreads * kMathRegisters <=
                  kThreads * wgmma::launch_registers_per_thread(kThreads),
              "setmaxnreg budgets exceed the CTA's register pool");

inline constexpr int kTileRowBytes = 128;                 // 64 bf16: one SW128 row
inline constexpr int kTileBytes = kRows * kTileRowBytes;  // [64 x 128 B]
inline constexpr int kTiles = kHeadDim / 64;              // 9 per Q / page
inline constexpr int kPTile = kTiles - 1;                 // the RoPE tile, then P
inline constexpr int kDimsPerWarpGroup = kHeadDimV / 2;   // 256 output dims
inline constexpr int kVTilesPerWarpGroup = kDimsPerWarpGroup / 64;  // 4
inline constexpr int kRowChunks = kHeadDim * 2 / 16;      // 72 16-byte chunks per row
inline constexpr int kSRegs = kPageSize / 2;              // m64n64 f32 fragment
inline constexpr int kORegs = kDimsPerWarpGroup / 2;      // m64n256 f32 fragment
inline constexpr int kPvSteps = kPageSize / 16;           // k16 steps over a page's tokens
inline constexpr float kNegInf = -__builtin_huge_valf();
static_assert(kPageSize == 64 && kRows == 64, "tile shapes assume 64-token pages and 64-row CTAs");
static_assert(kHeadDim % 64 == 0 && kHeadDimV == 8 * 64, "576 = 9 tiles of 64 dims, V = the first 8");

struct Smem {
  static constexpr int kQ = 0;
  static constexpr int kStage0 = kQ + kTiles * kTileBytes;
  static constexpr int kStageBytes = kTiles * kTileBytes;
  static constexpr int kMaxA = kStage0 + 2 * kStageBytes;  // m_a [64]
  static constexpr int kMaxB = kMaxA + kRows * 4;          // m_b [64]
  static constexpr int kSums = kMaxB + kRows * 4;          // l parts [2][64]
  static constexpr int kValid = kSums + 2 * kRows * 4;     // valid tokens [2 stages]
  static constexpr int kFull = kValid + 2 * 4;  // mbarriers [stage][tile]
  static constexpr int kEmpty = kFull + 2 * kTiles * 8;  // mbarriers [stage][half]
  static constexpr int kBytes = kEmpty + 4 * 8;
  // The dynamic shared memory base is aligned up to 1024 at run time.
  static constexpr int kAllocBytes = kBytes + 1024;
  static_assert(kAllocBytes <= 227 * 1024, "bf16 wgmma decode tile does not fit in shared memory");
  static_assert(kStage0 % 1024 == 0 && kStageBytes % 1024 == 0 && kFull % 8 == 0,
                "wgmma operand tiles must be 1024-byte aligned");
};

// Named barriers of the math warpgroups (0 is __syncthreads; the producer
// never joins one). Each handoff is one warpgroup's bar.arrive and the other's
// bar.sync (256 threads); the protocol below keeps a warpgroup from arriving
// twice on one before the other has synced it.
enum MathBarrier : int {
  kMathSync = 1,     // both warpgroups
  kMaxAReady = 2,    // WG0 -> WG1: m_a published
  kMaxBReady = 3,    // WG1 -> WG0: m_b published
  kPaReady = 4,      // WG0 -> WG1: P_a' in stage 0's tile 8
  kPbReady = 5,      // WG1 -> WG0: P_b in stage 1's tile 8 (and its RS PV issued)
  kProducerSync = 6,  // the producer warpgroup (128): its cp.async copies of a half landed
};

__device__ __forceinline__ uint32_t tile_full_barrier(uint32_t smem_base, int stage, int tile) {
  return smem_base + Smem::kFull + 8 * (kTiles * stage + tile);
}
// A K-major SW128 operand's full descriptor (wgmma.cuh's desc_at at offset 0),
// advanced with wgmma::desc_advance.
__device__ __forceinline__ uint64_t k_major_desc(uint32_t start) {
  return wgmma::desc_at(wgmma::desc_low_word(start), 0, wgmma::Swizzle::k128B);
}
// The tile of a stage's half in order t = 0, 1, ..: V tiles [4 half, 4 half +
// 4), then the P tile when the half is the non-owner's; -1 past the end.
__device__ __forceinline__ int tile_of_half(int stage, int half, int t) {
  return t < kVTilesPerWarpGroup ? kVTilesPerWarpGroup * half + t : (t == kVTilesPerWarpGroup && half != stage ? kPTile : -1);
}
__device__ __forceinline__ uint32_t empty_barrier(uint32_t smem_base, int stage, int half) {
  return smem_base + Smem::kEmpty + 8 * (2 * stage + half);
}

// ---- producer ----
// Copies half `half` of physical page `physical` (valid_rows valid tokens;
// the rest zero-filled, without reading) into the stage at stage_base, with
// 128 threads. V tiles: thread t copies chunks c, c + 16 (c = t % 16) of the
// half's 32 chunks of rows t / 16 + 8 i; P tile: chunk t % 8 of rows t / 8 +
// 16 i. Row steps are multiples of 8, so a thread's swizzle phase is fixed and
// each copy is base + constant; 16 threads read 256 contiguous bytes.
__device__ __forceinline__ void copy_half_page(const DecodeKernelParams& p, int64_t physical, int valid_rows,
                                               uint32_t stage_base, int stage, int half, int thread) {
  const uint8_t* page = reinterpret_cast<const uint8_t*>(p.kv_bf16 + physical * kPageSize * kHeadDim);
  constexpr int kRowBytes = kHeadDim * 2;
  {
    const int row0 = thread >> 4, c = thread & 15;
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      const int chunk = 32 * half + c + 16 * k;  // of the row's 72
      const uint32_t dst = stage_base + (chunk >> 3) * kTileBytes + wgmma::sw128_offset(row0, chunk & 7);
      const uint8_t* src = page + row0 * kRowBytes + chunk * 16;
#pragma unroll
      for (int i = 0; i < kPageSize / 8; ++i)
        cp_async_16(dst + 8 * i * kTileRowBytes, src + 8 * i * kRowBytes, row0 + 8 * i < valid_rows);
    }
  }
  if (half != stage) {
    const int row0 = thread >> 3, c = thread & 7;
    const uint32_t dst = stage_base + kPTile * kTileBytes + wgmma::sw128_offset(row0, c);
    const uint8_t* src = page + row0 * kRowBytes + (kPTile * 8 + c) * 16;
#pragma unroll
    for (int i = 0; i < kPageSize / 16; ++i)
      cp_async_16(dst + 16 * i * kTileRowBytes, src + 16 * i * kRowBytes, row0 + 16 * i < valid_rows);
  }
}

// Walks the CTA's pages in the math warpgroups' order: a piece's local page i
// goes to stage i % 2 (use u of that stage: phase parity u % 2). Each fill is
// announced on its tiles' full barriers (count 1) only once it is visible to wgmma. A page with all
// kPageSize tokens valid goes by TMA when kTma (thread 0 issues the boxes);
// other pages (and every page without kTma) by cp.async with zero-filled
// rows, which the producer waits for and fences itself. Every producer thread
// waits on the empty barriers, so none runs more than one phase ahead of
// them (parity waits cannot tell phases two apart).
template <bool kTma>
__device__ __forceinline__ void run_producer(const DecodeKernelParams& p, const SchedulePart& part,
                                                    uint32_t smem_base, uint8_t* smem, int thread,
                                                    const CUtensorMap* kv_map) {
  if (kTma && thread == 0) wgmma::prefetch_tensor_map(kv_map);
  int uses0 = 0, uses1 = 0;  // scalars: an indexed array would live in local memory
#pragma unroll 1
  for (PageCursor c = first_page(p, part); has_page(part, c); next_page(p, part, c)) {
    const int stage = (c.page - c.piece.page_begin) & 1;
    const int use = stage == 0 ? uses0++ : uses1++;
    int64_t physical;
    const int valid = resolve_page(p, c.piece, c.page, thread == 0, &physical);
    const bool whole_page = kTma && valid == kPageSize;
    const uint32_t stage_base = smem_base + Smem::kStage0 + stage * Smem::kStageBytes;
#pragma unroll 1
    for (int k = 0; k < 2; ++k) {
      const int half = stage ^ k;  // the owner's half first
      if (use > 0) wgmma::mbarrier_wait(empty_barrier(smem_base, stage, half), (use - 1) & 1);
      if (!whole_page) {
        copy_half_page(p, physical, valid, stage_base, stage, half, thread);
        cp_async_commit();
        cp_async_wait<0>();
        wgmma::fence_proxy_async_shared();  // this thread's copies, for the math warpgroups' wgmma
        wgmma::named_barrier_sync(kProducerSync, kProducerThreads);
      }
      if (thread == 0) {
        // The owner reads it after its half's first tile; the slot is rewritten
        // only after the owner's empty arrival, which follows its read.
        if (k == 0) reinterpret_cast<volatile int*>(smem + Smem::kValid)[stage] = valid;
#pragma unroll
        for (int t = 0; t <= kVTilesPerWarpGroup; ++t) {
          const int tile = tile_of_half(stage, half, t);
          if (tile < 0) break;
          const uint32_t bar = tile_full_barrier(smem_base, stage, tile);
          if (whole_page) {
            wgmma::mbarrier_arrive_expect_tx(bar, kTileBytes);
            wgmma::tma_load_2d(stage_base + tile * kTileBytes, kv_map, 64 * tile,
                               static_cast<int>(physical) * kPageSize, bar);
          } else {
            wgmma::mbarrier_arrive(bar);
          }
        }
      }
    }
  }
}

// ---- math warpgroups ----
// Per-thread facts of the accumulator fragments (wgmma.cuh): rows local_row[h]
// = 16 w + l / 4 + 8 h; register 4 j + 2 h + e is column 8 j + 2 (l % 4) + e.
struct MathThread {
  int quad_lane;  // l % 4
  int local_row[2];
};

// 2^(m_old - m_new): the factor that moves sums taken at m_old to m_new (0
// when nothing was seen yet: those sums are 0, and -inf - -inf is NaN).
__device__ __forceinline__ float rescale_factor(float m_old, float m_new) {
  return m_old == kNegInf ? 0.0f : exp2f(m_old - m_new);
}

// S = Q K^T for the page in `stage`: the warpgroup's own half of the tiles
// first (the producer refills it first), one commit group each.
// Each tile is waited for right before its MMAs.
__device__ __forceinline__ void issue_qk_half(float (&s)[kSRegs], uint32_t smem_base, int stage, int half,
                                              int parity, bool first) {
  const uint64_t q_desc = k_major_desc(smem_base + Smem::kQ);
  const uint64_t k_desc = k_major_desc(smem_base + Smem::kStage0 + stage * Smem::kStageBytes);
  wgmma::fence_registers(s);
#pragma unroll
  for (int t = 0; t < kVTilesPerWarpGroup + 1; ++t) {
    // Tiles [4 half, 4 half + 4), and tile 8 in the non-owner's half.
    if (t == kVTilesPerWarpGroup && half == stage) break;
    const int tile = t < kVTilesPerWarpGroup ? 4 * half + t : kPTile;
    wgmma::mbarrier_wait(tile_full_barrier(smem_base, stage, tile), parity);
    wgmma::fence();  // the wait loop is a branch: wgmmas after it need their own fence (else ptxas injects one)
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const uint32_t offset = tile * kTileBytes + 32 * k;  // 16 bf16 of K per step
      wgmma::mma_64x64x16_bf16_ss(s, wgmma::desc_advance(q_desc, offset), wgmma::desc_advance(k_desc, offset),
                                  !(first && t == 0 && k == 0));
    }
  }
  wgmma::commit();
}

// P [64 rows x 64 tokens] (this thread's registers times factor[h]) as bf16
// into the K-major SW128 tile at `tile` (the A of the other warpgroup's SS PV):
// column pair 8 j + 2 q of row r is 4 bytes in 16-byte chunk j ^ (r % 8).
__device__ __forceinline__ void store_p_tile(const float (&s)[kSRegs], const float (&factor)[2], uint32_t tile,
                                             const MathThread& mt) {
#pragma unroll
  for (int h = 0; h < 2; ++h)
#pragma unroll
    for (int j = 0; j < kSRegs / 4; ++j)
      st_shared_u32(tile + wgmma::sw128_offset(mt.local_row[h], j) + 4 * mt.quad_lane,
                    token_quant::bf16x2_bits(s[4 * j + 2 * h] * factor[h], s[4 * j + 2 * h + 1] * factor[h]));
}

// The same tile from the packed A fragments (pack_p_fragments): a[k][i] is
// row local_row[i % 2], column pair 2 k + i / 2 (factor 1).
__device__ __forceinline__ void store_p_fragments(const uint32_t (&a)[kPvSteps][4], uint32_t tile,
                                                  const MathThread& mt) {
#pragma unroll
  for (int k = 0; k < kPvSteps; ++k)
#pragma unroll
    for (int i = 0; i < 4; ++i)
      st_shared_u32(tile + wgmma::sw128_offset(mt.local_row[i & 1], 2 * k + (i >> 1)) + 4 * mt.quad_lane, a[k][i]);
}

// Masks S for the page (tokens at or past keep_below[h] get -inf), returns the
// row maxima in log2 units (quad-reduced; -inf when nothing is visible).
__device__ __forceinline__ void mask_and_max(float (&s)[kSRegs], int valid_tokens, int page_token0,
                                             const int (&visible)[2], float scale_log2, const MathThread& mt,
                                             float (&page_max)[2]) {
  int keep_below[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) keep_below[h] = min(valid_tokens, visible[h] - page_token0);
  // Only a sequence's last page (or a causal one) masks anything.
  if (min(keep_below[0], keep_below[1]) < kPageSize) {
#pragma unroll
    for (int j = 0; j < kSRegs / 4; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c)
        if (8 * j + 2 * mt.quad_lane + (c & 1) >= keep_below[c >> 1]) s[4 * j + c] = kNegInf;
  }
  page_max[0] = page_max[1] = kNegInf;
#pragma unroll
  for (int i = 0; i < kSRegs; ++i) page_max[(i >> 1) & 1] = fmaxf(page_max[(i >> 1) & 1], s[i]);
  // softmax_scale > 0 (api.cpp), so max(s) scale = max(s scale) exactly.
#pragma unroll
  for (int h = 0; h < 2; ++h) page_max[h] = quad_max(page_max[h]) * scale_log2;
}

// P = 2^(S scale - m_new) in place (masked: 2^-inf = 0; m_new = -inf: the
// row saw nothing, every S is -inf, base 0 keeps it 0); returns this
// thread's part of the row sums.
__device__ __forceinline__ void exponentiate(float (&s)[kSRegs], const float (&m_new)[2], float scale_log2,
                                             float (&sum)[2]) {
  float base[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    base[h] = m_new[h] == kNegInf ? 0.0f : m_new[h];
    sum[h] = 0.0f;
  }
#pragma unroll
  for (int i = 0; i < kSRegs; ++i) {
    const int h = (i >> 1) & 1;
    s[i] = exp2_ftz(fmaf(s[i], scale_log2, -base[h]));
    sum[h] += s[i];
  }
}

// The A fragments of the 4 k16 steps of P V from P's accumulator fragment.
__device__ __forceinline__ void pack_p_fragments(const float (&s)[kSRegs], uint32_t (&a)[kPvSteps][4]) {
#pragma unroll
  for (int k = 0; k < kPvSteps; ++k)
#pragma unroll
    for (int i = 0; i < 4; ++i) a[k][i] = token_quant::bf16x2_bits(s[8 * k + 2 * i], s[8 * k + 2 * i + 1]);
}

// O *= factor per row, skipped when every row of the warp keeps its maximum
// (factor 1, the common case once a long sequence's maximum has settled):
// 128 multiplies on the way to the next PV issue.
__device__ __forceinline__ void scale_rows(float (&o)[kORegs], const float (&factor)[2]) {
  if (!__any_sync(0xffffffffu, factor[0] != 1.0f || factor[1] != 1.0f)) return;
#pragma unroll
  for (int i = 0; i < kORegs; ++i) o[i] *= factor[(i >> 1) & 1];
}

// O += P V over the page in `stage` for this warpgroup's dims (V tiles
// [4 g, 4 g + 4)): B MN-major, atoms of 64 dims one tile (kTileBytes) apart,
// 8 tokens 1024 B apart; k step = 16 tokens = 2048 B.
template <int kGroup>
__device__ __forceinline__ uint64_t v_desc(uint32_t smem_base, int stage) {
  return wgmma::mn_major_sw128_desc(
      smem_base + Smem::kStage0 + stage * Smem::kStageBytes + kGroup * kVTilesPerWarpGroup * kTileBytes, kTileBytes,
      wgmma::kSw128AtomBytes);
}
template <int kGroup>
__device__ __forceinline__ void issue_pv_rs(float (&o)[kORegs], const uint32_t (&a)[kPvSteps][4],
                                            uint32_t smem_base, int stage) {
  const uint64_t b = v_desc<kGroup>(smem_base, stage);
  wgmma::fence_registers(o);
  wgmma::fence();
#pragma unroll
  for (int k = 0; k < kPvSteps; ++k)
    wgmma::mma_64x256x16_bf16_rs_mn(o, a[k], wgmma::desc_advance(b, k * 2 * wgmma::kSw128AtomBytes), true);
  wgmma::commit();
}
template <int kGroup>
__device__ __forceinline__ void issue_pv_ss(float (&o)[kORegs], uint32_t smem_base, int stage) {
  const uint64_t b = v_desc<kGroup>(smem_base, stage);
  const uint64_t a = k_major_desc(smem_base + Smem::kStage0 + stage * Smem::kStageBytes +
                                               kPTile * kTileBytes);
  wgmma::fence_registers(o);
  wgmma::fence();
#pragma unroll
  for (int k = 0; k < kPvSteps; ++k)
    wgmma::mma_64x256x16_bf16_ss_mn(o, wgmma::desc_advance(a, 32 * k),
                                    wgmma::desc_advance(b, k * 2 * wgmma::kSw128AtomBytes), true);
  wgmma::commit();
}

// Before an SS PV on the other warpgroup's page: its V tiles of `half` landed
// long ago (the owner's QK waited for them); this warpgroup's own wait
// acquires them.
__device__ __forceinline__ void acquire_v_half(uint32_t smem_base, int stage, int half, int parity) {
#pragma unroll
  for (int t = 0; t < kVTilesPerWarpGroup; ++t)
    wgmma::mbarrier_wait(tile_full_barrier(smem_base, stage, kVTilesPerWarpGroup * half + t), parity);
}

// Math warpgroup kGroup's walk over the CTA's pieces (see the top of the file).
template <bool kTma, int kGroup>
__device__ __forceinline__ void run_math(const DecodeKernelParams& p, const SchedulePart& part, uint32_t smem_base,
                                         uint8_t* smem, const MathThread& mt, int math_thread) {
  constexpr int kOther = 1 - kGroup;
  const int tile_row0 = blockIdx.x * kRows;
  float* max_a = reinterpret_cast<float*>(smem + Smem::kMaxA);
  float* max_b = reinterpret_cast<float*>(smem + Smem::kMaxB);
  float* sums = reinterpret_cast<float*>(smem + Smem::kSums);
  const volatile int* valid_slot = reinterpret_cast<const volatile int*>(smem + Smem::kValid);
  const float scale_log2 = p.scale_log2;
  const uint32_t own_p_tile = smem_base + Smem::kStage0 + kGroup * Smem::kStageBytes + kPTile * kTileBytes;
  int uses[2] = {0, 0};  // pages consumed per stage (all pieces): the mbarrier phases

  float s[kSRegs];
  float o[kORegs];
#pragma unroll
  for (int i = 0; i < kSRegs; ++i) s[i] = 0.0f;

#pragma unroll 1
  for (int batch = part.begin_batch; batch <= part.end_batch; ++batch) {
    const SequencePiece piece = sequence_piece(p, part, batch);
    const int pages = max(piece.page_end - piece.page_begin, 0);

    // ---- the query tile ----
    wgmma::named_barrier_sync(kMathSync, kMathThreads);  // the previous piece is done with Q and the sums
    {
      const uint8_t* q_rows =
          reinterpret_cast<const uint8_t*>(p.q + (static_cast<int64_t>(batch) * p.rows + tile_row0) * kHeadDim);
#pragma unroll 1
      for (int idx = math_thread; idx < kRows * kRowChunks; idx += kMathThreads) {
        const int row = idx / kRowChunks, chunk = idx % kRowChunks;
        const bool valid = tile_row0 + row < p.rows;
        cp_async_16(smem_base + Smem::kQ + (chunk >> 3) * kTileBytes + wgmma::sw128_offset(row, chunk & 7),
                    valid ? q_rows + row * (kHeadDim * 2) + chunk * 16 : reinterpret_cast<const uint8_t*>(p.q),
                    valid);
      }
      cp_async_commit();
      cp_async_wait<0>();
      wgmma::fence_proxy_async_shared();
      wgmma::named_barrier_sync(kMathSync, kMathThreads);
    }

    int visible[2];
    visible_tokens_of_rows(p, piece, tile_row0, mt.local_row, visible);
    float row_max[2] = {kNegInf, kNegInf};
    float row_sum[2] = {0.0f, 0.0f};  // this thread's part of this warpgroup's part of l
#pragma unroll
    for (int i = 0; i < kORegs; ++i) o[i] = 0.0f;

    // The own page of the first pair.
    int own_valid = 0;
    if (kGroup < pages) {
      issue_qk_half(s, smem_base, kGroup, kGroup, uses[kGroup] & 1, true);
      own_valid = valid_slot[kGroup];
      issue_qk_half(s, smem_base, kGroup, kOther, uses[kGroup] & 1, false);
    }
    wgmma::wait<0>();
    wgmma::fence_registers(s);

#pragma unroll 1
    for (int pair = 0; 2 * pair < pages; ++pair) {
      const bool has_b = 2 * pair + 1 < pages;
      const bool has_next_own = 2 * pair + 2 + kGroup < pages;
      const int page_a_token0 = (piece.page_begin + 2 * pair) * kPageSize;
      const int parity_a = uses[0] & 1, parity_b = uses[1] & 1;
      float m_a[2], m_b[2];

      if constexpr (kGroup == 0) {
        // ---- softmax of page a, O_0 = O_0 alpha_a + P_a V_a ----
        float page_max[2], alpha_a[2], sum[2];
        mask_and_max(s, own_valid, page_a_token0, visible, scale_log2, mt, page_max);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          m_a[h] = fmaxf(row_max[h], page_max[h]);
          alpha_a[h] = rescale_factor(row_max[h], m_a[h]);
          if (mt.quad_lane == 0) max_a[mt.local_row[h]] = m_a[h];
        }
        wgmma::named_barrier_arrive(kMaxAReady, kMathThreads);
        exponentiate(s, m_a, scale_log2, sum);
        uint32_t a_frag[kPvSteps][4];
        pack_p_fragments(s, a_frag);
#pragma unroll
        for (int h = 0; h < 2; ++h) row_sum[h] = fmaf(row_sum[h], alpha_a[h], sum[h]);
        scale_rows(o, alpha_a);
        issue_pv_rs<0>(o, a_frag, smem_base, 0);
        wgmma::wait<0>();
        wgmma::fence_registers(o);
        wgmma::mbarrier_arrive(empty_barrier(smem_base, 0, 0));

        // ---- P_a' = P_a alpha_b for WG1 ----
        wgmma::named_barrier_sync(kMaxBReady, kMathThreads);
        float alpha_b[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          m_b[h] = max_b[mt.local_row[h]];
          alpha_b[h] = rescale_factor(m_a[h], m_b[h]);
        }
        store_p_tile(s, alpha_b, own_p_tile, mt);
        wgmma::fence_proxy_async_shared();
        wgmma::named_barrier_arrive(kPaReady, kMathThreads);

        // ---- O_0 = O_0 alpha_b + P_b V_b ----
        wgmma::named_barrier_sync(kPbReady, kMathThreads);
        scale_rows(o, alpha_b);
#pragma unroll
        for (int h = 0; h < 2; ++h) row_sum[h] *= alpha_b[h];
        if (has_b) {
          // Completed already (WG1's QK waited it); the wait acquires the copies.
          acquire_v_half(smem_base, 1, 0, parity_b);
          issue_pv_ss<0>(o, smem_base, 1);
        }
      } else {
        // ---- softmax of page b after m_a ----
        float page_max[2] = {kNegInf, kNegInf}, alpha_a[2], alpha_b[2], sum[2] = {0.0f, 0.0f};
        if (has_b) mask_and_max(s, own_valid, page_a_token0 + kPageSize, visible, scale_log2, mt, page_max);
        wgmma::named_barrier_sync(kMaxAReady, kMathThreads);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          m_a[h] = max_a[mt.local_row[h]];
          m_b[h] = fmaxf(m_a[h], page_max[h]);
          alpha_a[h] = rescale_factor(row_max[h], m_a[h]);
          alpha_b[h] = rescale_factor(m_a[h], m_b[h]);
          if (mt.quad_lane == 0) max_b[mt.local_row[h]] = m_b[h];
        }
        wgmma::named_barrier_arrive(kMaxBReady, kMathThreads);
        float alpha[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) alpha[h] = alpha_a[h] * alpha_b[h];
        scale_rows(o, alpha);
        uint32_t a_frag[kPvSteps][4];
        if (has_b) {
          exponentiate(s, m_b, scale_log2, sum);
          pack_p_fragments(s, a_frag);
          if constexpr (kTma) {
            issue_pv_rs<1>(o, a_frag, smem_base, 1);
            store_p_fragments(a_frag, own_p_tile, mt);
            wgmma::fence_proxy_async_shared();
          } else {
            const float one[2] = {1.0f, 1.0f};
            store_p_tile(s, one, own_p_tile, mt);
            wgmma::fence_proxy_async_shared();
            issue_pv_rs<1>(o, a_frag, smem_base, 1);
          }
        }
#pragma unroll
        for (int h = 0; h < 2; ++h) row_sum[h] = fmaf(row_sum[h], alpha[h], sum[h]);

        // ---- O_1 += P_a' V_a ----
        wgmma::named_barrier_sync(kPaReady, kMathThreads);
        acquire_v_half(smem_base, 0, 1, parity_a);  // completed already
        issue_pv_ss<1>(o, smem_base, 0);
        wgmma::named_barrier_arrive(kPbReady, kMathThreads);
        if (has_b) {
          wgmma::wait<1>();
          wgmma::mbarrier_arrive(empty_barrier(smem_base, 1, 1));
        }
      }
#pragma unroll
      for (int h = 0; h < 2; ++h) row_max[h] = m_b[h];

      // ---- release the pages read, and S of the next own page ----
      const int next_parity = (uses[kGroup] + 1) & 1;
      if constexpr (kGroup == 0) {
        // Groups in flight: PV b (if has_b), then QK's first half.
        if (has_next_own) {
          issue_qk_half(s, smem_base, 0, 0, next_parity, true);
          own_valid = valid_slot[0];
          wgmma::wait<1>();
        } else {
          wgmma::wait<0>();
        }
        if (has_b) wgmma::mbarrier_arrive(empty_barrier(smem_base, 1, 0));
        if (has_next_own) issue_qk_half(s, smem_base, 0, 1, next_parity, false);
        wgmma::wait<0>();
        wgmma::fence_registers(o);
        wgmma::fence_registers(s);
      } else {
        wgmma::wait<0>();
        wgmma::fence_registers(o);
        wgmma::mbarrier_arrive(empty_barrier(smem_base, 0, 1));
        if (has_next_own) {
          issue_qk_half(s, smem_base, 1, 1, next_parity, true);
          own_valid = valid_slot[1];
          issue_qk_half(s, smem_base, 1, 0, next_parity, false);
        }
        wgmma::wait<0>();
        wgmma::fence_registers(s);
      }
      ++uses[0];
      if (has_b) ++uses[1];
    }

    // ---- epilogue: l = both parts; out / lse or the split's partials ----
    float l[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      l[h] = quad_sum(row_sum[h]);
      if (mt.quad_lane == 0) sums[kGroup * kRows + mt.local_row[h]] = l[h];
    }
    wgmma::named_barrier_sync(kMathSync, kMathThreads);
#pragma unroll
    for (int h = 0; h < 2; ++h) l[h] = sums[mt.local_row[h]] + sums[kRows + mt.local_row[h]];
    const PieceOutput output = piece_output(p, part, batch);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      store_output_row<kDimsPerWarpGroup / 8>(
          p, output, batch, tile_row0 + mt.local_row[h], kGroup * kDimsPerWarpGroup + 2 * mt.quad_lane, row_max[h],
          l[h], 1.0f, kGroup == 0 && mt.quad_lane == 0,
          [&](int j) { return make_float2(o[4 * j + 2 * h], o[4 * j + 2 * h + 1]); });
    }
  }
}

// kv_map: the 2D TMA map of the cache pool, [num_pages * 64 rows x 576 bf16]
// in boxes of 64 x 64 with the 128-byte swizzle (decode_bf16_wgmma.cu);
// unused without kTma.
template <bool kTma>
__global__ void __launch_bounds__(kThreads, 1)
    mla_decode_bf16_wgmma_kernel(const DecodeKernelParams p, const __grid_constant__ CUtensorMap kv_map) {
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  // The swizzle is a function of address bits 4..9, so tiles start 1024-byte aligned.
  const uint32_t raw_base = smem_address(smem_raw);
  const uint32_t smem_base = (raw_base + 1023u) & ~1023u;
  uint8_t* smem = smem_raw + (smem_base - raw_base);

  const int tid = threadIdx.x;
  // Through a shuffle so that the compiler knows it is warp-uniform.
  const int warp_group = __shfl_sync(0xffffffffu, tid >> 7, 0);
  wait_for_prior_kernel();  // the schedule, query and cache come from earlier kernels
  release_next_kernel();   // the combine, or the next step's first kernel
  const SchedulePart part = load_schedule_part(p.tile_scheduler_metadata, blockIdx.y);

  if (tid == 0) {
    for (int stage = 0; stage < 2; ++stage) {
      for (int half = 0; half < 2; ++half) wgmma::mbarrier_init(empty_barrier(smem_base, stage, half), 128);
      for (int tile = 0; tile < kTiles; ++tile) wgmma::mbarrier_init(tile_full_barrier(smem_base, stage, tile), 1);
    }
    if constexpr (kTma) wgmma::fence_mbarrier_init();
  }
  __syncthreads();  // the last CTA-wide barrier: from here on the roles synchronise apart

  if (warp_group == 2) {
    wgmma::set_max_registers_decrease<kProducerRegisters>();
    run_producer<kTma>(p, part, smem_base, smem, tid - kMathThreads, &kv_map);
    return;
  }
  wgmma::set_max_registers_increase<kMathRegisters>();
  const int lane = tid & 31, group_warp = (tid >> 5) & 3;
  MathThread mt;
  mt.quad_lane = lane & 3;
  mt.local_row[0] = 16 * group_warp + (lane >> 2);
  mt.local_row[1] = mt.local_row[0] + 8;
  if (warp_group == 0) {
    run_math<kTma, 0>(p, part, smem_base, smem, mt, tid);
  } else {
    run_math<kTma, 1>(p, part, smem_base, smem, mt, tid);
  }
}

}  // namespace snapmla::cuda::sm90::bf16_wgmma_decode
