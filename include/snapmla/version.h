#pragma once

namespace snapmla {
inline constexpr const char* kVersion = "0.1.0";
// True when the library was built with its CUDA kernels.
bool built_with_cuda();
// True when a CUDA device of compute capability 9.0 is present (false without CUDA).
bool hopper_available();
}  // namespace snapmla
