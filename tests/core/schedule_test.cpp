// The split-KV schedule: every page of every sequence is covered by exactly
// one part, split numbering agrees with num_splits, and no part is given
// more than its budget.
#include <gtest/gtest.h>

#include <random>
#include <vector>

#include "core/schedule.h"

namespace snapmla {
namespace {

struct Schedule {
  std::vector<int32_t> metadata;
  std::vector<int32_t> num_splits;
};

Schedule make_schedule(const std::vector<int32_t>& seqlens, int parts) {
  Schedule s;
  s.metadata.assign(static_cast<size_t>(parts) * kScheduleMetadataFields, -7);
  s.num_splits.assign(seqlens.size() + 1, -7);
  compute_decode_schedule(seqlens.data(), static_cast<int>(seqlens.size()), parts, s.metadata.data(),
                          s.num_splits.data());
  return s;
}

void check_schedule(const std::vector<int32_t>& seqlens, int parts) {
  SCOPED_TRACE("batch " + std::to_string(seqlens.size()) + ", parts " + std::to_string(parts));
  const int batch = static_cast<int>(seqlens.size());
  const Schedule s = make_schedule(seqlens, parts);
  int64_t total = 0;
  std::vector<std::vector<int>> covered(batch);
  for (int b = 0; b < batch; ++b) {
    covered[b].assign(pages_for_tokens(seqlens[b]), 0);
    total += pages_for_tokens(seqlens[b]) + kScheduleFixedOverheadPages;
  }
  const int64_t budget = (total + parts - 1) / parts + kScheduleFixedOverheadPages;

  std::vector<int> pieces(batch, 0);
  for (int p = 0; p < parts; ++p) {
    const SchedulePart part = load_schedule_part(s.metadata.data(), p);
    int64_t cost = 0;
    for (int b = part.begin_batch; b <= part.end_batch; ++b) {
      ASSERT_GE(b, 0);
      ASSERT_LT(b, batch);
      const int pages = pages_for_tokens(seqlens[b]);
      const int start = b == part.begin_batch ? part.begin_page : 0;
      const int stop = b == part.end_batch ? part.end_page : pages;
      ASSERT_LE(0, start);
      ASSERT_LE(stop, pages);
      if (pages > 0) ASSERT_LT(start, stop) << "empty piece of sequence " << b << " in part " << p;
      for (int page = start; page < stop; ++page) ++covered[b][page];
      EXPECT_EQ(b == part.begin_batch ? part.first_split : 0, pieces[b]) << "split number, sequence " << b;
      ++pieces[b];
      cost += stop - start + kScheduleFixedOverheadPages;
    }
    EXPECT_LE(cost, budget) << "part " << p;
  }
  EXPECT_EQ(s.num_splits[0], 0);
  for (int b = 0; b < batch; ++b) {
    for (int page = 0; page < static_cast<int>(covered[b].size()); ++page)
      ASSERT_EQ(covered[b][page], 1) << "sequence " << b << " page " << page;
    EXPECT_GE(pieces[b], 1) << "sequence " << b << " is in no part";
    EXPECT_EQ(s.num_splits[b + 1] - s.num_splits[b], pieces[b]) << "sequence " << b;
  }
}

TEST(Schedule, SingleSequenceSplitsEvenly) {
  const std::vector<int32_t> seqlens{64 * 100};
  const Schedule s = make_schedule(seqlens, 4);
  EXPECT_EQ(s.num_splits[1], 4);
  check_schedule(seqlens, 4);
}

TEST(Schedule, ShortSequencesNeedNoCombine) {
  const std::vector<int32_t> seqlens(8, 64);
  const Schedule s = make_schedule(seqlens, 8);
  for (int b = 0; b < 8; ++b) EXPECT_EQ(s.num_splits[b + 1] - s.num_splits[b], 1);
  check_schedule(seqlens, 8);
}

TEST(Schedule, ZerosAndEdgeCases) {
  check_schedule({0}, 1);
  check_schedule({0}, 132);
  check_schedule({0, 0, 0}, 5);
  check_schedule({1, 0, 64, 65, 0, 127, 128}, 3);
  check_schedule({100000}, 132);
  check_schedule({1}, 1);
}

TEST(Schedule, RandomSeqlenSets) {
  std::mt19937 rng(1234);
  const int part_counts[] = {1, 2, 7, 33, 66, 132};
  for (int trial = 0; trial < 300; ++trial) {
    const int batch = 1 + static_cast<int>(rng() % 64);
    std::vector<int32_t> seqlens(batch);
    for (int32_t& s : seqlens) {
      const uint32_t kind = rng() % 4;
      s = kind == 0 ? 0 : kind == 1 ? static_cast<int32_t>(rng() % 130) : static_cast<int32_t>(rng() % 9000);
    }
    check_schedule(seqlens, part_counts[trial % 6]);
  }
}

TEST(Schedule, OneLongManyShort) {
  std::mt19937 rng(99);
  for (int trial = 0; trial < 40; ++trial) {
    std::vector<int32_t> seqlens(1 + rng() % 127);
    for (int32_t& s : seqlens) s = static_cast<int32_t>(rng() % 200);
    seqlens[rng() % seqlens.size()] = 64 * 2000 + static_cast<int32_t>(rng() % 64);
    check_schedule(seqlens, 1 + static_cast<int>(rng() % 132));
  }
}

}  // namespace
}  // namespace snapmla
