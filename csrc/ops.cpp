// fastkd._C: the schemas of the C++ ops, their CUDA implementations (the torch side of
// kd_cuda.cu), and build_info().
//
// The ops live in the `fastkd` namespace beside the Python custom ops of fastkd/_ops.py
// (torch.library.custom_op("fastkd::kd_loss") is a fragment too), so this library is a
// TORCH_LIBRARY_FRAGMENT: either side may register first. The CPU implementations are
// registered by the fastkd._C_cpu_<isa> module that fastkd/_extension.py picks at import
// (kd_cpu.cpp), the fake (meta) implementations in fastkd/_extension.py.
#include <pybind11/pybind11.h>
#include <torch/library.h>
#include <torch/version.h>

#include "kd_rows.h"

#if defined(FASTKD_WITH_CUDA)
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include "kd_cuda.h"
#endif

// setup.py passes the architectures as an identifier (sm_80__sm_90__compute_90).
#define FASTKD_STR2(x) #x
#define FASTKD_STR(x) FASTKD_STR2(x)
#ifndef FASTKD_CUDA_ARCHS
#define FASTKD_CUDA_ARCHS
#endif

namespace fastkd {

#if defined(FASTKD_WITH_CUDA)
// The CUDA implementations: argument checks (kd_rows.h), the device guard and the current
// stream, then the launchers of kd_cuda.cu.
namespace {

DType dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return kF32;
    case at::kBFloat16:
      return kBF16;
    case at::kHalf:
      return kF16;
    default:
      TORCH_CHECK(false, "fastkd: the CUDA kernel takes float32, bfloat16 or float16, got ", t);
  }
  return kF32;  // not reached
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> kd_rows_cuda(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
    const std::optional<at::Tensor>& grad, const at::Tensor& grad_scale, int64_t divergence,
    double temperature, double param, std::optional<double> softcap, double kd_grad_coef,
    double ce_weight, int64_t ignore_index) {
  TORCH_CHECK(student.is_cuda(), "fastkd::kd_rows (CUDA): student must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(student.device());
  const KdRowsCall call =
      prepare_kd_rows(student, teacher, labels, grad, grad_scale, divergence, temperature,
                      param, softcap, kd_grad_coef, ce_weight, ignore_index);
  KdRowsLaunch args{};
  args.s = call.student.data_ptr();
  args.t = call.teacher.data_ptr();
  args.g = call.p.compute_grad ? call.grad.data_ptr() : nullptr;
  args.s_stride = call.student.stride(0);
  args.t_stride = call.teacher.stride(0);
  args.g_stride = call.p.compute_grad ? call.grad.stride(0) : 0;
  args.s_dtype = dtype_code(call.student.scalar_type());
  args.t_dtype = dtype_code(call.teacher.scalar_type());
  args.labels = call.p.has_labels ? call.labels.data_ptr<int64_t>() : nullptr;
  args.grad_scale = call.grad_scale.data_ptr<float>();
  args.kd_out = call.kd_rows.data_ptr<float>();
  args.ce_out = call.ce_rows.data_ptr<float>();
  args.p = call.p;
  C10_CUDA_CHECK(launch_kd_rows(args, c10::cuda::getCurrentCUDAStream()));
  return {call.kd_rows, call.ce_rows};
}

void scale_rows_cuda(at::Tensor& grad, const at::Tensor& factor) {
  TORCH_CHECK(grad.is_cuda(), "fastkd::scale_rows_ (CUDA): grad must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(grad.device());
  const at::Tensor f = prepare_scale_factor(grad, factor);
  C10_CUDA_CHECK(launch_scale_rows(grad.data_ptr(), dtype_code(grad.scalar_type()),
                                   grad.stride(0), f.data_ptr<float>(),
                                   f.dim() == 0 ? 0 : f.stride(0), grad.size(0), grad.size(1),
                                   c10::cuda::getCurrentCUDAStream()));
}
#endif

pybind11::dict build_info() {
  pybind11::dict info;
  info["torch_version"] = TORCH_VERSION;  // the torch these ops were compiled against
#if defined(FASTKD_WITH_CUDA)
  info["cuda_kernels"] = true;
  info["cuda_version"] = std::to_string(CUDART_VERSION / 1000) + "." +
                         std::to_string(CUDART_VERSION % 1000 / 10);
  info["cuda_archs"] = FASTKD_STR(FASTKD_CUDA_ARCHS);
#else
  info["cuda_kernels"] = false;
  info["cuda_version"] = pybind11::none();
  info["cuda_archs"] = "";
#endif
#if defined(__clang__)
  info["compiler"] = "clang " __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = "gcc " __VERSION__;
#else
  info["compiler"] = "unknown";
#endif
  return info;
}

}  // namespace fastkd

TORCH_LIBRARY_FRAGMENT(fastkd, m) {
  m.set_python_module("fastkd._extension");
  // The row kernel (kd_rows.h): per-row KD and CE losses in float32, and when grad is given,
  // grad_scale * dL/dstudent written into it (grad may be the student itself).
  m.def(
      "kd_rows(Tensor student, Tensor teacher, Tensor? labels, Tensor(a!)? grad, "
      "Tensor grad_scale, int divergence, float temperature, float param, float? softcap, "
      "float kd_grad_coef, float ce_weight, int ignore_index) -> (Tensor, Tensor)");
  // grad (N, V) *= factor (0-d, or one value per row), rows whose factor is 1 untouched.
  m.def("scale_rows_(Tensor(a!) grad, Tensor factor) -> ()");
}

#if defined(FASTKD_WITH_CUDA)
TORCH_LIBRARY_IMPL(fastkd, CUDA, m) {
  m.impl("kd_rows", &fastkd::kd_rows_cuda);
  m.impl("scale_rows_", &fastkd::scale_rows_cuda);
}
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastkd compiled ops: fastkd::kd_rows and fastkd::scale_rows_";
  m.def("build_info", &fastkd::build_info, "What this build of fastkd._C holds.");
}
