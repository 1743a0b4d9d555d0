// Every CUDA call and launch goes through these: a failure becomes a
// snapmla::Error with the call, file and line, never a silent continue.
#pragma once

#include <cuda_runtime.h>

#include <string>

#include "snapmla/error.h"

#define SNAPMLA_CUDA_CHECK(call)                                                                  \
  do {                                                                                            \
    cudaError_t snapmla_err_ = (call);                                                            \
    if (snapmla_err_ != cudaSuccess)                                                              \
      throw ::snapmla::Error(std::string(#call) + " failed: " + cudaGetErrorString(snapmla_err_) + \
                             " (" __FILE__ ":" + std::to_string(__LINE__) + ")");                 \
  } while (0)

// After a <<<>>> launch: reports configuration errors at once (no sync).
#define SNAPMLA_CUDA_CHECK_LAUNCH() SNAPMLA_CUDA_CHECK(cudaGetLastError())
