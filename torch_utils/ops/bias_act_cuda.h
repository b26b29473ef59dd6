// Host entry point of bias_act_cuda.cu, called by bias_act.cpp when built WITH_CUDA.
#pragma once
#include <cstdint>

// Same contract as the CPU kernel (bias_act_math.h), on dense tensors viewed as
// [outer, C, inner]; dtype is plugin::DType; throws std::runtime_error on a launch error.
void bias_act_cuda_launch(int mode, int dtype, int act, void* out, const void* d, const void* dy, const void* r,
                          const void* b, int64_t outer, int64_t C, int64_t inner, double alpha, double gain,
                          double clamp, void* stream);
