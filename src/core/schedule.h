// The split-KV tile schedule: the one definition, run on the host (CPU views,
// tests) and by the CUDA metadata kernel. It cuts the concatenation of all
// sequences' pages into `num_parts` nearly equal pieces, charging each
// (sequence, part) piece a fixed overhead so that many short sequences and a
// few long ones both balance (FlashMLA's get_mla_metadata idea).
#pragma once

#include <cstdint>

#include "core/host_device.h"
#include "snapmla/kv_format.h"

namespace snapmla {

// Cost, in pages, of starting a piece: prologue, epilogue, combine traffic.
inline constexpr int kScheduleFixedOverheadPages = 5;
inline constexpr int kScheduleMetadataFields = 8;

// One row of tile_scheduler_metadata. A part covers sequences begin_batch ..
// end_batch inclusive (none if end_batch < begin_batch); in begin_batch it
// starts at begin_page, in end_batch it stops before end_page, and its piece
// of begin_batch is split number first_split of that sequence.
struct SchedulePart {
  int32_t begin_batch;
  int32_t begin_page;
  int32_t end_batch;
  int32_t end_page;
  int32_t first_split;
};

SNAPMLA_HD int32_t pages_for_tokens(int32_t tokens) { return (tokens + kPageSize - 1) / kPageSize; }

SNAPMLA_HD SchedulePart load_schedule_part(const int32_t* metadata, int part) {
  const int32_t* m = metadata + part * kScheduleMetadataFields;
  return SchedulePart{m[0], m[1], m[2], m[3], m[4]};
}

// Writes metadata [num_parts, 8] and num_splits [batch + 1] (prefix sums of the
// number of pieces per sequence; num_splits[b+1] - num_splits[b] == 1 means
// sequence b is done by one CTA and needs no combine).
SNAPMLA_HD void compute_decode_schedule(const int32_t* cache_seqlens, int batch, int num_parts,
                                        int32_t* metadata, int32_t* num_splits) {
  int64_t total = 0;
  for (int b = 0; b < batch; ++b) total += pages_for_tokens(cache_seqlens[b]) + kScheduleFixedOverheadPages;
  const int64_t budget_per_part = (total + num_parts - 1) / num_parts + kScheduleFixedOverheadPages;

  int b = 0, page = 0, split = 0, splits_so_far = 0;
  num_splits[0] = 0;
  for (int part = 0; part < num_parts; ++part) {
    int32_t* m = metadata + part * kScheduleMetadataFields;
    m[0] = b;
    m[1] = page;
    m[4] = split;
    m[5] = m[6] = m[7] = 0;
    int64_t budget = budget_per_part;
    while (b < batch) {
      const int remaining = pages_for_tokens(cache_seqlens[b]) - page;
      if (budget >= remaining + kScheduleFixedOverheadPages) {
        budget -= remaining + kScheduleFixedOverheadPages;
        splits_so_far += split + 1;
        num_splits[b + 1] = splits_so_far;
        ++b;
        page = 0;
        split = 0;
      } else {
        // budget_per_part > overhead, so a part that stops inside the sequence
        // it started in always takes at least one page of it.
        const int64_t take = budget - kScheduleFixedOverheadPages;
        if (take > 0) {
          page += static_cast<int>(take);
          ++split;
        }
        break;
      }
    }
    if (page > 0) {
      m[2] = b;
      m[3] = page;
    } else {
      m[2] = b - 1;
      m[3] = b > 0 ? pages_for_tokens(cache_seqlens[b - 1]) : 0;
    }
  }
}

}  // namespace snapmla
