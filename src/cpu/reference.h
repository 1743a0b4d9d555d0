// The test oracle: MLA decode in float64. One implementation, used by the
// CPU backend, the GPU tests, the CLI's error reports and the accuracy study.
#pragma once

#include <cstdint>
#include <vector>

#include "snapmla/kv_format.h"
#include "snapmla/tensor.h"

namespace snapmla::reference {

// Optional emulation of the fp8 kernel's extra roundings, so each quantization
// step's contribution to the error can be measured on its own.
struct Fp8Emulation {
  bool quantize_query = false;  // q_nope -> e4m3 with a per-row scale, q_pe / scale -> bf16
  bool quantize_p = false;      // P * s_v -> e4m3 per (row, 64-token page) as the kernel does
};

struct DecodeResult {
  std::vector<double> out;  // [b, s_q, h_q, 512]
  std::vector<double> lse;  // [b, h_q, s_q], natural log; -inf for a row that sees no token
};

// Decode over a paged cache on the CPU (either format; fp8 is dequantized to
// double per token). q: [b, s_q, h_q, 576] bf16/f32/f64 on the CPU;
// block_table [b, max_pages] int32; cache_seqlens [b] int32.
DecodeResult decode_paged(const TensorView& q, const KvCacheView& cache, const TensorView& block_table,
                          const TensorView& cache_seqlens, double softmax_scale, bool causal,
                          Fp8Emulation emulation = {});

// Decode over unpaged, unquantized keys: keys[b] is [s_k(b), 576] row-major
// (c_kv then k_pe). q as above but plain doubles. The "what a user sees" oracle.
DecodeResult decode_dense(const std::vector<double>& q, int batch, int s_q, int h_q,
                          const std::vector<std::vector<double>>& keys, double softmax_scale, bool causal);

// Number of keys query i (of s_q) may attend to in a sequence of s_k tokens.
inline int64_t visible_keys(int64_t s_k, int s_q, int i, bool causal) {
  if (!causal) return s_k;
  const int64_t v = s_k - s_q + i + 1;
  return v < 0 ? 0 : (v > s_k ? s_k : v);
}

struct ErrorStats {
  double rel_l2 = 0;       // ||a - b|| / ||b||
  double cosine = 0;       // <a, b> / (||a|| ||b||)
  double max_abs = 0;
  int64_t nonfinite = 0;   // entries of a that are NaN or inf
};
// Compares `got` with `ref` entry by entry (same length).
ErrorStats compare(const std::vector<double>& got, const std::vector<double>& ref);
// For lse vectors: max |got - ref| over entries where ref is finite, and a
// count of entries whose finiteness differs (reported in nonfinite).
ErrorStats compare_lse(const std::vector<double>& got, const std::vector<double>& ref);

}  // namespace snapmla::reference
