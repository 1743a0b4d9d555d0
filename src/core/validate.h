// Argument checks shared by every entry point: each failure throws
// snapmla::Error naming the argument and saying what was expected.
#pragma once

#include <concepts>
#include <initializer_list>
#include <string>

#include "snapmla/error.h"
#include "snapmla/tensor.h"

namespace snapmla::check {

void defined(const TensorView& t, const char* name);
void dtype(const TensorView& t, const char* name, std::initializer_list<DType> allowed);
// kAny matches any extent.
inline constexpr int64_t kAny = -1;
void shape(const TensorView& t, const char* name, std::initializer_list<int64_t> expected);
void contiguous(const TensorView& t, const char* name);
// The innermost dimension is contiguous (rows may be strided).
void inner_contiguous(const TensorView& t, const char* name);
void on_device(const TensorView& t, const char* name, Device device);
void argument(bool ok, const char* name, const std::string& message);
// Every page a sequence uses lies in [0, num_pages) and every length fits its
// block_table row. Host arrays: cache_seqlens [batch], block_table [batch, max_pages].
void paged_indices(const int32_t* cache_seqlens, const int32_t* block_table, int64_t batch, int64_t max_pages,
                   int64_t num_pages);
// The same, building the message only on failure (hot paths: every decode call).
template <typename MakeMessage>
  requires std::invocable<MakeMessage>
void argument(bool ok, const char* name, MakeMessage&& make_message) {
  if (!ok) throw Error(name, make_message());
}

}  // namespace snapmla::check
