// The paged latent KV-cache formats. This header is the single definition of
// their byte layout; docs/kv-format.md explains it and tests/core pins it.
#pragma once

#include <cstddef>
#include <cstdint>

#include "snapmla/tensor.h"

namespace snapmla {

inline constexpr int kPageSize = 64;    // tokens per page (FlashMLA's block size)
inline constexpr int kNopeDim = 512;    // c_kv: used as K and as V
inline constexpr int kRopeDim = 64;     // k_pe: decoupled RoPE key
inline constexpr int kHeadDim = kNopeDim + kRopeDim;  // 576, q and k width
inline constexpr int kHeadDimV = kNopeDim;            // 512, output width
inline constexpr float kE4M3Max = 448.0f;

enum class KvFormat : uint8_t {
  // [num_pages, 64, 1, 576] bf16: FlashMLA's dense layout, read as it is.
  kBF16,
  // SnapMLA RoPE-aware per-token format, planar (SGLang-FluentLLM's tensors):
  //   nope  [num_pages, 64, 1, 512] float8 e4m3  = round(c_kv / scale)
  //   scale [num_pages, 64, 1, 1]   fp32         = amax(|c_kv|) / 448 (1 if amax == 0)
  //   rope  [num_pages, 64, 1, 64]  bf16         = bf16(k_pe / scale)
  // Dequantization multiplies both nope and rope by scale.
  kFP8,
};

const char* kv_format_name(KvFormat format);
bool parse_kv_format(const char* name, KvFormat* format);  // "bf16" | "fp8"

// Bytes of cache per token, padding included (fp8: 512 + 4 + 128 = 644).
constexpr size_t kv_bytes_per_token(KvFormat format) {
  return format == KvFormat::kBF16 ? size_t{kHeadDim} * 2
                                   : size_t{kNopeDim} + sizeof(float) + size_t{kRopeDim} * 2;
}
constexpr size_t kv_bytes_per_page(KvFormat format) { return kv_bytes_per_token(format) * kPageSize; }

// One paged cache (one layer). Only the tensors of `format` are used:
// kBF16 -> data; kFP8 -> nope, scale, rope. Slot s lives at page s / 64, row s % 64.
struct KvCacheView {
  KvFormat format = KvFormat::kBF16;
  TensorView data;   // kBF16: [num_pages, 64, 1, 576] bf16
  TensorView nope;   // kFP8:  [num_pages, 64, 1, 512] e4m3
  TensorView scale;  // kFP8:  [num_pages, 64, 1, 1]   fp32
  TensorView rope;   // kFP8:  [num_pages, 64, 1, 64]  bf16

  int64_t num_pages() const;
  Device device() const;

  // Contiguous views of caller-owned memory laid out as this header describes.
  static KvCacheView bf16(void* data, int64_t num_pages, Device device);
  static KvCacheView fp8(void* nope, void* scale, void* rope, int64_t num_pages, Device device);
};

}  // namespace snapmla
