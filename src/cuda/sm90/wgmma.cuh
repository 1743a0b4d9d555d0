// Hopper warpgroup MMA (wgmma, sm_90a) helpers for the fp8 decode kernel:
// shared-memory matrix descriptors, the two swizzled K-major layouts it uses,
// fences, and the instruction shapes (through CuTe's PTX atoms, whose
// operand lists are expanded here from a register array).
//
// Layout facts relied on (PTX ISA, "Asynchronous Warpgroup Level Matrix
// Shared Memory Layout" and "Matrix Descriptor Format"):
//  - A K-major swizzled operand is a stack of 8-row "atoms"; row r of an atom
//    holds one row's K bytes (128 B for SW128, 64 B for SW64), and 16-byte
//    chunk c of row r is stored at chunk c ^ f(r), the XOR taken on address
//    bits, so every tile starts 1024-byte aligned (base_offset field = 0).
//  - Descriptor: bits 0-13 start address >> 4; 16-29 leading byte offset >> 4
//    (unused for swizzled K-major operands whose K extent per instruction
//    fits in one swizzle row: set to 1); 32-45 stride byte offset >> 4 (the
//    distance between 8-row atoms); 62-63 swizzle mode (1 = 128B, 2 = 64B).
//  - Successive k steps inside one swizzled row are addressed by adding the
//    step's byte offset to the start address (what CUTLASS's descriptor
//    iterator and DeepGEMM do).
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <utility>

#include "cute/arch/mma_sm90_desc.hpp"
#include "cute/arch/mma_sm90_gmma.hpp"
#include "cute/swizzle.hpp"

namespace snapmla::cuda::sm90::wgmma {

namespace gmma = cute::SM90::GMMA;

// ---- swizzled K-major layouts (byte offsets inside a 1024-byte aligned tile) ----
// SW128: 128-byte rows (128 e4m3 or 64 bf16 of K), atoms of 8 rows = 1024 B.
__host__ __device__ constexpr uint32_t sw128_offset(int row, int chunk) {
  return static_cast<uint32_t>(row * 128 + ((chunk ^ (row & 7)) << 4));
}
// SW64: 64-byte rows (64 e4m3 of K), atoms of 8 rows = 512 B.
__host__ __device__ constexpr uint32_t sw64_offset(int row, int chunk) {
  return static_cast<uint32_t>(row * 64 + ((chunk ^ ((row >> 1) & 3)) << 4));
}
inline constexpr int kSw128AtomBytes = 8 * 128;
inline constexpr int kSw64AtomBytes = 8 * 64;

// The formulas above must be CuTe's GMMA swizzle functors (Layout_K_SW128_Atom
// = Swizzle<3,4,3>, Layout_K_SW64_Atom = Swizzle<2,4,3> on byte offsets), which
// are the hardware's patterns.
constexpr bool swizzles_match_cute() {
  for (int row = 0; row < 64; ++row) {
    for (int chunk = 0; chunk < 8; ++chunk)
      if (sw128_offset(row, chunk) != static_cast<uint32_t>(cute::Swizzle<3, 4, 3>{}(row * 128 + chunk * 16)))
        return false;
    for (int chunk = 0; chunk < 4; ++chunk)
      if (sw64_offset(row, chunk) != static_cast<uint32_t>(cute::Swizzle<2, 4, 3>{}(row * 64 + chunk * 16)))
        return false;
  }
  return true;
}
static_assert(swizzles_match_cute(), "swizzle formulas differ from CuTe's GMMA atoms");

enum class Swizzle : uint64_t { k128B = 1, k64B = 2 };

// Descriptor of a K-major swizzled operand, built from a base's low word plus a byte offset: the
// start field is (address >> 4) in bits 0-13, and every shared address (at
// most 228 KB) keeps address >> 4 below 2^14, so adding offset >> 4 to the
// low word never carries out of the field. The high word is a constant, and
// an offset known at compile time costs one integer add (none when the base
// is loop-invariant).
__device__ __forceinline__ uint32_t desc_low_word(uint32_t start) {
  return ((start >> 4) & 0x3fff) | (uint32_t{1} << 16);
}
__device__ __forceinline__ uint64_t desc_at(uint32_t base_low_word, uint32_t byte_offset, Swizzle swizzle) {
  const uint64_t atom_bytes = swizzle == Swizzle::k128B ? kSw128AtomBytes : kSw64AtomBytes;
  const uint64_t high_word = ((atom_bytes >> 4) << 32) | (static_cast<uint64_t>(swizzle) << 62);
  return high_word | (base_low_word + (byte_offset >> 4));
}

// ---- ordering ----
// Orders this thread's earlier register and shared-memory accesses before the
// following wgmma (needed whenever normal code wrote an accumulator or an A
// fragment the wgmma reads).
__device__ __forceinline__ void fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}
// Keeps the compiler from moving accesses of accumulator registers across
// fence / wait (the asm statements only see the registers at issue time).
template <int N>
__device__ __forceinline__ void fence_registers(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
// Makes this thread's generic-proxy shared-memory writes (st.shared, cp.async)
// visible to the async proxy that wgmma reads shared memory through. Each
// writer fences, then a barrier, then the wgmma.
__device__ __forceinline__ void fence_proxy_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// ---- warp specialization: mbarriers, named barriers, register reallocation ----
// An mbarrier in shared memory (8 bytes, 8-byte aligned) completing a phase
// after `count` arrivals; waiters name the phase by its parity (0, 1, 0, ...).
__device__ __forceinline__ void mbarrier_init(uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
// Makes this thread's earlier mbarrier_init visible to the async proxy, for
// barriers that TMA copies (tma_load_2d) complete.
__device__ __forceinline__ void fence_mbarrier_init() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
// Release: this thread's earlier shared-memory accesses happen before the
// phase completes for the waiters.
__device__ __forceinline__ void mbarrier_arrive(uint32_t bar) {
  asm volatile(
      "{\n .reg .b64 state;\n mbarrier.arrive.release.cta.shared::cta.b64 state, [%0];\n}\n" ::"r"(bar)
      : "memory");
}
// Acquire: returns once the phase of parity `parity` has completed.
__device__ __forceinline__ void mbarrier_wait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n .reg .pred done;\n"
      "wait_%=:\n"
      " mbarrier.try_wait.parity.acquire.cta.shared::cta.b64 done, [%0], %1;\n"
      " @!done bra wait_%=;\n}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}
// Barrier `id` (1..15; 0 is __syncthreads) over `threads` threads (a multiple of 32).
__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
// The registers per thread of a CTA launched with __launch_bounds__(threads,
// 1): 65536 / threads rounded down to a multiple of 8. setmaxnreg moves
// registers within the CTA's pool (threads x this), not the 64 K file: an
// increase beyond what the decreases freed waits forever.
constexpr int launch_registers_per_thread(int threads) { return 65536 / threads / 8 * 8; }
// Per-thread register budget of the calling warpgroup from here on (a
// multiple of 8 in [24, 256]; all warps of the warpgroup execute it).
template <int kRegisters>
__device__ __forceinline__ void set_max_registers_decrease() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
}
template <int kRegisters>
__device__ __forceinline__ void set_max_registers_increase() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
}

// ---- instructions (D: the m64nN fp32 accumulator fragment of the calling thread) ----
// Accumulator fragment of m64nN f32: warp w of the warpgroup owns rows 16 w + lane / 4
// (registers 4 j + {0, 1}) and 16 w + lane / 4 + 8 (registers 4 j + {2, 3}), at
// columns 8 j + 2 (lane % 4) + {0, 1}.
namespace detail {
template <class Atom, int N, size_t... I>
__device__ __forceinline__ void ss(float (&d)[N], uint64_t desc_a, uint64_t desc_b, gmma::ScaleOut scale_d,
                                   std::index_sequence<I...>) {
  Atom::fma(desc_a, desc_b, d[I]..., scale_d);
}
template <class Atom, int N, size_t... I>
__device__ __forceinline__ void rs(float (&d)[N], const uint32_t (&a)[4], uint64_t desc_b, gmma::ScaleOut scale_d,
                                   std::index_sequence<I...>) {
  Atom::fma(a[0], a[1], a[2], a[3], desc_b, d[I]..., scale_d);
}
__device__ __forceinline__ gmma::ScaleOut scale_out(bool accumulate) {
  return accumulate ? gmma::ScaleOut::One : gmma::ScaleOut::Zero;
}
}  // namespace detail

// D[64 x 64] (+)= A[64 x 32 e4m3] . B[64 x 32 e4m3]^T, both K-major in shared memory.
__device__ __forceinline__ void mma_64x64x32_e4m3_ss(float (&d)[32], uint64_t desc_a, uint64_t desc_b,
                                                     bool accumulate) {
  detail::ss<cute::SM90::GMMA::MMA_64x64x32_F32E4M3E4M3_SS_TN<>>(d, desc_a, desc_b, detail::scale_out(accumulate),
                                                                 std::make_index_sequence<32>{});
}
// D[64 x 64] (+)= A[64 x 16 bf16] . B[64 x 16 bf16]^T, both K-major in shared memory.
__device__ __forceinline__ void mma_64x64x16_bf16_ss(float (&d)[32], uint64_t desc_a, uint64_t desc_b,
                                                     bool accumulate) {
  detail::ss<cute::SM90::GMMA::MMA_64x64x16_F32BF16BF16_SS<gmma::Major::K, gmma::Major::K>>(
      d, desc_a, desc_b, detail::scale_out(accumulate), std::make_index_sequence<32>{});
}
// ---- additions for the bf16 decode kernel (decode_bf16_wgmma_kernel.cuh) ----

// A full descriptor from its fields (PTX ISA "Matrix Descriptor Format"):
// start address >> 4 in bits 0-13, leading byte offset >> 4 in 16-29, stride
// byte offset >> 4 in 32-45, base offset 0 (1024-byte aligned swizzle atoms),
// swizzle mode in 62-63.
__host__ __device__ constexpr uint64_t make_desc(uint32_t start, uint32_t leading_bytes, uint32_t stride_bytes,
                                                 Swizzle swizzle) {
  return static_cast<uint64_t>((start >> 4) & 0x3fff) | (static_cast<uint64_t>((leading_bytes >> 4) & 0x3fff) << 16) |
         (static_cast<uint64_t>((stride_bytes >> 4) & 0x3fff) << 32) | (static_cast<uint64_t>(swizzle) << 62);
}
// The descriptor of the same layout starting `bytes` later (a k step, or the
// next tile): only the start field changes, and since every shared address is
// below 2^18 the add never carries out of bits 0-13.
__device__ __forceinline__ uint64_t desc_advance(uint64_t desc, uint32_t bytes) { return desc + (bytes >> 4); }

// MN-major SW128 operand (a B whose N index runs along the contiguous bytes,
// e.g. V = the rows of a K-major [tokens x dims] bf16 tile read as
// [dims x tokens]). CuTe's canonical form (make_gmma_desc<Major::MN>, in
// 16-byte units): ((8, n), (8, k)) : ((1, LBO), (8, SBO)), i.e. an atom is 8
// K-rows of 128 B (64 bf16 of N), 1024 B, swizzled like the K-major SW128 atom
// (16-byte chunk c of K-row r at chunk c ^ (r % 8)); LBO is the byte distance
// between atoms along N (the next 64 dims), SBO the one between atoms along K
// (the next 8 K-rows). One k16 step of bf16 = 2 atoms along K.
__host__ __device__ constexpr uint64_t mn_major_sw128_desc(uint32_t start, uint32_t n_atom_stride_bytes,
                                                           uint32_t k_atom_stride_bytes) {
  return make_desc(start, n_atom_stride_bytes, k_atom_stride_bytes, Swizzle::k128B);
}
// Arrives on barrier `id` without waiting (a producer side of a named-barrier
// handoff; the consumer side calls named_barrier_sync with the same count).
__device__ __forceinline__ void named_barrier_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// D[64 x 256] += A[64 x 16 bf16] . B[16 x 256 bf16] with B MN-major in shared
// memory (mn_major_sw128_desc; imm-trans-b = 1). RS: A from registers in the
// m64nNk16 A fragment: thread (warp w, lane l) holds row 16 w + l / 4 in a[0]
// (k 2 (l % 4) + {0, 1}) and a[2] (k 8 + 2 (l % 4) + {0, 1}), and row
// 16 w + l / 4 + 8 in a[1], a[3] (same k), low half = lower k. That is the
// m64nN f32 accumulator fragment's element order: accumulator registers
// 8 s + [0, 8) (columns 16 s + ...) packed in pairs are the A fragment of k step s.
__device__ __forceinline__ void mma_64x256x16_bf16_rs_mn(float (&d)[128], const uint32_t (&a)[4], uint64_t desc_b,
                                                         bool accumulate) {
  detail::rs<cute::SM90::GMMA::MMA_64x256x16_F32BF16BF16_RS<gmma::Major::K, gmma::Major::MN>>(
      d, a, desc_b, detail::scale_out(accumulate), std::make_index_sequence<128>{});
}
// The same with A K-major in shared memory (SS).
__device__ __forceinline__ void mma_64x256x16_bf16_ss_mn(float (&d)[128], uint64_t desc_a, uint64_t desc_b,
                                                         bool accumulate) {
  detail::ss<cute::SM90::GMMA::MMA_64x256x16_F32BF16BF16_SS<gmma::Major::K, gmma::Major::MN>>(
      d, desc_a, desc_b, detail::scale_out(accumulate), std::make_index_sequence<128>{});
}

// ---- tensor memory access (TMA) for the bf16 decode kernel ----
// Arrives on the mbarrier at `bar` (release, like mbarrier_arrive) and adds
// `bytes` to the transaction count its current phase waits for: the phase
// completes once every arrival came and that many bytes of asynchronous
// copies (tma_load_2d on `bar`) have landed.
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.release.cta.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
               : "memory");
}
// Copies the box at element coordinates (x: innermost, y) of the 2D tensor
// map `tensor_map` (a __grid_constant__ kernel parameter: its generic
// address) to shared memory at `dst` (laid out, and swizzled, as the map
// says), completing `bytes` on the mbarrier `bar`. The copy writes through
// the async proxy, so a waiter of `bar` may hand the tile to wgmma without a
// proxy fence.
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const CUtensorMap* tensor_map, int x, int y, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(
          dst),
      "l"(reinterpret_cast<uint64_t>(tensor_map)), "r"(x), "r"(y), "r"(bar)
      : "memory");
}
// Brings the tensor map into the TMA unit's descriptor cache ahead of its first use.
__device__ __forceinline__ void prefetch_tensor_map(const CUtensorMap* tensor_map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(tensor_map)) : "memory");
}

}  // namespace snapmla::cuda::sm90::wgmma
