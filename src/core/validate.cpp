#include "core/validate.h"

#include <sstream>

namespace snapmla::check {

void defined(const TensorView& t, const char* name) {
  if (!t.defined()) throw Error(name, "is required but was not given");
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

}  // namespace snapmla::check
