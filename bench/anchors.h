// FlashMLA measured on the lent H100 (NVIDIA H100 80GB HBM3), 2026-11-22, as
// published in the project's shared anchors (shared/anchors/flashmla-h100.json):
// deepseek-ai/FlashMLA commit 9241ae3, CUDA 13.0, sm_90a, CUDA events around the
// whole flash_mla_with_kvcache call, median of 5 x 20 calls, randn/10 inputs.
#pragma once

namespace snapmla::bench {

struct AnchorRow {
  int batch, s_q, h_q, s_k;
  double flashmla_bf16_us;
  double flashmla_fp8_sparse_us;  // 0 where FlashMLA has no such kernel (h_q 16)
};

inline constexpr AnchorRow kFlashMlaH100[] = {
    {128, 1, 16, 4096, 210.808, 0},        {128, 1, 16, 16384, 821.571, 0},
    {64, 1, 64, 8192, 247.899, 228.280},   {128, 1, 64, 16384, 881.669, 849.299},
    {64, 1, 128, 4096, 146.136, 170.523},  {128, 1, 128, 8192, 520.605, 701.837},
    {32, 1, 128, 32768, 493.221, 698.822}, {64, 2, 64, 8192, 242.446, 415.803},
    {64, 2, 128, 8192, 427.880, 696.003},
};

// Ceilings measured in the same anchor run.
inline constexpr double kH100CopyTBps = 3.013;
inline constexpr double kH100Bf16GemmTFlops = 756.5;
inline constexpr double kH100Fp8GemmTFlops = 1436.6;

}  // namespace snapmla::bench
