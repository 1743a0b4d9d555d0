// Which GPUs the sm90 kernels can run on. The kernels are built for sm_90a
// only, so any other architecture gets a clear error instead of a launch failure.
#include <cuda_runtime.h>

#include <mutex>
#include <string>
#include <vector>

#include "cuda/backend.h"
#include "cuda/check.h"
#include "snapmla/error.h"

namespace snapmla::cuda {
namespace {

struct DeviceInfo {
  int major = 0;
  int minor = 0;
  int multiprocessors = 0;
};

// Device properties never change while the process runs; query them once.
const std::vector<DeviceInfo>& devices() {
  static std::vector<DeviceInfo> infos;
  static std::once_flag once;
  std::call_once(once, [] {
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess) {
      (void)cudaGetLastError();  // no driver / no device: clear the sticky error
      return;
    }
    infos.resize(count);
    for (int i = 0; i < count; ++i) {
      cudaDeviceGetAttribute(&infos[i].major, cudaDevAttrComputeCapabilityMajor, i);
      cudaDeviceGetAttribute(&infos[i].minor, cudaDevAttrComputeCapabilityMinor, i);
      cudaDeviceGetAttribute(&infos[i].multiprocessors, cudaDevAttrMultiProcessorCount, i);
    }
    (void)cudaGetLastError();
  });
  return infos;
}

}  // namespace

void require_hopper(Device device, const char* argument) {
  if (device.type != DeviceType::kCUDA)
    throw Error(argument, "expected a CUDA tensor, got one on " + device_name(device));
  const auto& infos = devices();
  if (infos.empty()) throw Error(argument, "is on " + device_name(device) + " but no CUDA device is usable");
  if (device.index < 0 || device.index >= static_cast<int>(infos.size()))
    throw Error(argument, "is on " + device_name(device) + " but only " + std::to_string(infos.size()) +
                              " CUDA device(s) exist");
  const DeviceInfo& info = infos[device.index];
  if (info.major != 9)
    throw Error(argument, "is on " + device_name(device) + " (compute capability " + std::to_string(info.major) +
                              "." + std::to_string(info.minor) +
                              "); the snapmla kernels need a Hopper GPU (compute capability 9.0)");
}

bool hopper_available() {
  for (const DeviceInfo& info : devices())
    if (info.major == 9) return true;
  return false;
}

int multiprocessor_count(int device_index) {
  const auto& infos = devices();
  if (device_index < 0 || device_index >= static_cast<int>(infos.size()))
    throw Error("device", "cuda:" + std::to_string(device_index) + " does not exist");
  return infos[device_index].multiprocessors;
}

}  // namespace snapmla::cuda
