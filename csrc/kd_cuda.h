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

// The top-k row kernels (kd_topk_cuda.cu, design.md §4): enqueue topk_row_stats /
// topk_grad_rows on `stream`; returns the launch's error. ops.cpp checks V against
// kMaxCudaVocab and, with the tail, topk_bitmap_bytes(V) against the device's shared memory
// per block first, so that these errors say what is wrong.
cudaError_t launch_topk_row_stats(const TopKStatsLaunch& args, cudaStream_t stream);
cudaError_t launch_topk_grad_rows(const TopKGradLaunch& args, cudaStream_t stream);

// The longest row of the top-k kernels: in-row indices are 32-bit, with room for the last
// stride of a 512-thread team (kd_cuda_rows.cuh: kMaxTeam).
constexpr int64_t kMaxCudaVocab = 0x7fffffff - 512;

// The shared memory of the tail's membership bitmap: V bits in 32-bit words.
constexpr int64_t topk_bitmap_bytes(int64_t V) { return (V + 31) / 32 * 4; }

}  // namespace fastkd
