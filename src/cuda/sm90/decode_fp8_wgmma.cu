// Launch of the sm_90a wgmma fp8 decode kernel (decode_wgmma_kernel.cuh).
#include <cstdio>

#include "cuda/check.h"
#include "cuda/sm90/decode_launch.cuh"
#include "cuda/sm90/decode_wgmma_kernel.cuh"
#include "cuda/sm90/tensor_maps.h"

namespace snapmla::cuda::sm90 {

#ifdef SNAPMLA_DECODE_TRACE
namespace {
// The phase trace of decode_wgmma_kernel.cuh, cycles from the producer's
// first page: the owner's softmax split, then every role's events per page.
void print_decode_trace() {
  using wgmma_decode::kTracePages;
  long long t[3][kTracePages][12];
  SNAPMLA_CUDA_CHECK(cudaDeviceSynchronize());
  SNAPMLA_CUDA_CHECK(cudaMemcpyFromSymbol(t, wgmma_decode::g_decode_trace, sizeof(t)));
  const long long t0 = t[2][0][0];
  std::printf("softmax of page n, from QK done: scaled, max, exp + P scale, P^ stored, published\n");
  for (int n = 0; n < kTracePages; ++n) {
    const long long* e = t[n & 1][n];
    std::printf("S %3d | %6lld %6lld %6lld %6lld %6lld\n", n, e[8] - e[2], e[9] - e[2], e[10] - e[2], e[11] - e[2],
                e[3] - e[2]);
  }
  std::printf("n | owner: entry, stage full, QK, P | WG0 PV: entry, P full, V^T full, done | WG1 PV: same | "
              "producer: top, stage full, V^T empty, V^T built, stage empty, copies issued\n");
  for (int n = 0; n < kTracePages; ++n) {
    const long long* o = t[n & 1][n];
    const long long* a = t[0][n];
    const long long* b = t[1][n];
    const long long* q = t[2][n];
    std::printf("%3d | %6lld %6lld %6lld %6lld | %6lld %6lld %6lld %6lld | %6lld %6lld %6lld %6lld | %6lld %6lld %6lld "
                "%6lld %6lld %6lld\n",
                n, o[0] - t0, o[1] - t0, o[2] - t0, o[3] - t0, a[4] - t0, a[5] - t0, a[6] - t0, a[7] - t0, b[4] - t0,
                b[5] - t0, b[6] - t0, b[7] - t0, q[0] - t0, q[1] - t0, q[2] - t0, q[3] - t0, q[4] - t0, q[5] - t0);
  }
}
}  // namespace
#endif

void launch_decode_fp8_wgmma(const DecodeKernelParams& params, cudaStream_t stream) {
  using namespace wgmma_decode;
  // A pool TMA cannot address goes the cp.async way.
  const bool tma = pool_fits_tma(params);
  launch_wgmma_decode(tma ? &mla_decode_fp8_wgmma_kernel<true> : &mla_decode_fp8_wgmma_kernel<false>, kRows, kThreads,
                      Smem::kAllocBytes, params, tma ? fp8_cache_maps(params) : Fp8CacheMaps{}, stream);
#ifdef SNAPMLA_DECODE_TRACE
  // The 4th launch: a benchmark's warm-up is over (`snapmla bench --groups 1`).
  static int launches = 0;
  if (++launches == 4) print_decode_trace();
#endif
}

}  // namespace snapmla::cuda::sm90
