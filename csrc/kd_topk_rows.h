// The ops `fastkd::topk_row_stats` and `fastkd::topk_grad_rows` on the torch side: argument
// checks and outputs, shared by their CPU and CUDA implementations in ops.cpp. The contract
// of both (shapes, what each column means, the in-place gradient) is fastkd/_topk_rows.py's
// docstring (design.md §4).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Optional.h>

#include <cmath>

#include "kd_params.h"
#include "kd_rows.h"

namespace fastkd {

// The checked arguments of a topk_row_stats or topk_grad_rows call: the tensors the kernels
// read, contiguous where they are (n_rows, K) or smaller, and the output.
struct TopKCall {
  at::Tensor student, ids, labels;
  at::Tensor student_at_ids, stats, row_coefs, pair_grads, grad;  // topk_grad_rows
  TopKParams p;
};

// (n_rows, V) logits rows: a kernel dtype, unit stride along V.
inline void check_topk_rows(const char* op, const at::Tensor& x, const char* name,
                            int64_t n_rows, int64_t V) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) == n_rows && x.size(1) == V, op, ": ", name,
              " must have shape (", n_rows, ", ", V, "), got ", x.sizes());
  TORCH_CHECK(is_kernel_dtype(x.scalar_type()), op, ": ", name,
              " must be float32, bfloat16 or float16, got ", x.scalar_type());
  TORCH_CHECK(x.stride(1) == 1 || V == 1, op, ": ", name,
              " must have unit stride along V, got strides ", x.strides());
}

// A small per-row tensor of the given shape and dtype on the student's device, contiguous.
inline at::Tensor checked_small(const char* op, const at::Tensor& x, const char* name,
                                at::IntArrayRef shape, at::ScalarType dtype,
                                const at::Tensor& student) {
  TORCH_CHECK(x.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ",
              x.sizes());
  TORCH_CHECK(x.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ",
              x.scalar_type());
  TORCH_CHECK(x.device() == student.device(), op, ": ", name,
              " must be on the student's device ", student.device(), ", got ", x.device());
  return x.contiguous();
}

// What both ops check: the student, ids, labels, temperature and softcap.
inline TopKCall prepare_topk_common(const char* op, const at::Tensor& student,
                                    const at::Tensor& ids,
                                    const std::optional<at::Tensor>& labels, double temperature,
                                    std::optional<double> softcap, int64_t ignore_index) {
  TopKCall call;
  TopKParams& p = call.p;
  TORCH_CHECK(student.dim() == 2, op, ": student must be (n, V), got ", student.sizes());
  p.n_rows = student.size(0);
  p.V = student.size(1);
  TORCH_CHECK(p.V > 0, op, ": empty vocabulary");
  check_topk_rows(op, student, "student", p.n_rows, p.V);
  TORCH_CHECK(ids.dim() == 2 && ids.size(0) == p.n_rows, op, ": ids must have shape (",
              p.n_rows, ", K), got ", ids.sizes());
  call.ids = checked_small(op, ids, "ids", ids.sizes(), at::kLong, student);
  p.K = ids.size(1);
  TORCH_CHECK(temperature > 0 && std::isfinite(temperature), op,
              ": temperature must be > 0, got ", temperature);
  p.inv_t = static_cast<float>(1.0 / temperature);
  if (softcap.has_value()) {
    TORCH_CHECK(*softcap > 0 && std::isfinite(*softcap), op, ": softcap must be > 0, got ",
                *softcap);
    p.has_softcap = true;
    p.cap = static_cast<float>(*softcap);
    p.inv_cap = static_cast<float>(1.0 / *softcap);
  }
  p.ignore_index = ignore_index;
  call.student = student;
  if (labels.has_value() && labels->defined()) {
    TORCH_CHECK(labels->dim() == 1 && labels->size(0) == p.n_rows, op,
                ": labels must have shape (", p.n_rows, "), got ", labels->sizes());
    TORCH_CHECK(!labels->is_floating_point() && !labels->is_complex(), op,
                ": labels must be integers, got ", labels->scalar_type());
    TORCH_CHECK(labels->device() == student.device(), op,
                ": labels must be on the student's device");
    call.labels = labels->to(at::kLong).contiguous();
  }
  return call;
}

inline TopKCall prepare_topk_row_stats(const at::Tensor& student, const at::Tensor& ids,
                                       const std::optional<at::Tensor>& labels,
                                       double temperature, std::optional<double> softcap,
                                       int64_t ignore_index) {
  TopKCall call = prepare_topk_common("fastkd::topk_row_stats", student, ids, labels,
                                      temperature, softcap, ignore_index);
  call.stats = at::empty({call.p.n_rows, kNumTopKStats}, student.options().dtype(at::kFloat));
  return call;
}

inline TopKCall prepare_topk_grad_rows(const at::Tensor& student, const at::Tensor& ids,
                                       const at::Tensor& student_at_ids,
                                       const std::optional<at::Tensor>& labels,
                                       const at::Tensor& stats, const at::Tensor& row_coefs,
                                       const at::Tensor& pair_grads, const at::Tensor& grad,
                                       double temperature, std::optional<double> softcap,
                                       int64_t ignore_index) {
  constexpr const char* op = "fastkd::topk_grad_rows";
  TopKCall call =
      prepare_topk_common(op, student, ids, labels, temperature, softcap, ignore_index);
  const int64_t n = call.p.n_rows;
  const int64_t K = call.p.K;
  TORCH_CHECK(student_at_ids.sizes() == ids.sizes(), op,
              ": student_at_ids must have the shape of ids ", ids.sizes(), ", got ",
              student_at_ids.sizes());
  TORCH_CHECK(is_kernel_dtype(student_at_ids.scalar_type()), op,
              ": student_at_ids must be float32, bfloat16 or float16, got ",
              student_at_ids.scalar_type());
  call.student_at_ids = checked_small(op, student_at_ids, "student_at_ids", {n, K},
                                      student_at_ids.scalar_type(), student);
  call.stats = checked_small(op, stats, "stats", {n, kNumTopKStats}, at::kFloat, student);
  call.row_coefs =
      checked_small(op, row_coefs, "row_coefs", {n, kNumTopKCoefs}, at::kFloat, student);
  call.pair_grads = checked_small(op, pair_grads, "pair_grads", {n, K}, at::kFloat, student);

  check_topk_rows(op, grad, "grad", n, call.p.V);
  TORCH_CHECK(grad.scalar_type() == student.scalar_type(), op,
              ": grad must have the student's dtype ", student.scalar_type(), ", got ",
              grad.scalar_type());
  TORCH_CHECK(grad.device() == student.device(), op, ": grad must be on the student's device");
  // A row is read and its gradient written by one thread (CPU) or block (CUDA): grad may be
  // the student itself, but no memory that another row still reads.
  TORCH_CHECK(n <= 1 || grad.stride(0) >= call.p.V, op,
              ": the rows of grad overlap in memory, strides ", grad.strides());
  TORCH_CHECK(!rows_overlap(grad, student) || same_view(grad, student), op,
              ": grad overlaps the student without being the same view");
  call.grad = grad;
  return call;
}

}  // namespace fastkd
