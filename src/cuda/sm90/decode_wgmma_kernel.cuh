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

inline constexpr int kRows = 64;  // the wgmma M
inline constexpr int kWarpGroups = 2;
inline constexpr int kThreads = kWarpGroups * 128;
inline constexpr int kWarps = kThreads / 32;
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
  static constexpr int kPTile = kVt + kHeadDimV * kVtRowBytes;
  // [2 warpgroups][64 rows] float2 (m_g, f_g), then [2][64] f32 l.
  static constexpr int kExchange = kPTile + kRows * kVtRowBytes;
  static constexpr int kExchangeSlots = kWarpGroups * kRows;
  static constexpr int kSumExchange = kExchange + kExchangeSlots * 8;
  static constexpr int kBytes = kSumExchange + kExchangeSlots * 4;
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

__device__ __forceinline__ void build_vt_steps(uint32_t k_tiles, uint32_t vt, const VtThreadOffsets& o,
                                               int step_begin, int step_end) {
#pragma unroll
  for (int step = step_begin; step < step_end; ++step) {
    uint32_t r[4];
    ldmatrix_x4_trans(r, k_tiles + (step >> 1) * kTileBytes + (o.k_read ^ ((step & 1) << 6)));
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const uint32_t dst = vt + o.vt_write + (64 * step + 16 * h) * kVtRowBytes;
      st_shared_u32(dst, byte_perm(r[2 * h], r[2 * h + 1], 0x6420));
      st_shared_u32(dst + kVtRowBytes, byte_perm(r[2 * h], r[2 * h + 1], 0x7531));
    }
  }
}

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

    // Returns the page's valid tokens (as page_rows), kept for its mask.
    auto load_page = [&](int page, int stage) -> int {
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
      return valid_rows;
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
    // one per iteration for the page two ahead. valid_ahead[i]: valid tokens
    // of page + i (read from the block table once, by its copy).
    int valid_ahead[2] = {0, 0};
    if (page_begin < page_end) valid_ahead[0] = load_page(page_begin, 0);
    cp_async_commit();
    if (page_begin + 1 < page_end) valid_ahead[1] = load_page(page_begin + 1, 1);
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

    // The first page's wait below also covers Q (its copies are in that group).
    __syncthreads();  // the query scales
    const float row_scale[2] = {q_scale_smem[local_row[0]] * p.scale_log2, q_scale_smem[local_row[1]] * p.scale_log2};

    for (int page = page_begin; page < page_end; ++page) {
      const int stage = (page - page_begin) % kStages;
      cp_async_wait<1>();  // all but the newest group (the next page's) have landed
      wgmma::fence_proxy_async_shared();
      // This page (and Q) landed and is visible to wgmma; both warpgroups are
      // done with the previous page's V^T and P^ (each waited for its PV) and
      // with the stage the copy below refills.
      __syncthreads();
      const int valid_tokens = valid_ahead[0];
      valid_ahead[0] = valid_ahead[1];
      valid_ahead[1] = page + 2 < page_end ? load_page(page + 2, (stage + 2) % kStages) : 0;
      cp_async_commit();

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
      __syncthreads();
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
      __syncthreads();  // V^T and both halves of P^ complete and visible to wgmma

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
              wgmma::desc_at(vt_desc, step * kPvN * kVtRowBytes + 32 * kk, wgmma::Swizzle::k64B);
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
    }
    cp_async_wait<0>();  // nothing may land in a stage after the next sequence reuses it

    // ---- epilogue: out / lse or the split's partials (as v1) ----
    const bool direct = p.num_splits[batch + 1] - p.num_splits[batch] <= 1;
    const int split = batch == part.begin_batch ? part.first_split : 0;
    const int64_t split_index = static_cast<int64_t>(p.num_splits[batch]) + split;
    float row_l[2];
    // l = the two warpgroups' parts, added in the same order in both.
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      row_l[half] = quad_sum(row_sum[half]);
      if (quad_lane == 0) sum_exchange[warp_group * kRows + local_row[half]] = row_l[half];
    }
    __syncthreads();
#pragma unroll
    for (int half = 0; half < 2; ++half)
      row_l[half] = sum_exchange[local_row[half]] + sum_exchange[kRows + local_row[half]];
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
