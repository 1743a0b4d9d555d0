// Host side of the sm90 MLA decode: the split-KV schedule on the device, the
// optional index check, and the launches of the decode and combine kernels.
// Arguments arrive validated by src/core/api.cpp (shapes, dtypes, devices,
// contiguity, workspace size).
#include <cuda_runtime.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "core/schedule.h"
#include "core/validate.h"
#include "cuda/backend.h"
#include "cuda/check.h"
#include "cuda/sm90/decode_launch.cuh"
#include "cuda/sm90/decode_params.cuh"
#include "cuda/sm90/token_quant.cuh"
#include "snapmla/error.h"

namespace snapmla::cuda {
namespace {

__device__ unsigned int g_decode_status;

// The schedule is a short sequential scan over the batch; one thread runs the
// same code as the host (src/core/schedule.h), so both agree exactly.
__global__ void decode_schedule_kernel(const int32_t* cache_seqlens, int batch, int num_parts, int32_t* metadata,
                                       int32_t* num_splits) {
  if (blockIdx.x == 0 && threadIdx.x == 0)
    compute_decode_schedule(cache_seqlens, batch, num_parts, metadata, num_splits);
}

cudaStream_t as_stream(StreamHandle stream) { return static_cast<cudaStream_t>(stream); }

void require_aligned(const void* p, size_t alignment, const char* name) {
  if (reinterpret_cast<uintptr_t>(p) % alignment != 0)
    throw Error(name, "must be " + std::to_string(alignment) + "-byte aligned for the CUDA kernels");
}

// Copies the indices to the host (a synchronisation) and checks that every
// page a sequence uses is inside the pool, with the same messages as the CPU path.
void check_indices_on_host(const DecodeParams& params, int64_t num_pages, cudaStream_t stream) {
  const int64_t batch = params.block_table.shape[0], max_pages = params.block_table.shape[1];
  std::vector<int32_t> seqlens(batch), table(batch * max_pages);
  SNAPMLA_CUDA_CHECK(cudaMemcpyAsync(seqlens.data(), params.cache_seqlens.data, batch * sizeof(int32_t),
                                     cudaMemcpyDeviceToHost, stream));
  SNAPMLA_CUDA_CHECK(cudaMemcpyAsync(table.data(), params.block_table.data, table.size() * sizeof(int32_t),
                                     cudaMemcpyDeviceToHost, stream));
  SNAPMLA_CUDA_CHECK(cudaStreamSynchronize(stream));
  check::paged_indices(seqlens.data(), table.data(), batch, max_pages, num_pages);
}

}  // namespace

namespace sm90 {
int decode_row_groups(int rows) { return rows <= 16 ? 1 : rows <= 32 ? 2 : 4; }

namespace {
// -1: none; otherwise a DecodeKernelChoice.
std::atomic<int> g_kernel_override{-1};

DecodeKernelChoice decode_kernel_from_environment() {
  const char* value = std::getenv("SNAPMLA_DECODE_KERNEL");
  if (value == nullptr || *value == '\0') return kDefaultDecodeKernel;
  const std::string name(value);
  if (name == "mma") return DecodeKernelChoice::kMma;
  if (name == "wgmma") return DecodeKernelChoice::kWgmma;
  throw Error("SNAPMLA_DECODE_KERNEL", "is '" + name + "'; expected 'mma' or 'wgmma'");
}
}  // namespace

DecodeKernelChoice decode_kernel_choice() {
  const int forced = g_kernel_override.load(std::memory_order_relaxed);
  if (forced >= 0) return static_cast<DecodeKernelChoice>(forced);
  static const DecodeKernelChoice from_environment = decode_kernel_from_environment();
  return from_environment;
}

void set_decode_kernel_override(std::optional<DecodeKernelChoice> kernel) {
  g_kernel_override.store(kernel ? static_cast<int>(*kernel) : -1, std::memory_order_relaxed);
}

const char* decode_kernel_name(DecodeKernelChoice kernel) {
  return kernel == DecodeKernelChoice::kMma ? "mma" : "wgmma";
}
}  // namespace sm90

void get_mla_metadata(const TensorView& cache_seqlens, int q_rows, const DecodeSchedule& schedule,
                      StreamHandle stream) {
  (void)q_rows;  // the part count (tile_scheduler_metadata's first dim) already reflects it
  token_quant::ScopedCudaDevice device(cache_seqlens.device.index);
  const int batch = static_cast<int>(cache_seqlens.shape[0]);
  const int num_parts = static_cast<int>(schedule.tile_scheduler_metadata.shape[0]);
  decode_schedule_kernel<<<1, 1, 0, as_stream(stream)>>>(
      cache_seqlens.ptr<const int32_t>(), batch, num_parts, schedule.tile_scheduler_metadata.ptr<int32_t>(),
      schedule.num_splits.ptr<int32_t>());
  SNAPMLA_CUDA_CHECK_LAUNCH();
}

void mla_decode(const DecodeParams& params, StreamHandle stream_handle) {
  const KvCacheView& cache = params.cache;
  const bool fp8 = cache.format == KvFormat::kFP8;
  const cudaStream_t stream = as_stream(stream_handle);
  token_quant::ScopedCudaDevice device(params.out.device.index);

  const int batch = static_cast<int>(params.out.shape[0]);
  const int s_q = static_cast<int>(params.out.shape[1]);
  const int h_q = static_cast<int>(params.out.shape[2]);
  const int num_parts = static_cast<int>(params.schedule.tile_scheduler_metadata.shape[0]);
  const int64_t num_pages = cache.num_pages();

  if (params.check_indices) check_indices_on_host(params, num_pages, stream);

  sm90::DecodeKernelParams k;
  const bool prequantized = params.q_nope.defined();
  if (fp8 && prequantized) {
    require_aligned(params.q_nope.data, 16, "q_nope");
    require_aligned(params.q_rope.data, 16, "q_rope");
    k.q_nope = params.q_nope.ptr<const uint8_t>();
    k.q_scale = params.q_scale.ptr<const float>();
    k.q_rope = params.q_rope.ptr<const uint16_t>();
  } else {
    // api.cpp guarantees q is given when no pre-quantized query is.
    require_aligned(params.q.data, 16, "q");
    k.q = params.q.ptr<const uint16_t>();
  }
  if (fp8) {
    require_aligned(cache.nope.data, 16, "cache.nope");
    require_aligned(cache.scale.data, 16, "cache.scale");
    require_aligned(cache.rope.data, 16, "cache.rope");
    k.kv_nope = cache.nope.ptr<const uint8_t>();
    k.kv_scale = cache.scale.ptr<const float>();
    k.kv_rope = cache.rope.ptr<const uint16_t>();
  } else {
    require_aligned(cache.data.data, 16, "cache.data");
    k.kv_bf16 = cache.data.ptr<const uint16_t>();
  }
  k.num_pages = num_pages;
  k.block_table = params.block_table.ptr<const int32_t>();
  k.max_pages = static_cast<int>(params.block_table.shape[1]);
  k.cache_seqlens = params.cache_seqlens.ptr<const int32_t>();
  k.batch = batch;
  k.s_q = s_q;
  k.h_q = h_q;
  k.rows = s_q * h_q;
  k.causal = params.causal;
  k.scale_log2 = static_cast<float>(static_cast<double>(params.softmax_scale) * 1.4426950408889634);
  k.tile_scheduler_metadata = params.schedule.tile_scheduler_metadata.ptr<const int32_t>();
  k.num_splits = params.schedule.num_splits.ptr<const int32_t>();
  k.num_parts = num_parts;
  require_aligned(params.out.data, 8, "out");
  k.out = params.out.ptr<uint16_t>();
  k.lse = params.lse.ptr<float>();
  require_aligned(params.workspace.data, 16, "workspace");
  k.partial_out = params.workspace.ptr<float>();
  k.partial_lse2 = k.partial_out + static_cast<int64_t>(batch + num_parts) * k.rows * kHeadDimV;
  void* status = nullptr;
  SNAPMLA_CUDA_CHECK(cudaGetSymbolAddress(&status, g_decode_status));
  k.status = static_cast<unsigned int*>(status);

  const int row_groups = sm90::decode_row_groups(k.rows);
  const bool wgmma = sm90::decode_kernel_choice() == sm90::DecodeKernelChoice::kWgmma;
  if (fp8) {
    if (wgmma) {
      sm90::launch_decode_fp8_wgmma(k, stream);
    } else {
      sm90::launch_decode_fp8(k, row_groups, stream);
    }
  } else {
    if (wgmma) {
      sm90::launch_decode_bf16_wgmma(k, stream);
    } else {
      sm90::launch_decode_bf16(k, row_groups, stream);
    }
  }
  // With one part every sequence is a single piece, written directly.
  if (num_parts > 1) sm90::launch_decode_combine(k, stream);
}

unsigned int read_and_clear_decode_status(int device_index) {
  token_quant::ScopedCudaDevice device(device_index);
  SNAPMLA_CUDA_CHECK(cudaDeviceSynchronize());
  unsigned int value = 0;
  SNAPMLA_CUDA_CHECK(cudaMemcpyFromSymbol(&value, g_decode_status, sizeof value));
  const unsigned int zero = 0;
  SNAPMLA_CUDA_CHECK(cudaMemcpyToSymbol(g_decode_status, &zero, sizeof zero));
  return value;
}

}  // namespace snapmla::cuda
