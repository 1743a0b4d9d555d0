#include "core/validate.h"

#include "core/schedule.h"

#include <sstream>

namespace snapmla::check {

void defined(const TensorView& t, const char* name) {
  if (!t.defined()) throw Error(name, "is required but was not given");
  for (int d = 0; d < t.rank; ++d)
    if (t.shape[d] < 0) throw Error(name, "has a negative extent in dimension " + std::to_string(d) + ": " + t.shape_string());
  if (t.data == nullptr && t.numel() > 0) throw Error(name, "has a null data pointer");
}

void dtype(const TensorView& t, const char* name, std::initializer_list<DType> allowed) {
  for (DType d : allowed)
    if (t.dtype == d) return;
  std::ostringstream os;
  os << "expected dtype ";
  bool first = true;
  for (DType d : allowed) {
    os << (first ? "" : " or ") << dtype_name(d);
    first = false;
  }
  os << ", got " << dtype_name(t.dtype);
  throw Error(name, os.str());
}

void shape(const TensorView& t, const char* name, std::initializer_list<int64_t> expected) {
  bool ok = t.rank == static_cast<int>(expected.size());
  for (int d = 0; d < t.rank; ++d) ok = ok && t.shape[d] >= 0;
  int i = 0;
  for (int64_t e : expected) {
    if (ok && e != kAny && t.shape[i] != e) ok = false;
    ++i;
  }
  if (ok) return;
  std::ostringstream os;
  os << "expected shape [";
  i = 0;
  for (int64_t e : expected) {
    os << (i++ ? ", " : "");
    if (e == kAny) os << "*"; else os << e;
  }
  os << "], got " << t.shape_string();
  throw Error(name, os.str());
}

void contiguous(const TensorView& t, const char* name) {
  if (!t.is_contiguous()) throw Error(name, "must be contiguous (row-major, no gaps)");
}

void inner_contiguous(const TensorView& t, const char* name) {
  if (t.rank > 0 && t.shape[t.rank - 1] > 1 && t.stride[t.rank - 1] != 1)
    throw Error(name, "must have a contiguous last dimension (stride 1)");
}

void on_device(const TensorView& t, const char* name, Device device) {
  if (t.device != device)
    throw Error(name, "is on " + device_name(t.device) + " but the operation runs on " + device_name(device));
}

void argument(bool ok, const char* name, const std::string& message) {
  if (!ok) throw Error(name, message);
}

void paged_indices(const int32_t* cache_seqlens, const int32_t* block_table, int64_t batch, int64_t max_pages,
                   int64_t num_pages) {
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t s_k = cache_seqlens[b];
    if (s_k < 0 || s_k > max_pages * kPageSize)
      throw Error("cache_seqlens", "sequence " + std::to_string(b) + " has length " + std::to_string(s_k) +
                                       ", outside [0, " + std::to_string(max_pages * kPageSize) +
                                       "] (block_table has " + std::to_string(max_pages) + " pages per row)");
    const int64_t used = pages_for_tokens(static_cast<int32_t>(s_k));
    for (int64_t p = 0; p < used; ++p) {
      const int64_t page = block_table[b * max_pages + p];
      if (page < 0 || page >= num_pages)
        throw Error("block_table", "sequence " + std::to_string(b) + " page " + std::to_string(p) + " is " +
                                       std::to_string(page) + ", outside the cache's [0, " +
                                       std::to_string(num_pages) + ")");
    }
  }
}

}  // namespace snapmla::check
