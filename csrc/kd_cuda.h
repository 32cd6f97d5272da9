// The CUDA kernels' launch interface: plain pointers and a stream, no torch types, so that
// kd_cuda.cu compiles without torch's headers (kd_cuda_ops.cpp is the torch side).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kd_params.h"

namespace fastkd {

struct KdRowsLaunch {
  const void* s;  // student rows (N, V), unit stride along V
  const void* t;  // teacher rows
  void* g;        // gradient rows in the student's dtype, or nullptr; may equal s
  int64_t s_stride, t_stride, g_stride;  // row strides in entries
  DType s_dtype, t_dtype;
  const int64_t* labels;    // (N,) or nullptr
  const float* grad_scale;  // 0-d, on the device
  float* kd_out;            // (N,)
  float* ce_out;            // (N,), zero-initialised
  KdRowsParams p;
};

// Enqueue the row kernel / the row scaling on `stream`; returns the launch's error.
cudaError_t launch_kd_rows(const KdRowsLaunch& args, cudaStream_t stream);
cudaError_t launch_scale_rows(void* grad, DType dtype, int64_t stride, const float* factor,
                              int64_t factor_stride, int64_t n_rows, int64_t V,
                              cudaStream_t stream);

}  // namespace fastkd
