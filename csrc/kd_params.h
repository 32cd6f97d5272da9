// The launch parameters of the row kernel: plain data, no torch headers, so that the CUDA
// kernels (kd_cuda.cu) compile without them.
#pragma once

#include <cstdint>

#include "kd_math.h"

namespace fastkd {

// Everything a kernel needs besides the tensors' data pointers.
struct KdRowsParams {
  int64_t n_rows = 0;
  int64_t V = 0;
  int divergence = FORWARD_KL;
  float inv_t = 1.0f;      // 1 / temperature
  float cap = 0.0f;        // soft-cap c (when has_softcap)
  float inv_cap = 0.0f;    // 1 / c
  MixWeight mix{};         // beta or alpha with its logs
  float kd_grad_coef = 0;  // kd_weight * (T^2 or 1) / T: dL/ds = kd_grad_coef * dD/da + ...
  float ce_weight = 0;
  int64_t ignore_index = -100;
  bool has_labels = false;
  bool has_ce = false;  // labels given and ce_weight != 0
  bool has_softcap = false;
  bool compute_grad = false;
};

// Input dtypes as the CUDA kernel reads them (it takes them at run time, not as template
// arguments: one kernel per divergence keeps the build short).
enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

}  // namespace fastkd
