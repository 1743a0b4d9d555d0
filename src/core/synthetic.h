// Synthetic MLA decode workloads with the statistics of real caches. One
// generator for tests, the CLI demo, the benchmark and the accuracy study.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace snapmla::synthetic {

enum class Distribution {
  kGaussian,        // randn/10 clamped to [-1, 1]: FlashMLA's test data
  kRopeOutliers,    // a few k_pe channel pairs (low-frequency RoPE) ~100x larger
  kHeavyTailNorms,  // per-token norms drawn log-normal / Student-t (wide token-to-token range)
  kAttentionSinks,  // first tokens aligned with the queries: they draw most of the mass
  kLargeQueryRope,  // q_pe much larger than q_nope
};
const char* distribution_name(Distribution d);
bool parse_distribution(const std::string& name, Distribution* d);
std::vector<Distribution> all_distributions();

struct WorkloadSpec {
  int batch = 1;
  int s_q = 1;
  int h_q = 16;
  std::vector<int32_t> seqlens;  // size batch; 0 allowed
  Distribution distribution = Distribution::kGaussian;
  uint64_t seed = 1;
  int extra_pages = 0;  // unused pages in the pool besides those the sequences need
};

// Host-side inputs; every value is already representable in bf16 (the
// kernels' input type), so "unquantized" means exactly these floats.
struct Workload {
  WorkloadSpec spec;
  std::vector<float> q;                 // [batch, s_q, h_q, 576]
  std::vector<float> c_kv;              // [total_tokens, 512], sequences concatenated
  std::vector<float> k_pe;              // [total_tokens, 64]
  std::vector<int64_t> token_offset;    // [batch + 1] row offsets into c_kv / k_pe
  int64_t num_pages = 0;                // pool size
  int max_pages = 0;                    // block_table row length (>= 1)
  std::vector<int32_t> block_table;     // [batch, max_pages], pages randomly permuted; unused = 0
  std::vector<int32_t> slot_mapping;    // [total_tokens] slot of each row
};

Workload make_workload(const WorkloadSpec& spec);

// Keys of sequence b as doubles, [s_k, 576] (c_kv then k_pe) for reference::decode_dense.
std::vector<double> sequence_keys(const Workload& w, int b);

}  // namespace snapmla::synthetic
