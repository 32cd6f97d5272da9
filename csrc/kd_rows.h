// The ops `fastkd::kd_rows` and `fastkd::scale_rows_` on the torch side: argument checks and
// outputs, shared by their CPU and CUDA implementations in ops.cpp.
//
// The op has the signature of the Triton row kernel (fastkd/triton/kd_kernels.py:row_kernel):
// (N, V) student and teacher rows with unit stride along V, optional labels, an optional
// gradient buffer (which may be the student itself: the kernels read an entry before they
// write it), the reduction's factor as a 0-d tensor; it returns (kd_per_row, ce_per_row) in
// float32.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Optional.h>

#include <cmath>
#include <tuple>
#include <utility>

#include "kd_params.h"

namespace fastkd {

// The checked arguments of one kd_rows call, with its outputs allocated.
struct KdRowsCall {
  at::Tensor student, teacher, labels, grad;
  at::Tensor reduction_factor;        // 0-d float32
  at::Tensor kd_per_row, ce_per_row;  // (N,) float32 outputs
  KdRowsParams p;
};

inline bool is_kernel_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

inline void check_rows(const at::Tensor& x, const char* name, int64_t n_rows, int64_t V) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) == n_rows && x.size(1) == V, "fastkd::kd_rows: ", name,
              " must have shape (", n_rows, ", ", V, "), got ", x.sizes());
  TORCH_CHECK(is_kernel_dtype(x.scalar_type()), "fastkd::kd_rows: ", name,
              " must be float32, bfloat16 or float16, got ", x.scalar_type());
  TORCH_CHECK(x.stride(1) == 1 || V == 1, "fastkd::kd_rows: ", name,
              " must have unit stride along V, got strides ", x.strides());
}

// Byte ranges of two (N, V) row tensors overlap (same storage only: data_ptr is absolute).
inline bool rows_overlap(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0 || !a.is_alias_of(b)) return false;
  auto span = [](const at::Tensor& x) {
    const char* first = static_cast<const char*>(x.data_ptr());
    return std::make_pair(first, first + ((x.size(0) - 1) * x.stride(0) + x.size(1)) *
                                             static_cast<int64_t>(x.element_size()));
  };
  const auto [a0, a1] = span(a);
  const auto [b0, b1] = span(b);
  return a0 < b1 && b0 < a1;
}

inline bool same_view(const at::Tensor& a, const at::Tensor& b) {
  return a.data_ptr() == b.data_ptr() && a.scalar_type() == b.scalar_type() &&
         a.strides() == b.strides() && a.sizes() == b.sizes();
}

inline KdRowsCall prepare_kd_rows(const at::Tensor& student, const at::Tensor& teacher,
                                  const std::optional<at::Tensor>& labels,
                                  const std::optional<at::Tensor>& grad,
                                  const at::Tensor& reduction_factor, int64_t divergence,
                                  double temperature, double mix_weight,
                                  std::optional<double> softcap, double kd_grad_coef,
                                  double ce_weight, int64_t ignore_index) {
  KdRowsCall call;
  KdRowsParams& p = call.p;
  TORCH_CHECK(student.dim() == 2, "fastkd::kd_rows: student must be (N, V), got ",
              student.sizes());
  p.n_rows = student.size(0);
  p.V = student.size(1);
  TORCH_CHECK(p.V > 0, "fastkd::kd_rows: empty vocabulary");
  check_rows(student, "student", p.n_rows, p.V);
  check_rows(teacher, "teacher", p.n_rows, p.V);
  TORCH_CHECK(teacher.device() == student.device(),
              "fastkd::kd_rows: student and teacher must be on one device");
  TORCH_CHECK(divergence >= 0 && divergence < kNumDivergences,
              "fastkd::kd_rows: unknown divergence code ", divergence);
  TORCH_CHECK(temperature > 0 && std::isfinite(temperature),
              "fastkd::kd_rows: temperature must be > 0, got ", temperature);
  TORCH_CHECK(mix_weight > 0 && mix_weight < 1,
              "fastkd::kd_rows: mix_weight must lie in (0, 1), got ", mix_weight);
  TORCH_CHECK(reduction_factor.numel() == 1,
              "fastkd::kd_rows: reduction_factor must hold one number");

  call.student = student;
  call.teacher = teacher;
  call.reduction_factor = reduction_factor.to(student.device(), at::kFloat).reshape({});
  p.divergence = static_cast<int>(divergence);
  p.inv_t = static_cast<float>(1.0 / temperature);
  p.mix = {static_cast<float>(mix_weight), static_cast<float>(1.0 - mix_weight),
           static_cast<float>(std::log(mix_weight)), static_cast<float>(std::log1p(-mix_weight))};
  p.kd_grad_coef = static_cast<float>(kd_grad_coef);
  p.ce_weight = static_cast<float>(ce_weight);
  p.ignore_index = ignore_index;
  if (softcap.has_value()) {
    TORCH_CHECK(*softcap > 0, "fastkd::kd_rows: softcap must be > 0, got ", *softcap);
    p.has_softcap = true;
    p.cap = static_cast<float>(*softcap);
    p.inv_cap = static_cast<float>(1.0 / *softcap);
  }
  if (labels.has_value() && labels->defined()) {
    TORCH_CHECK(labels->dim() == 1 && labels->size(0) == p.n_rows,
                "fastkd::kd_rows: labels must have shape (", p.n_rows, "), got ",
                labels->sizes());
    TORCH_CHECK(!labels->is_floating_point() && !labels->is_complex(),
                "fastkd::kd_rows: labels must be integers, got ", labels->scalar_type());
    TORCH_CHECK(labels->device() == student.device(),
                "fastkd::kd_rows: labels must be on the logits' device");
    call.labels = labels->to(at::kLong).contiguous();
    p.has_labels = true;
    p.has_ce = ce_weight != 0;
  }
  if (grad.has_value() && grad->defined()) {
    check_rows(*grad, "grad", p.n_rows, p.V);
    TORCH_CHECK(grad->scalar_type() == student.scalar_type(),
                "fastkd::kd_rows: grad must have the student's dtype ", student.scalar_type(),
                ", got ", grad->scalar_type());
    TORCH_CHECK(grad->device() == student.device(),
                "fastkd::kd_rows: grad must be on the logits' device");
    // A row is read and its gradient written by one program: grad may be the student (or
    // the teacher) itself, but no memory that another row, or the other input, still reads.
    TORCH_CHECK(p.n_rows <= 1 || grad->stride(0) >= p.V,
                "fastkd::kd_rows: the rows of grad overlap in memory, strides ",
                grad->strides());
    TORCH_CHECK(!rows_overlap(*grad, student) || same_view(*grad, student),
                "fastkd::kd_rows: grad overlaps the student without being the same view");
    TORCH_CHECK(!rows_overlap(*grad, teacher) || same_view(*grad, teacher),
                "fastkd::kd_rows: grad overlaps the teacher without being the same view");
    call.grad = *grad;
    p.compute_grad = true;
  }
  const auto f32 = student.options().dtype(at::kFloat);
  call.kd_per_row = at::empty({p.n_rows}, f32);
  call.ce_per_row = at::zeros({p.n_rows}, f32);
  return call;
}

// fastkd::scale_rows_: grad (N, V) *= grad_output, a 0-d tensor or one value per row.
inline at::Tensor prepare_grad_output(const at::Tensor& grad, const at::Tensor& grad_output) {
  TORCH_CHECK(grad.dim() == 2, "fastkd::scale_rows_: grad must be (N, V), got ", grad.sizes());
  TORCH_CHECK(is_kernel_dtype(grad.scalar_type()),
              "fastkd::scale_rows_: grad must be float32, bfloat16 or float16, got ",
              grad.scalar_type());
  TORCH_CHECK(grad.stride(1) == 1 || grad.size(1) == 1,
              "fastkd::scale_rows_: grad must have unit stride along V");
  TORCH_CHECK(grad_output.dim() == 0 ||
                  (grad_output.dim() == 1 && grad_output.size(0) == grad.size(0)),
              "fastkd::scale_rows_: grad_output must be 0-d or hold one value per row, got ",
              grad_output.sizes());
  return grad_output.to(grad.device(), at::kFloat);
}

}  // namespace fastkd
