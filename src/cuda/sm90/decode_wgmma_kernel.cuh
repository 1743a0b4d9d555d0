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
// Per page, in both warpgroups:
//   QK   S[64 x 64] in fp32 registers, computed redundantly by BOTH warpgroups
//        (so both hold identical S, m, P scale and no S/P exchange through
//        shared memory is needed): bf16 m64n64k16 x 4 over the RoPE dims into
//        S, and e4m3 m64n64k32 over the NoPE dims in 4 chunks of 128 dims, each
//        into a fresh fragment T that is then added to S in fp32 (Hopper's fp8
//        MMA keeps fewer than fp32's accumulator bits; DeepGEMM's promotion).
//        While a chunk runs, all 256 threads build a quarter of V^T.
//   softmax  exactly the v1 math, in registers; a row lives in one quad of lanes.
//   PV   warpgroup g: O[:, 256 g, 256 g + 256) (128 fp32 registers) =
//        O * beta + P^ V^: per 128-dim half, m64n128k32 e4m3 x 2 (the 64
//        tokens) into a fresh fragment with P^ straight from registers, then
//        added to O in fp32 (see the PV step for why not m64n256 into O).
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
//           8 j + 2 (lane % 4) + {0, 1} are exactly the k bytes the RS A
//           fragment wants from it (see pack_p below).
//
// Two per-page schemes (WgmmaVariant, picked at launch: decode_fp8_wgmma.cu):
//   kRedundantQk (v2) as described above.
//   kSplitTokens (v3) removes v2's redundancy: warpgroup g computes S only for
//        the page's tokens [32 g, 32 g + 32) (m64n32 QK, half the MMA and half
//        the softmax instructions), the two warpgroups exchange per-row maxima
//        of x and of f through shared memory (the page's m and P scale need all
//        64 tokens; max is exact, so m, s_p and beta are v2's bit for bit), each
//        writes its half of P^ into a shared K-major SW64 tile in V^T's token
//        order, and PV reads P^ from there (SS form). Each warpgroup keeps its
//        own part of l (both apply the same beta), summed in the epilogue.
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

inline constexpr int kRows = 64;  // the wgmma M
inline constexpr int kWarpGroups = 2;
inline constexpr int kThreads = kWarpGroups * 128;
inline constexpr int kWarps = kThreads / 32;
inline constexpr int kDimsPerWarpGroup = kHeadDimV / kWarpGroups;  // 256 output dims per warpgroup
inline constexpr int kPvN = kDimsPerWarpGroup / 2;                 // 128, the PV wgmma N
inline constexpr int kTileRowBytes = 128;                          // SW128 row
inline constexpr int kTileBytes = kRows * kTileRowBytes;           // one [64 x 128 B] tile
inline constexpr int kNopeTiles = kNopeDim / kTileRowBytes;        // 4 QK chunks
inline constexpr int kNopeChunks = kNopeDim / 16;                  // 16-byte chunks per NoPE row
inline constexpr int kRopeChunks = kRopeDim * 2 / 16;              // per RoPE row
inline constexpr int kVtRowBytes = kPageSize;                      // e4m3 tokens per V^T row
inline constexpr int kTokensPerWarpGroup = kPageSize / kWarpGroups;  // v3: S columns per warpgroup
inline constexpr float kNegInf = -__builtin_huge_valf();
static_assert(kPageSize == 64 && kRows == 64, "tile shapes assume 64-token pages and 64-row CTAs");
static_assert(kRopeDim * 2 == kTileRowBytes, "a RoPE row must be one SW128 row");
static_assert(kVtRowBytes == 64, "V^T rows must be one SW64 row");

__host__ __device__ constexpr int align1024(int bytes) { return (bytes + 1023) / 1024 * 1024; }

// Page stages: two pages in flight while one is computed (one CTA per SM, so
// the cp.async queue is the only latency hiding there is).
inline constexpr int kStages = 3;

struct Smem {
  static constexpr int kQ = 0;
  static constexpr int kQRope = kQ + kNopeTiles * kTileBytes;
  static constexpr int kQScale = kQRope + kTileBytes;
  static constexpr int kStage0 = align1024(kQScale + kRows * 4);
  static constexpr int kStageRope = kNopeTiles * kTileBytes;
  static constexpr int kStageScale = kStageRope + kTileBytes;
  static constexpr int kStageBytes = align1024(kStageScale + kPageSize * 4);
  static constexpr int kVt = kStage0 + kStages * kStageBytes;
  // v3 only: P^ [64 rows x 64 tokens] e4m3, K-major SW64 in V^T's token
  // order; then per-row exchanges [2 warpgroups][64 rows] f32 of the page's
  // x maximum, f maximum, and (epilogue) l.
  static constexpr int kPTile = kVt + kHeadDimV * kVtRowBytes;
  static constexpr int kExchange = kPTile + kRows * kVtRowBytes;
  static constexpr int kExchangeFloats = kWarpGroups * kRows;
  static constexpr int kBytes = kExchange + 3 * kExchangeFloats * 4;
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

__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// Builds units [unit_begin, unit_end) (one per warp and step) of the page's
// V^T from its K8 tiles. Unit u = (token group u % 4, dims [32 (u / 4),
// 32 (u / 4) + 32)). ldmatrix.trans on 16-bit pairs gives lane l, for dim
// pair p = l / 4 (dims 2p, 2p+1 of a 16-dim chunk) and q = l % 4, the bytes
// [tok 2q: d 2p, d 2p+1 | tok 2q+1: d 2p, d 2p+1] of the first 8 tokens (r[0])
// and of tokens 8.. (r[1]); prmt 0x6420 / 0x7531 makes dim 2p / 2p+1's bytes
// for tokens {2q, 2q+1, 8+2q, 9+2q}: positions 4q..4q+3 of the group, the
// permuted order above. SW64 chunk index = token group.
__device__ __forceinline__ void build_vt_units(uint32_t k_tiles, uint32_t vt, int warp, int lane, int step_begin,
                                               int step_end) {
  const int matrix = lane >> 3;
  const int pair = lane >> 2;
  const int quad_lane = lane & 3;
#pragma unroll
  for (int step = step_begin; step < step_end; ++step) {
    const int unit = warp + kWarps * step;
    const int token_group = unit & 3, chunk0 = (unit >> 2) * 2;
    const int token = token_group * 16 + (lane & 7) + 8 * (matrix & 1);
    uint32_t r[4];
    ldmatrix_x4_trans(r, k_tiles + nope_offset(token, chunk0 + (matrix >> 1)));
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int dim = (chunk0 + h) * 16 + 2 * pair;
      st_shared_u32(vt + wgmma::sw64_offset(dim, token_group) + 4 * quad_lane,
                    byte_perm(r[2 * h], r[2 * h + 1], 0x6420));
      st_shared_u32(vt + wgmma::sw64_offset(dim + 1, token_group) + 4 * quad_lane,
                    byte_perm(r[2 * h], r[2 * h + 1], 0x7531));
    }
  }
}
inline constexpr int kVtUnits = (kPageSize / 16) * (kNopeDim / 32);  // 64
inline constexpr int kVtStepsPerChunk = kVtUnits / kWarps / kNopeTiles;  // 2 per warp per QK chunk
static_assert(kVtStepsPerChunk * kWarps * kNopeTiles == kVtUnits, "V^T units must split evenly");

// Issues the 4 e4m3 k steps of NoPE chunk `chunk` into the fresh fragment t.
__device__ __forceinline__ void issue_qk_chunk(float (&t)[32], uint32_t q_tiles, uint32_t k_tiles, int chunk) {
#pragma unroll
  for (int k = 0; k < kTileRowBytes / 32; ++k) {
    const uint32_t offset = chunk * kTileBytes + 32 * k;
    wgmma::mma_64x64x32_e4m3_ss(t, wgmma::make_desc(q_tiles + offset, wgmma::Swizzle::k128B),
                                wgmma::make_desc(k_tiles + offset, wgmma::Swizzle::k128B), k > 0);
  }
}
// The same for 32 tokens (v3), from descriptor low words (wgmma::desc_at) of
// Q8 and of the warpgroup's first K8 token row.
__device__ __forceinline__ void issue_qk_chunk(float (&t)[16], uint32_t q_desc, uint32_t k_desc, int chunk) {
#pragma unroll
  for (int k = 0; k < kTileRowBytes / 32; ++k) {
    const uint32_t offset = chunk * kTileBytes + 32 * k;
    wgmma::mma_64x32x32_e4m3_ss(t, wgmma::desc_at(q_desc, offset, wgmma::Swizzle::k128B),
                                wgmma::desc_at(k_desc, offset, wgmma::Swizzle::k128B), k > 0);
  }
}

// 2^x on MUFU.EX2 alone: the ftz form skips exp2f's rescaling around results
// below 2^-126, which only differ from 0 for tokens whose weight relative to
// the row's running maximum is below 2^-126 (invisible after normalisation).
__device__ __forceinline__ float exp2_ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// The per-page schemes (see the top of the file).
enum class WgmmaVariant { kRedundantQk, kSplitTokens };

template <WgmmaVariant kVariant>
__global__ void __launch_bounds__(kThreads, 1) mla_decode_fp8_wgmma_kernel(const DecodeKernelParams p) {
  constexpr bool kSplitTokens = kVariant == WgmmaVariant::kSplitTokens;
  constexpr int kSRegs = kSplitTokens ? 16 : 32;  // S fragment: m64n32 (v3) or m64n64 (v2)
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  // The swizzle is a function of address bits 4..9, so tiles start 1024-byte aligned.
  const uint32_t raw_base = smem_address(smem_raw);
  const uint32_t smem_base = (raw_base + 1023u) & ~1023u;
  uint8_t* smem = smem_raw + (smem_base - raw_base);

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  // PV: output dims [256 g, 256 g + 256). Through a shuffle so that the
  // compiler knows it is warp-uniform (v3's descriptors then stay in uniform registers).
  const int warp_group = __shfl_sync(0xffffffffu, warp >> 2, 0);
  const int group_warp = warp & 3;     // fragment rows [16 w, 16 w + 16)
  const int group_row = lane >> 2;
  const int quad_lane = lane & 3;
  const int tile_row0 = blockIdx.x * kRows;
  const int local_row[2] = {16 * group_warp + group_row, 16 * group_warp + group_row + 8};

  float* q_scale_smem = reinterpret_cast<float*>(smem + Smem::kQScale);
  const uint32_t q_tiles = smem_base + Smem::kQ;
  const uint32_t q_rope_tile = smem_base + Smem::kQRope;
  const uint32_t vt_base = smem_base + Smem::kVt;
  const uint32_t p_tile = smem_base + Smem::kPTile;
  float* max_exchange = reinterpret_cast<float*>(smem + Smem::kExchange);
  float* f_max_exchange = max_exchange + Smem::kExchangeFloats;
  float* sum_exchange = f_max_exchange + Smem::kExchangeFloats;
  // v3's loop-invariant descriptor low words.
  const uint32_t q_desc = wgmma::desc_low_word(q_tiles);
  const uint32_t q_rope_desc = wgmma::desc_low_word(q_rope_tile);
  const uint32_t p_desc = wgmma::desc_low_word(p_tile);
  const uint32_t vt_desc = wgmma::desc_low_word(vt_base + warp_group * kDimsPerWarpGroup * kVtRowBytes);

  const SchedulePart part = load_schedule_part(p.tile_scheduler_metadata, blockIdx.y);

  for (int batch = part.begin_batch; batch <= part.end_batch; ++batch) {
    const int s_k = max(p.cache_seqlens[batch], 0);
    const int page_begin = batch == part.begin_batch ? part.begin_page : 0;
    const int page_end = batch == part.end_batch ? part.end_page : pages_for_tokens(s_k);

    // As v1: valid tokens of logical page `page` (0 for a page index outside
    // the pool, which is then never read), and its physical index.
    auto page_rows = [&](int page, int64_t* physical) -> int {
      const int64_t id = page < p.max_pages ? p.block_table[static_cast<int64_t>(batch) * p.max_pages + page] : -1;
      if (id < 0 || id >= p.num_pages) {
        if (tid == 0) atomicOr(p.status, kStatusBadPage);
        *physical = 0;
        return 0;
      }
      *physical = id;
      return min(kPageSize, s_k - page * kPageSize);
    };

    auto load_page = [&](int page, int stage) {
      int64_t physical;
      const int valid_rows = page_rows(page, &physical);
      const uint32_t stage_base = smem_base + Smem::kStage0 + stage * Smem::kStageBytes;
      // Thread tid copies chunk tid % C of rows tid / C + (kThreads / C) i: the
      // row step is a multiple of 8, so the swizzle (a function of row % 8) is
      // the same for all of a thread's rows and each copy is base + constant.
      // A masked row's source is still a slot of the same in-pool page (never
      // read: source size 0), so no address select is needed.
      const uint8_t* nope_page = p.kv_nope + physical * kPageSize * kNopeDim;
      {
        constexpr int kRowStep = kThreads / kNopeChunks;
        static_assert(kThreads % kNopeChunks == 0 && kRowStep % 8 == 0 && kPageSize % kRowStep == 0,
                      "NoPE copy rows must keep their swizzle phase");
        const int row0 = tid / kNopeChunks, chunk = tid % kNopeChunks;
        const uint32_t dst = stage_base + nope_offset(row0, chunk);
        const uint8_t* src = nope_page + row0 * kNopeDim + chunk * 16;
#pragma unroll
        for (int i = 0; i < kPageSize / kRowStep; ++i) {
          const bool valid = row0 + kRowStep * i < valid_rows;
          cp_async_16(dst + kRowStep * kTileRowBytes * i, src + kRowStep * kNopeDim * i, valid);
        }
      }
      const uint8_t* rope_page = reinterpret_cast<const uint8_t*>(p.kv_rope) + physical * kPageSize * kRopeDim * 2;
      {
        constexpr int kRowStep = kThreads / kRopeChunks;
        static_assert(kThreads % kRopeChunks == 0 && kRowStep % 8 == 0 && kPageSize % kRowStep == 0,
                      "RoPE copy rows must keep their swizzle phase");
        const int row0 = tid / kRopeChunks, chunk = tid % kRopeChunks;
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
      if (tid < kPageSize) {
        const bool valid = tid < valid_rows;
        cp_async_4(stage_base + Smem::kStageScale + tid * 4, valid ? scale_page + tid : scale_page, valid);
      }
    };

    // ---- prologue: the query tile, quantized here unless given (as v1) ----
    __syncthreads();  // the previous sequence is done with Q and the stages
    const int64_t batch_row0 = static_cast<int64_t>(batch) * p.rows;
    if (p.q_nope != nullptr) {
#pragma unroll 1
      for (int idx = tid; idx < kRows * kNopeChunks; idx += kThreads) {
        const int row = idx / kNopeChunks, chunk = idx % kNopeChunks;
        const bool valid = tile_row0 + row < p.rows;
        const uint8_t* src = p.q_nope + (batch_row0 + tile_row0 + row) * kNopeDim + chunk * 16;
        cp_async_16(q_tiles + nope_offset(row, chunk), valid ? src : p.q_nope, valid);
      }
#pragma unroll 1
      for (int idx = tid; idx < kRows * kRopeChunks; idx += kThreads) {
        const int row = idx / kRopeChunks, chunk = idx % kRopeChunks;
        const bool valid = tile_row0 + row < p.rows;
        const uint8_t* src =
            reinterpret_cast<const uint8_t*>(p.q_rope + (batch_row0 + tile_row0 + row) * kRopeDim) + chunk * 16;
        cp_async_16(q_rope_tile + wgmma::sw128_offset(row, chunk),
                    valid ? src : reinterpret_cast<const uint8_t*>(p.q_rope), valid);
      }
#pragma unroll 1
      for (int row = tid; row < kRows; row += kThreads)
        q_scale_smem[row] = tile_row0 + row < p.rows ? p.q_scale[batch_row0 + tile_row0 + row] : 1.0f;
    } else {
      // One warp per query row in token_quant's lane layout (lane l: NoPE
      // chunk l; lanes < 8: RoPE chunk l). quantize_row writes chunk l at
      // base + 16 l, so each lane's base moves its chunk to its swizzled place.
#pragma unroll 1
      for (int row = warp; row < kRows; row += kWarps) {
        uint8_t* nope_row = smem + Smem::kQ + nope_offset(row, lane) - 16 * lane;
        uint16_t* rope_row =
            reinterpret_cast<uint16_t*>(smem + Smem::kQRope + wgmma::sw128_offset(row, lane & 7) - 16 * lane);
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
    // One cp.async group per page (possibly empty): the prologue's two, then
    // one per iteration for the page two ahead.
    if (page_begin < page_end) load_page(page_begin, 0);
    cp_async_commit();
    if (page_begin + 1 < page_end) load_page(page_begin + 1, 1);
    cp_async_commit();

    // ---- per-row state (identical in both warpgroups) ----
    int visible[2];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = tile_row0 + local_row[half];
      // Causal MTP: query i of s_q sees the first s_k - s_q + i + 1 tokens.
      const int limit = p.causal ? max(0, min(s_k - p.s_q + r / p.h_q + 1, s_k)) : s_k;
      visible[half] = r < p.rows ? limit : 0;
    }
    float row_max[2] = {kNegInf, kNegInf};  // m, log2 units
    float p_scale[2] = {1.0f, 1.0f};        // current P scale s_p
    float row_sum[2] = {0.0f, 0.0f};        // this thread's share of l (units of s_p; v3: of its warpgroup's half)
    float row_scale[2] = {p.scale_log2, p.scale_log2};
    float acc[128];  // O[row, 256 g + 8 j + 2 (lane % 4) + {0,1}] at 4 j + {0,1} (row) / {2,3} (row + 8)
#pragma unroll
    for (int i = 0; i < 128; ++i) acc[i] = 0.0f;
    float s[kSRegs], t[2][kSRegs];  // v2 uses t[0] only
#pragma unroll
    for (int i = 0; i < kSRegs; ++i) s[i] = t[0][i] = t[1][i] = 0.0f;

    for (int page = page_begin; page < page_end; ++page) {
      const int stage = (page - page_begin) % kStages;
      cp_async_wait<1>();  // all but the newest group (the next page's) have landed
      wgmma::fence_proxy_async_shared();
      // This page (and Q) landed and is visible to wgmma; everyone is done
      // with the previous page's stage and with V^T (the previous PV was waited for).
      __syncthreads();
      if (page + 2 < page_end) load_page(page + 2, (stage + 2) % kStages);
      cp_async_commit();

      // Read before the QK wgmma so that the block-table load's latency hides under it.
      int64_t physical_unused;
      const int valid_tokens = page_rows(page, &physical_unused);
      const uint32_t stage_base = smem_base + Smem::kStage0 + stage * Smem::kStageBytes;
      const float* k_scale_smem =
          reinterpret_cast<const float*>(smem + Smem::kStage0 + stage * Smem::kStageBytes + Smem::kStageScale);
      if (page == page_begin) {
        row_scale[0] = q_scale_smem[local_row[0]] * p.scale_log2;
        row_scale[1] = q_scale_smem[local_row[1]] * p.scale_log2;
      }

      if constexpr (!kSplitTokens) {
        // ---- S = Q K^T: RoPE into S, NoPE chunk c into T, S += T (fp32) ----
        wgmma::fence_registers(s);
        wgmma::fence_registers(t[0]);
        wgmma::fence();
#pragma unroll
        for (int k = 0; k < kRopeDim * 2 / 32; ++k)
          wgmma::mma_64x64x16_bf16_ss(s, wgmma::make_desc(q_rope_tile + 32 * k, wgmma::Swizzle::k128B),
                                      wgmma::make_desc(stage_base + Smem::kStageRope + 32 * k, wgmma::Swizzle::k128B),
                                      k > 0);
        issue_qk_chunk(t[0], q_tiles, stage_base, 0);
        wgmma::commit();
#pragma unroll
        for (int chunk = 0; chunk < kNopeTiles; ++chunk) {
          // A quarter of this page's V^T while the tensor cores run.
          build_vt_units(stage_base, vt_base, warp, lane, chunk * kVtStepsPerChunk, (chunk + 1) * kVtStepsPerChunk);
          wgmma::wait<0>();
          wgmma::fence_registers(s);
          wgmma::fence_registers(t[0]);
#pragma unroll
          for (int i = 0; i < 32; ++i) s[i] += t[0][i];
          if (chunk + 1 < kNopeTiles) {
            wgmma::fence_registers(t[0]);
            wgmma::fence();
            issue_qk_chunk(t[0], q_tiles, stage_base, chunk + 1);
            wgmma::commit();
          }
        }

        // ---- online softmax over this page (v1's math; x, e, f in place in s) ----
        const int page_token0 = page * kPageSize;
        float local_max[2] = {kNegInf, kNegInf};
#pragma unroll
        for (int j = 0; j < 8; ++j)
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            const int token = 8 * j + 2 * quad_lane + (c & 1);
            const int half = c >> 1;
            const bool keep = token < valid_tokens && page_token0 + token < visible[half];
            float score = s[4 * j + c] * row_scale[half];
            score *= k_scale_smem[token];
            s[4 * j + c] = keep ? score : kNegInf;
            local_max[half] = fmaxf(local_max[half], s[4 * j + c]);
          }
        float new_max[2], e_sum[2] = {0.0f, 0.0f};
#pragma unroll
        for (int half = 0; half < 2; ++half) new_max[half] = fmaxf(row_max[half], quad_max(local_max[half]));
#pragma unroll
        for (int i = 0; i < 32; ++i) {
          const int half = (i >> 1) & 1;
          // Nothing seen yet (m = -inf): every x is -inf and e = 0, without -inf - -inf.
          const float base = new_max[half] == kNegInf ? 0.0f : new_max[half];
          s[i] = exp2f(s[i] - base);
          e_sum[half] += s[i];
        }
        // Fold the V scale into P (masked tokens: e = 0, scale zero-filled), then
        // one e4m3 scale per (row, page).
        float f_max[2] = {0.0f, 0.0f};
#pragma unroll
        for (int j = 0; j < 8; ++j)
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            const int token = 8 * j + 2 * quad_lane + (c & 1);
            s[4 * j + c] *= k_scale_smem[token];
            f_max[c >> 1] = fmaxf(f_max[c >> 1], s[4 * j + c]);
          }
        float beta[2], inv_scale[2];
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const float page_f_max = quad_max(f_max[half]);
          const bool any = page_f_max > 0.0f;
          const float new_scale = any ? page_f_max / kE4M3Max : 1.0f;
          inv_scale[half] = any ? kE4M3Max / page_f_max : 1.0f;
          beta[half] =
              row_max[half] == kNegInf ? 0.0f : exp2f(row_max[half] - new_max[half]) * (p_scale[half] * inv_scale[half]);
          row_sum[half] = fmaf(row_sum[half], beta[half], e_sum[half] * inv_scale[half]);
          p_scale[half] = new_scale;
          row_max[half] = new_max[half];
        }
        // P^ as the RS A fragments of the 2 k steps (32 tokens each). k step kk,
        // register 0: row lane/4, k bytes 4q..4q+3 (q = lane % 4) of token group
        // 2 kk = tokens {2q, 2q+1, 8+2q, 9+2q} of it (permuted V^T order) = this
        // thread's S columns of j = 4 kk (registers 4j+0, 4j+1) and j = 4 kk + 1;
        // register 1: the same for row + 8 (4j+2, 4j+3); registers 2, 3: token
        // group 2 kk + 1, i.e. j = 4 kk + 2 and 4 kk + 3.
        uint32_t p_frag[2][4];
#pragma unroll
        for (int kk = 0; kk < 2; ++kk)
#pragma unroll
          for (int reg = 0; reg < 4; ++reg) {
            const int half = reg & 1;
            const int j0 = 4 * kk + 2 * (reg >> 1);
            const int c0 = 2 * half;
            const float inv = inv_scale[half];
            const uint32_t lo = token_quant::e4m3x2_bits(s[4 * j0 + c0] * inv, s[4 * j0 + c0 + 1] * inv);
            const uint32_t hi = token_quant::e4m3x2_bits(s[4 * (j0 + 1) + c0] * inv, s[4 * (j0 + 1) + c0 + 1] * inv);
            p_frag[kk][reg] = lo | (hi << 16);
          }

        wgmma::fence_proxy_async_shared();
        __syncthreads();  // V^T (written by all 256 threads) complete and visible to wgmma

        // ---- O = O * beta + P^ V^ for this warpgroup's 256 dims ----
        // The page's product is formed in a fresh fragment and added in fp32
        // (as v1): the fp8 MMA's accumulator keeps ~13 mantissa bits (DeepSeek-V3
        // report; SageAttention2's "FP22"), and accumulating every page into O
        // through it would truncate O once per page. A fresh 256-wide fragment
        // would need 128 more registers, so the 256 dims go as two n128 halves.
#pragma unroll
        for (int half_n = 0; half_n < 2; ++half_n) {
          float product[64];
          wgmma::fence_registers(product);
          wgmma::fence();
#pragma unroll
          for (int kk = 0; kk < 2; ++kk)
            wgmma::mma_64x128x32_e4m3_rs(
                product, p_frag[kk],
                wgmma::make_desc(vt_base + (warp_group * kDimsPerWarpGroup + half_n * kPvN) * kVtRowBytes + 32 * kk,
                                 wgmma::Swizzle::k64B),
                kk > 0);
          wgmma::commit();
          wgmma::wait<0>();
          wgmma::fence_registers(product);
          // product[4 j + c] is dim 128 half_n + 8 j + 2 (lane % 4) + (c & 1) of
          // the warpgroup's 256: acc index 4 (16 half_n + j) + c.
#pragma unroll
          for (int i = 0; i < 64; ++i) {
            float& o = acc[64 * half_n + i];
            o = fmaf(o, beta[(i >> 1) & 1], product[i]);
          }
        }
      } else {
        // ---- S = Q K^T for this warpgroup's 32 tokens: RoPE into S, NoPE chunk
        // c into T[c % 2], S += T in fp32 (as v2), two chunks in flight ----
        // Warp-uniform; the shuffle lets the compiler keep it in a uniform register.
        const uint32_t k_desc = __shfl_sync(
            0xffffffffu, wgmma::desc_low_word(stage_base + warp_group * kTokensPerWarpGroup * kTileRowBytes), 0);
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
#pragma unroll
        for (int chunk = 0; chunk < kNopeTiles; ++chunk) {
          build_vt_units(stage_base, vt_base, warp, lane, chunk * kVtStepsPerChunk, (chunk + 1) * kVtStepsPerChunk);
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

        // ---- online softmax (v2's math on 32 of the 64 columns) ----
        // s[4 j + c]: row local_row[c / 2], page token token0 + 8 j + (c & 1).
        const int token0 = warp_group * kTokensPerWarpGroup + 2 * quad_lane;
        float2 k_scale[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) k_scale[j] = *reinterpret_cast<const float2*>(k_scale_smem + token0 + 8 * j);
        const int page_token0 = page * kPageSize;
        int keep_below[2];  // tokens of the page this row sees
#pragma unroll
        for (int half = 0; half < 2; ++half) keep_below[half] = min(valid_tokens, visible[half] - page_token0);
        float local_max[2] = {kNegInf, kNegInf};
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            const int half = c >> 1;
            float score = s[4 * j + c] * row_scale[half];
            score *= (c & 1) ? k_scale[j].y : k_scale[j].x;
            s[4 * j + c] = token0 + 8 * j + (c & 1) < keep_below[half] ? score : kNegInf;
            local_max[half] = fmaxf(local_max[half], s[4 * j + c]);
          }
        // The page's m needs both halves: max is exact, so this is v2's value.
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const float half_max = quad_max(local_max[half]);
          if (quad_lane == 0) max_exchange[warp_group * kRows + local_row[half]] = half_max;
        }
        __syncthreads();
        float new_max[2], e_sum[2] = {0.0f, 0.0f};
#pragma unroll
        for (int half = 0; half < 2; ++half)
          new_max[half] =
              fmaxf(row_max[half], fmaxf(max_exchange[local_row[half]], max_exchange[kRows + local_row[half]]));
#pragma unroll
        for (int i = 0; i < kSRegs; ++i) {
          const int half = (i >> 1) & 1;
          const float base = new_max[half] == kNegInf ? 0.0f : new_max[half];
          s[i] = exp2_ftz(s[i] - base);
          e_sum[half] += s[i];
        }
        float f_max[2] = {0.0f, 0.0f};
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            s[4 * j + c] *= (c & 1) ? k_scale[j].y : k_scale[j].x;
            f_max[c >> 1] = fmaxf(f_max[c >> 1], s[4 * j + c]);
          }
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const float half_f_max = quad_max(f_max[half]);
          if (quad_lane == 0) f_max_exchange[warp_group * kRows + local_row[half]] = half_f_max;
        }
        __syncthreads();
        float beta[2], inv_scale[2];
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const float page_f_max = fmaxf(f_max_exchange[local_row[half]], f_max_exchange[kRows + local_row[half]]);
          const bool any = page_f_max > 0.0f;
          const float new_scale = any ? page_f_max / kE4M3Max : 1.0f;
          inv_scale[half] = any ? kE4M3Max / page_f_max : 1.0f;
          beta[half] = row_max[half] == kNegInf
                           ? 0.0f
                           : exp2f(row_max[half] - new_max[half]) * (p_scale[half] * inv_scale[half]);
          row_sum[half] = fmaf(row_sum[half], beta[half], e_sum[half] * inv_scale[half]);
          p_scale[half] = new_scale;
          row_max[half] = new_max[half];
        }
        // P^ into the shared tile: token group 2 g + jj of row r holds, at bytes
        // 4 q .. 4 q + 3, tokens {2q, 2q+1, 8+2q, 9+2q} of the group (V^T's
        // order): exactly thread q's columns j = 2 jj and 2 jj + 1.
#pragma unroll
        for (int jj = 0; jj < 2; ++jj)
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            const int j0 = 2 * jj, c0 = 2 * half;
            const float inv = inv_scale[half];
            const uint32_t lo = token_quant::e4m3x2_bits(s[4 * j0 + c0] * inv, s[4 * j0 + c0 + 1] * inv);
            const uint32_t hi =
                token_quant::e4m3x2_bits(s[4 * (j0 + 1) + c0] * inv, s[4 * (j0 + 1) + c0 + 1] * inv);
            st_shared_u32(p_tile + wgmma::sw64_offset(local_row[half], 2 * warp_group + jj) + 4 * quad_lane,
                          lo | (hi << 16));
          }

        wgmma::fence_proxy_async_shared();
        __syncthreads();  // V^T and both halves of P^ complete and visible to wgmma

        // ---- O = O * beta + P^ V^ (as v2, with P^ read from shared memory) ----
#pragma unroll
        for (int half_n = 0; half_n < 2; ++half_n) {
          float product[64];
          wgmma::fence_registers(product);
          wgmma::fence();
#pragma unroll
          for (int kk = 0; kk < 2; ++kk)
            wgmma::mma_64x128x32_e4m3_ss(product, wgmma::desc_at(p_desc, 32 * kk, wgmma::Swizzle::k64B),
                                         wgmma::desc_at(vt_desc, half_n * kPvN * kVtRowBytes + 32 * kk,
                                                        wgmma::Swizzle::k64B),
                                         kk > 0);
          wgmma::commit();
          wgmma::wait<0>();
          wgmma::fence_registers(product);
#pragma unroll
          for (int i = 0; i < 64; ++i) {
            float& o = acc[64 * half_n + i];
            o = fmaf(o, beta[(i >> 1) & 1], product[i]);
          }
        }
      }
    }
    cp_async_wait<0>();  // nothing may land in a stage after the next sequence reuses it

    // ---- epilogue: out / lse or the split's partials (as v1) ----
    const bool direct = p.num_splits[batch + 1] - p.num_splits[batch] <= 1;
    const int split = batch == part.begin_batch ? part.first_split : 0;
    const int64_t split_index = static_cast<int64_t>(p.num_splits[batch]) + split;
    float row_l[2];
#pragma unroll
    for (int half = 0; half < 2; ++half) row_l[half] = quad_sum(row_sum[half]);
    if constexpr (kSplitTokens) {
      // l = the two warpgroups' parts, added in the same order in both.
#pragma unroll
      for (int half = 0; half < 2; ++half)
        if (quad_lane == 0) sum_exchange[warp_group * kRows + local_row[half]] = row_l[half];
      __syncthreads();
#pragma unroll
      for (int half = 0; half < 2; ++half)
        row_l[half] = sum_exchange[local_row[half]] + sum_exchange[kRows + local_row[half]];
    }
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = tile_row0 + local_row[half];
      const float l = row_l[half];
      const float inv_l = l > 0.0f ? 1.0f / l : 0.0f;
      const float lse2 = l > 0.0f ? row_max[half] + log2f(l * p_scale[half]) : kNegInf;
      if (r >= p.rows) continue;
      const int i = r / p.h_q, h = r % p.h_q;
      const int c0 = 2 * half;
      const int dim0 = warp_group * kDimsPerWarpGroup + 2 * quad_lane;
      if (direct) {
        uint16_t* out_row = p.out + (static_cast<int64_t>(batch) * p.rows + r) * kHeadDimV + dim0;
#pragma unroll
        for (int j = 0; j < 32; ++j)
          *reinterpret_cast<uint32_t*>(out_row + 8 * j) =
              token_quant::bf16x2_bits(acc[4 * j + c0] * inv_l, acc[4 * j + c0 + 1] * inv_l);
        if (warp_group == 0 && quad_lane == 0)
          p.lse[(static_cast<int64_t>(batch) * p.h_q + h) * p.s_q + i] = lse2 * 0.69314718055994531f;
      } else {
        float* out_row = p.partial_out + (split_index * p.rows + r) * kHeadDimV + dim0;
#pragma unroll
        for (int j = 0; j < 32; ++j)
          *reinterpret_cast<float2*>(out_row + 8 * j) =
              make_float2(acc[4 * j + c0] * inv_l, acc[4 * j + c0 + 1] * inv_l);
        if (warp_group == 0 && quad_lane == 0) p.partial_lse2[split_index * p.rows + r] = lse2;
      }
    }
  }
}

}  // namespace snapmla::cuda::sm90::wgmma_decode
