// Every bad argument raises snapmla::Error naming that argument; nothing
// crashes and a rejected write leaves the cache untouched.
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "core/schedule.h"
#include "cpu/host_cache.h"
#include "snapmla/snapmla.h"

namespace snapmla {
namespace {

using testing::HostCache;

const Device kCpu = Device::cpu();

void expect_error(const std::function<void()>& call, const std::string& argument, const std::string& detail = "") {
  try {
    call();
  } catch (const Error& e) {
    EXPECT_EQ(e.argument(), argument) << e.what();
    EXPECT_NE(std::string(e.what()).find("'" + argument + "'"), std::string::npos) << e.what();
    if (!detail.empty()) EXPECT_NE(std::string(e.what()).find(detail), std::string::npos) << e.what();
    return;
  }
  ADD_FAILURE() << "no snapmla::Error for argument '" << argument << "'";
}

// A valid write of 4 tokens into a 2-page cache; tests break one thing each.
struct WriteSetup {
  std::vector<float> c_kv = std::vector<float>(4 * 512, 0.25f);
  std::vector<float> k_pe = std::vector<float>(4 * 64, -0.5f);
  std::vector<int32_t> slots{0, 5, 64, 127};
  std::vector<int32_t> positions{0, 1, 2, 3};
  std::vector<float> cos_sin = std::vector<float>(8 * 64, 0.5f);
  HostCache fp8{KvFormat::kFP8, 2};
  HostCache bf16{KvFormat::kBF16, 2};
  TensorView c_kv_view() { return TensorView::contiguous(c_kv.data(), DType::kFloat32, kCpu, {4, 512}); }
  TensorView k_pe_view() { return TensorView::contiguous(k_pe.data(), DType::kFloat32, kCpu, {4, 64}); }
  TensorView slots_view() { return TensorView::contiguous(slots.data(), DType::kInt32, kCpu, {4}); }
  void write(const KvCacheView& cache, KvWriteOptions options = {}) {
    write_kv_cache(c_kv_view(), k_pe_view(), slots_view(), cache, options);
  }
};

TEST(Validation, WriteKvCacheArguments) {
  WriteSetup s;
  s.write(s.fp8.view());  // the baseline is valid
  s.write(s.bf16.view());

  TensorView bad = s.c_kv_view();
  bad.dtype = DType::kFloat64;
  expect_error([&] { write_kv_cache(bad, s.k_pe_view(), s.slots_view(), s.fp8.view()); }, "c_kv", "dtype");
  bad = TensorView::contiguous(s.c_kv.data(), DType::kFloat32, kCpu, {4, 511});
  expect_error([&] { write_kv_cache(bad, s.k_pe_view(), s.slots_view(), s.fp8.view()); }, "c_kv", "shape");
  bad = TensorView::contiguous(s.k_pe.data(), DType::kFloat32, kCpu, {2, 64});
  expect_error([&] { write_kv_cache(s.c_kv_view(), bad, s.slots_view(), s.fp8.view()); }, "k_pe", "shape");
  bad = TensorView::contiguous(s.c_kv.data(), DType::kFloat32, kCpu, {-1, 512});
  expect_error([&] { write_kv_cache(bad, s.k_pe_view(), s.slots_view(), s.fp8.view()); }, "c_kv", "negative");
  bad = s.k_pe_view();
  bad.stride[1] = 2;
  expect_error([&] { write_kv_cache(s.c_kv_view(), bad, s.slots_view(), s.fp8.view()); }, "k_pe", "contiguous");
  bad = s.k_pe_view();
  bad.stride[0] = 32;
  expect_error([&] { write_kv_cache(s.c_kv_view(), bad, s.slots_view(), s.fp8.view()); }, "k_pe", "overlap");
  bad = s.slots_view();
  bad.dtype = DType::kFloat32;
  expect_error([&] { write_kv_cache(s.c_kv_view(), s.k_pe_view(), bad, s.fp8.view()); }, "slot_mapping", "dtype");
  bad = s.slots_view();
  bad.device = Device::cuda(0);
  expect_error([&] { write_kv_cache(s.c_kv_view(), s.k_pe_view(), bad, s.fp8.view()); }, "slot_mapping", "cuda:0");
  bad = s.c_kv_view();
  bad.data = nullptr;
  expect_error([&] { write_kv_cache(bad, s.k_pe_view(), s.slots_view(), s.fp8.view()); }, "c_kv", "null");

  // Cache tensors.
  KvCacheView cache = s.fp8.view();
  cache.nope.shape[1] = 32;
  expect_error([&] { s.write(cache); }, "cache.nope", "shape");
  cache = s.fp8.view();
  cache.scale.dtype = DType::kBFloat16;
  expect_error([&] { s.write(cache); }, "cache.scale", "dtype");
  cache = s.fp8.view();
  cache.rope.shape[0] = 1;
  expect_error([&] { s.write(cache); }, "cache.rope", "shape");
  cache = s.fp8.view();
  cache.rope = TensorView{};
  expect_error([&] { s.write(cache); }, "cache.rope", "required");
  cache = s.fp8.view();
  cache.scale.device = Device::cuda(1);
  expect_error([&] { s.write(cache); }, "cache.scale", "cuda:1");
  cache = s.bf16.view();
  cache.data.shape[3] = 512;
  expect_error([&] { s.write(cache); }, "cache.data", "shape");
  cache = s.bf16.view();
  cache.data.stride[0] = 2 * 64 * 576;  // pages with gaps
  expect_error([&] { s.write(cache); }, "cache.data", "contiguous");

  // Slots, values and RoPE inputs; a rejected write changes nothing.
  const std::vector<uint8_t> before = s.fp8.nope;
  s.slots[2] = 128;
  expect_error([&] { s.write(s.fp8.view()); }, "slot_mapping", "token 2");
  s.slots[2] = -2;
  expect_error([&] { s.write(s.fp8.view()); }, "slot_mapping", "token 2");
  s.slots[2] = 64;
  s.c_kv[3 * 512 + 9] = std::numeric_limits<float>::quiet_NaN();
  expect_error([&] { s.write(s.fp8.view()); }, "c_kv", "token 3");
  expect_error([&] { s.write(s.bf16.view()); }, "c_kv", "token 3");
  s.c_kv[3 * 512 + 9] = 0.0f;
  s.k_pe[1 * 64 + 63] = std::numeric_limits<float>::infinity();
  expect_error([&] { s.write(s.fp8.view()); }, "k_pe", "token 1");
  s.k_pe[1 * 64 + 63] = 0.0f;
  EXPECT_EQ(s.fp8.nope, before);

  KvWriteOptions options;
  // Rotation data with no rotation style would store the keys unrotated.
  options.positions = TensorView::contiguous(s.positions.data(), DType::kInt32, kCpu, {4});
  expect_error([&] { s.write(s.fp8.view(), options); }, "rope", "positions/cos_sin");
  options.positions = TensorView{};
  options.rope = RopeStyle::kNeox;
  expect_error([&] { s.write(s.fp8.view(), options); }, "positions", "required");
  options.positions = TensorView::contiguous(s.positions.data(), DType::kInt32, kCpu, {4});
  expect_error([&] { s.write(s.fp8.view(), options); }, "cos_sin", "required");
  options.cos_sin = TensorView::contiguous(s.cos_sin.data(), DType::kFloat32, kCpu, {16, 32});
  expect_error([&] { s.write(s.fp8.view(), options); }, "cos_sin", "shape");
  options.cos_sin = TensorView::contiguous(s.cos_sin.data(), DType::kFloat32, kCpu, {8, 64});
  s.write(s.fp8.view(), options);
  s.positions[3] = 8;
  expect_error([&] { s.write(s.fp8.view(), options); }, "positions", "token 3");
  s.positions[3] = 3;
  options.positions = TensorView::contiguous(s.positions.data(), DType::kInt32, kCpu, {3});
  expect_error([&] { s.write(s.fp8.view(), options); }, "positions", "shape");
  std::vector<int64_t> counter(1);
  options.positions = TensorView::contiguous(s.positions.data(), DType::kInt32, kCpu, {4});
  options.nonfinite_count = TensorView::contiguous(counter.data(), DType::kInt64, kCpu, {1});
  expect_error([&] { s.write(s.fp8.view(), options); }, "nonfinite_count", "dtype");
}

TEST(Validation, GatherAndQuantizeQueryArguments) {
  WriteSetup s;
  s.write(s.fp8.view());
  std::vector<int64_t> indices{0, 127, 5};
  std::vector<uint16_t> nope(3 * 512), rope(3 * 64);
  auto gather = [&](TensorView idx, TensorView n, TensorView r) { gather_kv_cache(s.fp8.view(), idx, n, r); };
  const TensorView idx = TensorView::contiguous(indices.data(), DType::kInt64, kCpu, {3});
  const TensorView n = TensorView::contiguous(nope.data(), DType::kBFloat16, kCpu, {3, 512});
  const TensorView r = TensorView::contiguous(rope.data(), DType::kBFloat16, kCpu, {3, 64});
  gather(idx, n, r);
  indices[1] = 128;
  expect_error([&] { gather(idx, n, r); }, "indices", "entry 1");
  indices[1] = -1;
  expect_error([&] { gather(idx, n, r); }, "indices", "entry 1");
  indices[1] = 1;
  TensorView bad = n;
  bad.dtype = DType::kFloat32;
  expect_error([&] { gather(idx, bad, r); }, "k_nope", "dtype");
  bad = TensorView::contiguous(rope.data(), DType::kBFloat16, kCpu, {3, 32});
  expect_error([&] { gather(idx, n, bad); }, "k_pe", "shape");

  std::vector<uint16_t> q(2 * 4 * 129 * 576, 0x3f80);
  std::vector<uint8_t> q_nope(q.size());
  std::vector<float> q_scale(q.size());
  std::vector<uint16_t> q_rope(q.size());
  auto quantize = [&](int64_t b, int64_t s_q, int64_t h_q, int64_t scale_h) {
    quantize_query(TensorView::contiguous(q.data(), DType::kBFloat16, kCpu, {b, s_q, h_q, 576}),
                   TensorView::contiguous(q_nope.data(), DType::kFloat8E4M3, kCpu, {b, s_q, h_q, 512}),
                   TensorView::contiguous(q_scale.data(), DType::kFloat32, kCpu, {b, s_q, scale_h}),
                   TensorView::contiguous(q_rope.data(), DType::kBFloat16, kCpu, {b, s_q, h_q, 64}));
  };
  quantize(2, 4, 128, 128);
  expect_error([&] { quantize(2, 1, 0, 0); }, "q", "h_q");
  expect_error([&] { quantize(2, 1, 129, 129); }, "q", "h_q");
  expect_error([&] { quantize(2, 5, 16, 16); }, "q", "s_q");
  expect_error([&] { quantize(0, 1, 16, 16); }, "q", "batch");
  expect_error([&] { quantize(2, 1, 16, 15); }, "q_scale", "shape");
  TensorView q_f32 = TensorView::contiguous(q.data(), DType::kFloat32, kCpu, {1, 1, 16, 576});
  expect_error([&] { quantize_query(q_f32, TensorView{}, TensorView{}, TensorView{}); }, "q", "dtype");
}

// A valid CPU decode: b = 2, s_q = 2, h_q = 4, a 3-page fp8 cache.
struct DecodeSetup {
  HostCache cache{KvFormat::kFP8, 3};
  std::vector<uint16_t> q = std::vector<uint16_t>(2 * 2 * 4 * 576, 0x3c00);
  std::vector<int32_t> block_table{2, 0, 1, 0};
  std::vector<int32_t> seqlens{100, 30};
  std::vector<uint16_t> out = std::vector<uint16_t>(2 * 2 * 4 * 512);
  std::vector<float> lse = std::vector<float>(2 * 4 * 2);
  std::vector<int32_t> metadata = std::vector<int32_t>(3 * 8);
  std::vector<int32_t> num_splits = std::vector<int32_t>(3);
  std::vector<uint8_t> workspace = std::vector<uint8_t>(decode_workspace_bytes(2, 2, 4, 3));
  DecodeParams params;

  DecodeSetup() {
    std::fill(cache.nope.begin(), cache.nope.end(), 0x30);
    std::fill(cache.scale.begin(), cache.scale.end(), 0.01f);
    std::fill(cache.rope.begin(), cache.rope.end(), 0x3f00);
    params.q = TensorView::contiguous(q.data(), DType::kBFloat16, kCpu, {2, 2, 4, 576});
    params.cache = cache.view();
    params.block_table = TensorView::contiguous(block_table.data(), DType::kInt32, kCpu, {2, 2});
    params.cache_seqlens = TensorView::contiguous(seqlens.data(), DType::kInt32, kCpu, {2});
    params.out = TensorView::contiguous(out.data(), DType::kBFloat16, kCpu, {2, 2, 4, 512});
    params.lse = TensorView::contiguous(lse.data(), DType::kFloat32, kCpu, {2, 4, 2});
  }
  void add_schedule() {
    params.schedule.tile_scheduler_metadata = TensorView::contiguous(metadata.data(), DType::kInt32, kCpu, {3, 8});
    params.schedule.num_splits = TensorView::contiguous(num_splits.data(), DType::kInt32, kCpu, {3});
    params.workspace = TensorView::contiguous(workspace.data(), DType::kUInt8, kCpu,
                                              {static_cast<int64_t>(workspace.size())});
  }
};

TEST(Validation, MlaDecodeArguments) {
  DecodeSetup s;
  mla_decode(s.params);
  for (float v : s.lse) EXPECT_TRUE(std::isfinite(v));
  s.add_schedule();
  get_mla_metadata(s.params.cache_seqlens, 8, s.params.schedule);
  mla_decode(s.params);

  auto expect = [&](const std::function<void(DecodeParams&)>& breaker, const std::string& arg,
                    const std::string& detail) {
    DecodeParams p = s.params;
    breaker(p);
    expect_error([&] { mla_decode(p); }, arg, detail);
  };
  expect([](DecodeParams& p) { p.q.dtype = DType::kFloat32; }, "q", "dtype");
  expect([](DecodeParams& p) { p.q = TensorView{}; }, "q", "required");
  expect([&](DecodeParams& p) { p.q = TensorView::contiguous(s.q.data(), DType::kBFloat16, kCpu, {2, 2, 4, 512}); }, "q", "shape");
  expect([&](DecodeParams& p) { p.q = TensorView::contiguous(s.q.data(), DType::kBFloat16, kCpu, {2, 2, 0, 576}); }, "q", "h_q");
  expect([&](DecodeParams& p) { p.q = TensorView::contiguous(s.q.data(), DType::kBFloat16, kCpu, {1, 1, 129, 576}); }, "q", "h_q");
  expect([&](DecodeParams& p) { p.q = TensorView::contiguous(s.q.data(), DType::kBFloat16, kCpu, {1, 5, 4, 576}); }, "q", "s_q");
  expect([](DecodeParams& p) { p.q.stride[2] = 1152; }, "q", "contiguous");
  expect([](DecodeParams& p) { p.q.device = Device::cuda(0); }, "q", "cuda:0");
  expect([](DecodeParams& p) { p.block_table.dtype = DType::kInt64; }, "block_table", "dtype");
  expect([](DecodeParams& p) { p.block_table.shape[0] = 1; }, "block_table", "shape");
  expect([](DecodeParams& p) { p.cache_seqlens.shape[0] = 3; }, "cache_seqlens", "shape");
  expect([](DecodeParams& p) { p.out.dtype = DType::kFloat32; }, "out", "dtype");
  expect([](DecodeParams& p) { p.out.shape[3] = 576; }, "out", "shape");
  expect([&](DecodeParams& p) { p.lse = TensorView::contiguous(s.lse.data(), DType::kFloat32, kCpu, {2, 2, 4}); }, "lse", "shape");
  expect([](DecodeParams& p) { p.softmax_scale = std::numeric_limits<float>::quiet_NaN(); }, "softmax_scale", "finite");
  expect([](DecodeParams& p) { p.softmax_scale = -1.0f; }, "softmax_scale", "positive");
  expect([](DecodeParams& p) { p.schedule.tile_scheduler_metadata.shape[1] = 7; }, "tile_scheduler_metadata", "shape");
  expect([](DecodeParams& p) { p.schedule.num_splits.shape[0] = 2; }, "num_splits", "shape");
  expect([](DecodeParams& p) { p.workspace.shape[0] -= 1; }, "workspace", "bytes");
  expect([](DecodeParams& p) { p.cache.scale.shape[2] = 2; }, "cache.scale", "shape");
  expect([](DecodeParams& p) { p.q_scale = p.lse; }, "q_nope", "without q_nope");

  HostCache bf16(KvFormat::kBF16, 3);
  expect([&](DecodeParams& p) {
    p.cache = bf16.view();
    p.q_nope = TensorView::contiguous(s.out.data(), DType::kFloat8E4M3, kCpu, {2, 2, 4, 512});
  }, "q_nope", "fp8");
  std::vector<uint8_t> q_nope(2 * 2 * 4 * 512);
  expect([&](DecodeParams& p) {
    p.q = TensorView{};
    p.q_nope = TensorView::contiguous(q_nope.data(), DType::kFloat8E4M3, kCpu, {2, 2, 4, 512});
  }, "q_scale", "required");

  // Index checks name the sequence.
  s.block_table[2] = 3;  // sequence 1, page 0: the pool has pages 0..2
  expect_error([&] { mla_decode(s.params); }, "block_table", "sequence 1");
  s.block_table[2] = -1;
  expect_error([&] { mla_decode(s.params); }, "block_table", "sequence 1");
  s.block_table[2] = 1;
  s.block_table[1] = 99;  // unused (sequence 0 has 100 tokens = 2 pages -> used); see below
  expect_error([&] { mla_decode(s.params); }, "block_table", "sequence 0 page 1");
  s.seqlens[0] = 64;  // now page 1 of sequence 0 is not used, so 99 is fine
  mla_decode(s.params);
  s.seqlens[1] = 129;  // beyond 2 pages per row
  expect_error([&] { mla_decode(s.params); }, "cache_seqlens", "sequence 1");
  s.seqlens[1] = -1;
  expect_error([&] { mla_decode(s.params); }, "cache_seqlens", "sequence 1");
}

TEST(Validation, ScheduleArguments) {
  DecodeSetup s;
  s.add_schedule();
  EXPECT_EQ(decode_num_sm_parts(kCpu, 64), 1);
  expect_error([&] { decode_num_sm_parts(kCpu, 513); }, "q_rows", "513");
  expect_error([&] { decode_num_sm_parts(kCpu, 0); }, "q_rows");
  expect_error([&] { get_mla_metadata(s.params.cache_seqlens, 513, s.params.schedule); }, "q_rows", "512");
  DecodeSchedule bad = s.params.schedule;
  bad.num_splits.dtype = DType::kInt64;
  expect_error([&] { get_mla_metadata(s.params.cache_seqlens, 8, bad); }, "num_splits", "dtype");
  s.seqlens[1] = -5;
  expect_error([&] { get_mla_metadata(s.params.cache_seqlens, 8, s.params.schedule); }, "cache_seqlens", "sequence 1");
  s.seqlens[1] = 30;
  get_mla_metadata(s.params.cache_seqlens, 8, s.params.schedule);
  std::vector<int32_t> metadata(3 * 8), num_splits(3);
  compute_decode_schedule(s.seqlens.data(), 2, 3, metadata.data(), num_splits.data());
  EXPECT_EQ(s.metadata, metadata);
  EXPECT_EQ(s.num_splits, num_splits);

  // (b + parts) * rows * (512 + 1) * 4 bytes, rounded up to 256.
  EXPECT_EQ(decode_workspace_bytes(2, 1, 16, 4), 197120u);
  EXPECT_EQ(decode_workspace_bytes(1, 1, 1, 1) % 256, 0u);
  EXPECT_GE(decode_workspace_bytes(1, 1, 1, 1), 2u * 2052u);
  expect_error([&] { decode_workspace_bytes(0, 1, 16, 4); }, "batch");
  expect_error([&] { decode_workspace_bytes(1, 5, 16, 4); }, "s_q");
  expect_error([&] { decode_workspace_bytes(1, 1, 129, 4); }, "h_q");
  expect_error([&] { decode_workspace_bytes(1, 1, 16, 0); }, "num_sm_parts");
}

TEST(Validation, CudaDevicesAreRejectedWithoutAUsableGpu) {
  if (hopper_available()) GTEST_SKIP() << "a Hopper GPU is present; tests/cuda covers it";
  DecodeSetup s;
  KvCacheView cache = s.cache.view();
  cache.nope.device = cache.scale.device = cache.rope.device = Device::cuda(0);
  std::vector<float> c_kv(512), k_pe(64);
  std::vector<int32_t> slots{0};
  TensorView c = TensorView::contiguous(c_kv.data(), DType::kFloat32, Device::cuda(0), {1, 512});
  TensorView k = TensorView::contiguous(k_pe.data(), DType::kFloat32, Device::cuda(0), {1, 64});
  TensorView sl = TensorView::contiguous(slots.data(), DType::kInt32, Device::cuda(0), {1});
  EXPECT_THROW(write_kv_cache(c, k, sl, cache), Error);
  EXPECT_THROW(decode_num_sm_parts(Device::cuda(0), 64), Error);
  if (!built_with_cuda()) {
    try {
      write_kv_cache(c, k, sl, cache);
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("without CUDA"), std::string::npos) << e.what();
    }
  }
}

}  // namespace
}  // namespace snapmla
