// The CUDA kernels' launch interface: plain pointers and a stream, no torch types, so that
// kd_cuda.cu compiles without torch's headers (ops.cpp is the torch side).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kd_params.h"

namespace fastkd {

// Enqueue the row kernel / the row scaling on `stream`; returns the launch's error.
cudaError_t launch_kd_rows(const KdRowsLaunch& args, cudaStream_t stream);
cudaError_t launch_scale_rows(void* grad, DType dtype, int64_t stride, const float* factor,
                              int64_t factor_stride, int64_t n_rows, int64_t V,
                              cudaStream_t stream);

}  // namespace fastkd
