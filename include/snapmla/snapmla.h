// snapmla: FP8 Multi-head Latent Attention decode for NVIDIA Hopper.
#pragma once

#include "snapmla/decode.h"
#include "snapmla/error.h"
#include "snapmla/kv_cache.h"
#include "snapmla/kv_format.h"
#include "snapmla/tensor.h"
#include "snapmla/version.h"
