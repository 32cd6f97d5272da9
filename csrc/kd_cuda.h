// The CUDA kernels' launch interface: plain pointers and a stream, no torch types, so that
// kd_cuda.cu compiles without torch's headers (ops.cpp is the torch side).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kd_params.h"

namespace fastkd {

// Enqueue the row kernel / the backward's row scaling (grad *= grad_output, 0-d when
// grad_output_stride is 0, else one value per row) on `stream`; returns the launch's error.
cudaError_t launch_kd_rows(const KdRowsLaunch& args, cudaStream_t stream);
cudaError_t launch_scale_rows(void* grad, DType dtype, int64_t stride, const float* grad_output,
                              int64_t grad_output_stride, int64_t n_rows, int64_t V,
                              cudaStream_t stream);

}  // namespace fastkd
