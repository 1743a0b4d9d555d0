// Non-owning tensor views: the one way data crosses the snapmla API.
// Shapes and strides are in elements, so a view can describe a PyTorch/DLPack
// tensor as it is (no copy) and the validator can say exactly what is wrong.
#pragma once

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <string>

namespace snapmla {

enum class DType : uint8_t {
  kBFloat16,
  kFloat16,
  kFloat32,
  kFloat64,
  kFloat8E4M3,
  kInt32,
  kInt64,
  kUInt8,
};

enum class DeviceType : uint8_t { kCPU, kCUDA };

struct Device {
  DeviceType type = DeviceType::kCPU;
  int index = 0;
  static Device cpu() { return {DeviceType::kCPU, 0}; }
  static Device cuda(int index = 0) { return {DeviceType::kCUDA, index}; }
  bool operator==(const Device& o) const { return type == o.type && index == o.index; }
  bool operator!=(const Device& o) const { return !(*this == o); }
};

const char* dtype_name(DType dtype);
size_t dtype_size(DType dtype);
std::string device_name(Device device);

struct TensorView {
  static constexpr int kMaxRank = 4;

  void* data = nullptr;
  DType dtype = DType::kFloat32;
  Device device{};
  int rank = 0;
  int64_t shape[kMaxRank] = {};
  int64_t stride[kMaxRank] = {};  // elements, not bytes

  // A contiguous (row-major) view.
  static TensorView contiguous(void* data, DType dtype, Device device,
                               std::initializer_list<int64_t> shape);

  // A view with rank 0 means "not given" (optional arguments).
  bool defined() const { return rank > 0; }
  int64_t size(int dim) const { return shape[dim < 0 ? dim + rank : dim]; }
  int64_t numel() const;
  bool is_contiguous() const;
  size_t nbytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype); }
  std::string shape_string() const;  // "[2, 1, 16, 576]"

  template <typename T>
  T* ptr() const { return static_cast<T*>(data); }
};

}  // namespace snapmla
