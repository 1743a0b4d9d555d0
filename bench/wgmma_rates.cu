// Issue-rate ceilings of the wgmma shapes the decode kernels use (and larger
// ones they could use), measured on the GPU: one CTA per SM, 1 or 2
// warpgroups each issuing a long chain of one wgmma shape from swizzled
// shared-memory tiles holding random values (zeros would draw less power and
// flatter the clock). Prints cycles per instruction per warpgroup and the
// whole GPU's TFLOP/s, to compare with the dense GEMM ceilings of
// ../shared/anchors (bf16 ~757, fp8 ~1437 TFLOP/s).
//
//   snapmla_wgmma_rates [iterations]
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "cuda/check.h"
#include "cuda/sm90/mma.cuh"
#include "cuda/sm90/wgmma.cuh"

namespace {

using namespace snapmla::cuda::sm90;
namespace gmma = cute::SM90::GMMA;

constexpr int kTileRows = 256;  // B tile rows (the largest N); A uses the first 64
constexpr int kTileBytes = kTileRows * 128;
constexpr int kStepsPerRow = 4;  // k steps of 32 bytes in a 128-byte SW128 row

template <class Atom, int N, bool kRs, bool kBf16>
__global__ void __launch_bounds__(256, 1) rate_kernel(int iterations, int warp_groups, long long* cycles, float* sink) {
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  // The swizzled tiles start 1024-byte aligned, as in the decode kernels.
  const uint32_t raw = smem_address(smem_raw);
  const uint32_t base = (raw + 1023u) & ~1023u;
  uint8_t* smem = smem_raw + (base - raw);
  // Random values in [-1, 1): no NaN or Inf bit patterns, no zeros.
  for (int i = threadIdx.x; i < 2 * kTileBytes / 2; i += blockDim.x) {
    uint32_t h = (i + 1) * 2654435761u ^ (blockIdx.x * 40503u);
    h ^= h >> 13;
    h *= 0x5bd1e995u;
    const float v = static_cast<float>(h >> 8) * (2.0f / 16777216.0f) - 1.0f;
    if constexpr (kBf16) {
      reinterpret_cast<__nv_bfloat16*>(smem)[i] = __float2bfloat16(v);
    } else {
      const __nv_fp8x2_e4m3 pair(make_float2(v, -0.5f * v));
      reinterpret_cast<__nv_fp8x2_e4m3*>(smem)[i] = pair;
    }
  }
  wgmma::fence_proxy_async_shared();
  __syncthreads();
  const int group = threadIdx.x / 128;
  if (group >= warp_groups) return;
  const uint32_t a_desc = wgmma::desc_low_word(base);
  const uint32_t b_desc = wgmma::desc_low_word(base + kTileBytes);
  uint32_t a_regs[4];
  for (int i = 0; i < 4; ++i) a_regs[i] = reinterpret_cast<const uint32_t*>(smem)[threadIdx.x * 4 + i] & 0xbfbfbfbfu;
  float d[N / 2];
  for (int i = 0; i < N / 2; ++i) d[i] = 0.0f;
  wgmma::fence_registers(d);
  wgmma::fence();
  const long long t0 = clock64();
  for (int it = 0; it < iterations; ++it) {
    wgmma::fence();
#pragma unroll
    for (int k = 0; k < kStepsPerRow; ++k) {
      const uint64_t b = wgmma::desc_at(b_desc, 32 * k, wgmma::Swizzle::k128B);
      if constexpr (kRs)
        wgmma::detail::rs<Atom>(d, a_regs, b, gmma::ScaleOut::One, std::make_index_sequence<N / 2>{});
      else
        wgmma::detail::ss<Atom>(d, wgmma::desc_at(a_desc, 32 * k, wgmma::Swizzle::k128B), b, gmma::ScaleOut::One,
                                std::make_index_sequence<N / 2>{});
    }
    wgmma::commit();
    wgmma::wait<1>();
  }
  wgmma::wait<0>();
  wgmma::fence_registers(d);
  const long long t1 = clock64();
  float total = 0.0f;
  for (int i = 0; i < N / 2; ++i) total += d[i];
  if (threadIdx.x % 128 == 0) cycles[blockIdx.x * 2 + group] = t1 - t0;
  if (total == 12345.678f) sink[0] = total;  // keeps the chain alive
}

struct Shape {
  const char* name;
  int n;
  int k;  // elements per instruction
  bool rs;
  void (*kernel)(int, int, long long*, float*);
};

template <class Atom, int N, bool kRs, bool kBf16, int K>
Shape shape(const char* name) {
  return Shape{name, N, K, kRs, rate_kernel<Atom, N, kRs, kBf16>};
}

}  // namespace

int main(int argc, char** argv) {
  const int iterations = argc > 1 ? std::atoi(argv[1]) : 4096;
  try {
    int device = 0, sms = 0, clock_khz = 0;
    SNAPMLA_CUDA_CHECK(cudaGetDevice(&device));
    SNAPMLA_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    SNAPMLA_CUDA_CHECK(cudaDeviceGetAttribute(&clock_khz, cudaDevAttrClockRate, device));
    cudaDeviceProp prop{};
    SNAPMLA_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
    std::printf("%s, %d SMs, max clock %.0f MHz, %d iterations of 4 instructions per warpgroup\n", prop.name, sms,
                clock_khz / 1e3, iterations);
    using namespace cute::SM90::GMMA;
    const std::vector<Shape> shapes = {
        shape<MMA_64x64x32_F32E4M3E4M3_SS_TN<>, 64, false, false, 32>("e4m3 SS m64n64k32"),
        shape<MMA_64x128x32_F32E4M3E4M3_SS_TN<>, 128, false, false, 32>("e4m3 SS m64n128k32"),
        shape<MMA_64x256x32_F32E4M3E4M3_SS_TN<>, 256, false, false, 32>("e4m3 SS m64n256k32"),
        shape<MMA_64x64x32_F32E4M3E4M3_RS_TN<>, 64, true, false, 32>("e4m3 RS m64n64k32"),
        shape<MMA_64x128x32_F32E4M3E4M3_RS_TN<>, 128, true, false, 32>("e4m3 RS m64n128k32"),
        shape<MMA_64x64x16_F32BF16BF16_SS<Major::K, Major::K>, 64, false, true, 16>("bf16 SS m64n64k16"),
        shape<MMA_64x256x16_F32BF16BF16_SS<Major::K, Major::K>, 256, false, true, 16>("bf16 SS m64n256k16"),
    };
    long long* cycles = nullptr;
    float* sink = nullptr;
    SNAPMLA_CUDA_CHECK(cudaMalloc(&cycles, sizeof(long long) * 2 * sms));
    SNAPMLA_CUDA_CHECK(cudaMalloc(&sink, sizeof(float)));
    const int smem_bytes = 2 * kTileBytes + 1024;
    cudaEvent_t start, stop;
    SNAPMLA_CUDA_CHECK(cudaEventCreate(&start));
    SNAPMLA_CUDA_CHECK(cudaEventCreate(&stop));
    std::printf("%-22s %3s %14s %12s %9s\n", "shape", "WGs", "cycles/instr", "TFLOP/s", "median us");
    for (const Shape& s : shapes) {
      SNAPMLA_CUDA_CHECK(cudaFuncSetAttribute(s.kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes));
      for (int groups = 1; groups <= 2; ++groups) {
        std::vector<float> times;
        std::vector<long long> host(2 * sms);
        for (int rep = 0; rep < 7; ++rep) {
          SNAPMLA_CUDA_CHECK(cudaEventRecord(start));
          s.kernel<<<sms, 256, smem_bytes>>>(iterations, groups, cycles, sink);
          SNAPMLA_CUDA_CHECK_LAUNCH();
          SNAPMLA_CUDA_CHECK(cudaEventRecord(stop));
          SNAPMLA_CUDA_CHECK(cudaEventSynchronize(stop));
          float ms = 0.0f;
          SNAPMLA_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
          if (rep > 0) times.push_back(ms);  // the first launch warms up
        }
        std::sort(times.begin(), times.end());
        const double ms = times[times.size() / 2];
        SNAPMLA_CUDA_CHECK(cudaMemcpy(host.data(), cycles, sizeof(long long) * 2 * sms, cudaMemcpyDeviceToHost));
        double cyc = 0.0;
        for (int b = 0; b < sms; ++b)
          for (int g = 0; g < groups; ++g) cyc += static_cast<double>(host[2 * b + g]);
        cyc /= static_cast<double>(sms) * groups * iterations * kStepsPerRow;
        const double flops = 2.0 * 64 * s.n * s.k * kStepsPerRow * static_cast<double>(iterations) * groups * sms;
        std::printf("%-22s %3d %14.1f %12.0f %9.1f\n", s.name, groups, cyc, flops / (ms * 1e-3) / 1e12, ms * 1e3);
      }
    }
    SNAPMLA_CUDA_CHECK(cudaFree(cycles));
    SNAPMLA_CUDA_CHECK(cudaFree(sink));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "snapmla_wgmma_rates: %s\n", e.what());
    return 1;
  }
  return 0;
}
