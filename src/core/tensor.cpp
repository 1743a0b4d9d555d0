#include <sstream>

#include "snapmla/error.h"
#include "snapmla/kv_format.h"
#include "snapmla/tensor.h"

namespace snapmla {

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kBFloat16: return "bfloat16";
    case DType::kFloat16: return "float16";
    case DType::kFloat32: return "float32";
    case DType::kFloat64: return "float64";
    case DType::kFloat8E4M3: return "float8_e4m3fn";
    case DType::kInt32: return "int32";
    case DType::kInt64: return "int64";
    case DType::kUInt8: return "uint8";
  }
  return "unknown";
}

size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::kBFloat16:
    case DType::kFloat16: return 2;
    case DType::kFloat32:
    case DType::kInt32: return 4;
    case DType::kFloat64:
    case DType::kInt64: return 8;
    case DType::kFloat8E4M3:
    case DType::kUInt8: return 1;
  }
  return 0;
}

std::string device_name(Device device) {
  return device.type == DeviceType::kCPU ? std::string("cpu") : "cuda:" + std::to_string(device.index);
}

TensorView TensorView::contiguous(void* data, DType dtype, Device device, std::initializer_list<int64_t> shape) {
  TensorView t;
  t.data = data;
  t.dtype = dtype;
  t.device = device;
  if (shape.size() > static_cast<size_t>(kMaxRank)) throw Error("shape", "rank above 4 is not supported");
  t.rank = static_cast<int>(shape.size());
  int i = 0;
  for (int64_t s : shape) t.shape[i++] = s;
  int64_t stride = 1;
  for (int d = t.rank - 1; d >= 0; --d) {
    t.stride[d] = stride;
    stride *= t.shape[d];
  }
  return t;
}

int64_t TensorView::numel() const {
  if (rank == 0) return 0;
  int64_t n = 1;
  for (int d = 0; d < rank; ++d) n *= shape[d];
  return n;
}

bool TensorView::is_contiguous() const {
  int64_t expected = 1;
  for (int d = rank - 1; d >= 0; --d) {
    if (shape[d] != 1 && stride[d] != expected) return false;
    expected *= shape[d];
  }
  return true;
}

std::string TensorView::shape_string() const {
  std::ostringstream os;
  os << "[";
  for (int d = 0; d < rank; ++d) os << (d ? ", " : "") << shape[d];
  os << "]";
  return os.str();
}

Error::Error(std::string argument, const std::string& message)
    : std::runtime_error("snapmla: argument '" + argument + "': " + message), argument_(std::move(argument)) {}

Error::Error(const std::string& message) : std::runtime_error("snapmla: " + message) {}

const char* kv_format_name(KvFormat format) { return format == KvFormat::kBF16 ? "bf16" : "fp8"; }

bool parse_kv_format(const char* name, KvFormat* format) {
  const std::string s(name);
  if (s == "bf16") { *format = KvFormat::kBF16; return true; }
  if (s == "fp8") { *format = KvFormat::kFP8; return true; }
  return false;
}

int64_t KvCacheView::num_pages() const {
  const TensorView& t = format == KvFormat::kBF16 ? data : nope;
  return t.rank > 0 ? t.shape[0] : 0;
}

Device KvCacheView::device() const { return format == KvFormat::kBF16 ? data.device : nope.device; }

KvCacheView KvCacheView::bf16(void* data, int64_t num_pages, Device device) {
  KvCacheView v;
  v.format = KvFormat::kBF16;
  v.data = TensorView::contiguous(data, DType::kBFloat16, device, {num_pages, kPageSize, 1, kHeadDim});
  return v;
}

KvCacheView KvCacheView::fp8(void* nope, void* scale, void* rope, int64_t num_pages, Device device) {
  KvCacheView v;
  v.format = KvFormat::kFP8;
  v.nope = TensorView::contiguous(nope, DType::kFloat8E4M3, device, {num_pages, kPageSize, 1, kNopeDim});
  v.scale = TensorView::contiguous(scale, DType::kFloat32, device, {num_pages, kPageSize, 1, 1});
  v.rope = TensorView::contiguous(rope, DType::kBFloat16, device, {num_pages, kPageSize, 1, kRopeDim});
  return v;
}

}  // namespace snapmla
