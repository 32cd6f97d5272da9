// fastkd._C: the ops fastkd::kd_rows and fastkd::scale_rows_, the top-k rows' ops
// fastkd::topk_row_stats and fastkd::topk_grad_rows (schemas, CPU and CUDA implementations),
// the vocab-parallel shards' fastkd::kd_shard_rows (CPU), and build_info(). This is the torch
// side of the kernels: it checks the arguments (kd_rows.h, kd_topk_rows.h), allocates the
// outputs, picks the stream, and calls the torch-free kernels of kd_cpu.cpp, kd_topk_cpu.cpp
// and kd_shard_cpu.cpp (through the table the
// fastkd._C_cpu_<isa> module hands over, set_cpu_kernels) and kd_cuda.cu, kd_topk_cuda.cu.
//
// The ops live in the `fastkd` namespace beside the Python custom ops of fastkd/_ops.py
// (torch.library.custom_op("fastkd::kd_loss") is a fragment too), so this library is a
// TORCH_LIBRARY_FRAGMENT: either side may register first. Their fake (meta) implementations
// are in fastkd/_extension.py.
#include <pybind11/pybind11.h>
#include <torch/library.h>
#include <torch/version.h>

#include <atomic>

#include "kd_params.h"
#include "kd_rows.h"
#include "kd_topk_rows.h"

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
      TORCH_CHECK(false, "fastkd: the kernels take float32, bfloat16 or float16, got ", t);
  }
  return kF32;  // not reached
}

KdRowsLaunch make_launch(const KdRowsCall& call) {
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
  args.reduction_factor = call.reduction_factor.data_ptr<float>();
  args.kd_per_row = call.kd_per_row.data_ptr<float>();
  args.ce_per_row = call.ce_per_row.data_ptr<float>();
  args.p = call.p;
  return args;
}

TopKStatsLaunch make_stats_launch(const TopKCall& call, bool tail, bool ce) {
  TopKStatsLaunch args{};
  args.s = call.student.data_ptr();
  args.s_stride = call.student.stride(0);
  args.s_dtype = dtype_code(call.student.scalar_type());
  args.ids = call.ids.data_ptr<int64_t>();
  args.labels = call.labels.defined() ? call.labels.data_ptr<int64_t>() : nullptr;
  args.stats = call.stats.data_ptr<float>();
  args.tail = tail;
  args.ce = ce;
  args.p = call.p;
  return args;
}

TopKGradLaunch make_grad_launch(const TopKCall& call) {
  TopKGradLaunch args{};
  args.s = call.student.data_ptr();
  args.g = call.grad.data_ptr();
  args.s_stride = call.student.stride(0);
  args.g_stride = call.grad.stride(0);
  args.s_dtype = dtype_code(call.student.scalar_type());
  args.ids = call.ids.data_ptr<int64_t>();
  args.s_at_ids = call.student_at_ids.data_ptr();
  args.s_at_ids_dtype = dtype_code(call.student_at_ids.scalar_type());
  args.labels = call.labels.defined() ? call.labels.data_ptr<int64_t>() : nullptr;
  args.stats = call.stats.data_ptr<float>();
  args.row_coefs = call.row_coefs.data_ptr<float>();
  args.pair_grads = call.pair_grads.data_ptr<float>();
  args.p = call.p;
  return args;
}

// --- CPU ---------------------------------------------------------------------------------

std::atomic<const CpuKernels*> cpu_kernels{nullptr};

const CpuKernels& loaded_cpu_kernels() {
  const CpuKernels* kernels = cpu_kernels.load();
  TORCH_CHECK(kernels != nullptr,
              "fastkd: no CPU kernel module is loaded (fastkd._C_cpu_<isa>); import fastkd, "
              "or rebuild with `pip install --no-build-isolation -e .`");
  return *kernels;
}

void set_cpu_kernels(pybind11::capsule capsule) {
  auto* kernels = static_cast<const CpuKernels*>(
      PyCapsule_GetPointer(capsule.ptr(), kCpuKernelsCapsule));
  if (kernels == nullptr) throw pybind11::error_already_set();
  TORCH_CHECK(kernels->abi == kCpuKernelsAbi, "fastkd: the CPU kernel module (", kernels->isa,
              ") was built from other sources than fastkd._C; rebuild both");
  cpu_kernels.store(kernels);
}

std::tuple<at::Tensor, at::Tensor> kd_rows_cpu(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
    const std::optional<at::Tensor>& grad, const at::Tensor& reduction_factor,
    int64_t divergence, double temperature, double mix_weight, std::optional<double> softcap,
    double kd_grad_coef, double ce_weight, int64_t ignore_index) {
  const CpuKernels& kernels = loaded_cpu_kernels();
  const KdRowsCall call =
      prepare_kd_rows(student, teacher, labels, grad, reduction_factor, divergence,
                      temperature, mix_weight, softcap, kd_grad_coef, ce_weight, ignore_index);
  // The gradient pass finds the label's entry by comparing float32 indices: exact to 2^24.
  TORCH_CHECK(!call.p.has_ce || call.p.V <= (int64_t{1} << 24),
              "fastkd::kd_rows (CPU): hard-label CE takes V <= 2^24, got ", call.p.V);
  kernels.kd_rows(make_launch(call));
  return {call.kd_per_row, call.ce_per_row};
}

// One phase of a vocab-parallel shard (kd_params.h: KdShardLaunch; the contract is
// fastkd/_vocab_parallel.py's docstring): the (n, kNumShardStats) statistics, the (n,
// kNumShardTerms) terms, or the gradient written into grad (an empty tensor returned).
at::Tensor kd_shard_rows_cpu(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
    const std::optional<at::Tensor>& grad, const std::optional<at::Tensor>& consts,
    int64_t phase, int64_t offset, int64_t divergence, double temperature, double mix_weight,
    std::optional<double> softcap, double kd_grad_coef, double ce_weight, int64_t ignore_index) {
  const CpuKernels& kernels = loaded_cpu_kernels();
  TORCH_CHECK(phase == kShardStats || phase == kShardTerms || phase == kShardGrad,
              "fastkd::kd_shard_rows: unknown phase ", phase);
  const bool wants_grad = phase == kShardGrad;
  TORCH_CHECK(wants_grad == (grad.has_value() && grad->defined()),
              "fastkd::kd_shard_rows: grad is given with the gradient phase, and only then");
  const KdRowsCall call = prepare_kd_rows(
      student, teacher, labels, grad, at::zeros({}, student.options().dtype(at::kFloat)),
      divergence, temperature, mix_weight, softcap, kd_grad_coef, ce_weight, ignore_index);
  // The gradient phase finds the label's entry by comparing float32 indices: exact to 2^24.
  TORCH_CHECK(!call.p.has_ce || call.p.V <= (int64_t{1} << 24),
              "fastkd::kd_shard_rows: hard-label CE takes V <= 2^24, got ", call.p.V);
  KdShardLaunch args{};
  at::Tensor constants;
  if (phase != kShardStats) {
    TORCH_CHECK(consts.has_value() && consts->defined(),
                "fastkd::kd_shard_rows: the terms and gradient phases take consts");
    TORCH_CHECK(consts->dim() == 2 && consts->size(0) == call.p.n_rows &&
                    consts->size(1) == kNumShardConsts && consts->scalar_type() == at::kFloat,
                "fastkd::kd_shard_rows: consts must be float32 (", call.p.n_rows, ", ",
                int{kNumShardConsts}, "), got ", consts->scalar_type(), " ", consts->sizes());
    constants = consts->contiguous();
    args.consts = constants.data_ptr<float>();
  }
  const int64_t columns = phase == kShardStats ? kNumShardStats
                          : phase == kShardTerms ? kNumShardTerms
                                                 : 0;
  at::Tensor out = at::zeros({wants_grad ? 0 : call.p.n_rows, columns},
                             student.options().dtype(at::kFloat));
  args.s = call.student.data_ptr();
  args.t = call.teacher.data_ptr();
  args.g = wants_grad ? call.grad.data_ptr() : nullptr;
  args.s_stride = call.student.stride(0);
  args.t_stride = call.teacher.stride(0);
  args.g_stride = wants_grad ? call.grad.stride(0) : 0;
  args.s_dtype = dtype_code(call.student.scalar_type());
  args.t_dtype = dtype_code(call.teacher.scalar_type());
  args.labels = call.p.has_labels ? call.labels.data_ptr<int64_t>() : nullptr;
  args.offset = offset;
  args.out = wants_grad ? nullptr : out.data_ptr<float>();
  args.phase = static_cast<int>(phase);
  args.p = call.p;
  kernels.kd_shard_rows(args);
  return out;
}

void scale_rows_cpu(at::Tensor& grad, const at::Tensor& grad_output) {
  const CpuKernels& kernels = loaded_cpu_kernels();
  const at::Tensor go = prepare_grad_output(grad, grad_output).contiguous();
  kernels.scale_rows(grad.data_ptr(), dtype_code(grad.scalar_type()), grad.stride(0),
                     go.data_ptr<float>(), go.dim() == 0 ? 0 : 1, grad.size(0), grad.size(1));
}

at::Tensor topk_row_stats_cpu(const at::Tensor& student, const at::Tensor& ids,
                              const std::optional<at::Tensor>& labels, double temperature,
                              std::optional<double> softcap, bool tail, bool ce,
                              int64_t ignore_index) {
  const CpuKernels& kernels = loaded_cpu_kernels();
  const TopKCall call =
      prepare_topk_row_stats(student, ids, labels, temperature, softcap, ignore_index);
  kernels.topk_row_stats(make_stats_launch(call, tail, ce));
  return call.stats;
}

void topk_grad_rows_cpu(const at::Tensor& student, const at::Tensor& ids,
                        const at::Tensor& student_at_ids, const std::optional<at::Tensor>& labels,
                        const at::Tensor& stats, const at::Tensor& row_coefs,
                        const at::Tensor& pair_grads, at::Tensor& grad, double temperature,
                        std::optional<double> softcap, int64_t ignore_index) {
  const CpuKernels& kernels = loaded_cpu_kernels();
  const TopKCall call =
      prepare_topk_grad_rows(student, ids, student_at_ids, labels, stats, row_coefs,
                             pair_grads, grad, temperature, softcap, ignore_index);
  kernels.topk_grad_rows(make_grad_launch(call));
}

// --- CUDA --------------------------------------------------------------------------------

#if defined(FASTKD_WITH_CUDA)
std::tuple<at::Tensor, at::Tensor> kd_rows_cuda(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
    const std::optional<at::Tensor>& grad, const at::Tensor& reduction_factor,
    int64_t divergence, double temperature, double mix_weight, std::optional<double> softcap,
    double kd_grad_coef, double ce_weight, int64_t ignore_index) {
  TORCH_CHECK(student.is_cuda(), "fastkd::kd_rows (CUDA): student must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(student.device());
  const KdRowsCall call =
      prepare_kd_rows(student, teacher, labels, grad, reduction_factor, divergence,
                      temperature, mix_weight, softcap, kd_grad_coef, ce_weight, ignore_index);
  C10_CUDA_CHECK(launch_kd_rows(make_launch(call), c10::cuda::getCurrentCUDAStream()));
  return {call.kd_per_row, call.ce_per_row};
}

void scale_rows_cuda(at::Tensor& grad, const at::Tensor& grad_output) {
  TORCH_CHECK(grad.is_cuda(), "fastkd::scale_rows_ (CUDA): grad must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(grad.device());
  const at::Tensor go = prepare_grad_output(grad, grad_output);
  C10_CUDA_CHECK(launch_scale_rows(grad.data_ptr(), dtype_code(grad.scalar_type()),
                                   grad.stride(0), go.data_ptr<float>(),
                                   go.dim() == 0 ? 0 : go.stride(0), grad.size(0), grad.size(1),
                                   c10::cuda::getCurrentCUDAStream()));
}

// In-row indices of the CUDA kernels are 32-bit, with room for a team's last stride.
void check_cuda_vocab(const char* op, int64_t V) {
  TORCH_CHECK(V <= kMaxCudaVocab, op, " (CUDA): V must be <= ", kMaxCudaVocab, ", got ", V);
}

at::Tensor topk_row_stats_cuda(const at::Tensor& student, const at::Tensor& ids,
                               const std::optional<at::Tensor>& labels, double temperature,
                               std::optional<double> softcap, bool tail, bool ce,
                               int64_t ignore_index) {
  constexpr const char* op = "fastkd::topk_row_stats";
  TORCH_CHECK(student.is_cuda(), op, " (CUDA): student must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(student.device());
  const TopKCall call =
      prepare_topk_row_stats(student, ids, labels, temperature, softcap, ignore_index);
  check_cuda_vocab(op, call.p.V);
  if (tail) {
    // The tail's membership bitmap (kd_topk_cuda.cu) lives in a block's shared memory.
    const int64_t bytes = topk_bitmap_bytes(call.p.V);
    int limit = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                          student.get_device()));
    TORCH_CHECK(bytes <= limit, op, " (CUDA) with the tail: its membership bitmap of V = ",
                call.p.V, " bits needs ", bytes, " bytes of shared memory per block, this ",
                "device allows ", limit, " (V <= ", int64_t{limit} * 8, ")");
  }
  C10_CUDA_CHECK(
      launch_topk_row_stats(make_stats_launch(call, tail, ce), c10::cuda::getCurrentCUDAStream()));
  return call.stats;
}

void topk_grad_rows_cuda(const at::Tensor& student, const at::Tensor& ids,
                         const at::Tensor& student_at_ids,
                         const std::optional<at::Tensor>& labels, const at::Tensor& stats,
                         const at::Tensor& row_coefs, const at::Tensor& pair_grads,
                         at::Tensor& grad, double temperature, std::optional<double> softcap,
                         int64_t ignore_index) {
  constexpr const char* op = "fastkd::topk_grad_rows";
  TORCH_CHECK(student.is_cuda(), op, " (CUDA): student must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(student.device());
  const TopKCall call =
      prepare_topk_grad_rows(student, ids, student_at_ids, labels, stats, row_coefs,
                             pair_grads, grad, temperature, softcap, ignore_index);
  check_cuda_vocab(op, call.p.V);
  C10_CUDA_CHECK(launch_topk_grad_rows(make_grad_launch(call), c10::cuda::getCurrentCUDAStream()));
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
  const CpuKernels* kernels = cpu_kernels.load();
  info["cpu_kernel"] = kernels ? pybind11::cast(kernels->isa) : pybind11::none();
  return info;
}

}  // namespace
}  // namespace fastkd

TORCH_LIBRARY_FRAGMENT(fastkd, m) {
  m.set_python_module("fastkd._extension");
  // The row kernel (kd_rows.h): per-row KD and CE losses in float32 (kd_per_row,
  // ce_per_row), and when grad is given, reduction_factor * dL/dstudent written into it (grad
  // may be the student itself). fastkd/_extension.py calls both ops positionally.
  m.def(
      "kd_rows(Tensor student, Tensor teacher, Tensor? labels, Tensor(a!)? grad, "
      "Tensor reduction_factor, int divergence, float temperature, float mix_weight, "
      "float? softcap, float kd_grad_coef, float ce_weight, int ignore_index) -> (Tensor, Tensor)");
  // The backward: grad (N, V) *= grad_output (0-d, or one value per row), rows whose
  // grad_output is 1 untouched.
  m.def("scale_rows_(Tensor(a!) grad, Tensor grad_output) -> ()");
  // The top-k rows (kd_topk_rows.h; the contract is fastkd/_topk_rows.py's docstring): a
  // row's stats (n, 5) float32, and its gradient written into grad (which may be the student
  // itself). fastkd/_compiled_rows.py calls both positionally.
  m.def(
      "topk_row_stats(Tensor student, Tensor ids, Tensor? labels, float temperature, "
      "float? softcap, bool tail, bool ce, int ignore_index) -> Tensor");
  m.def(
      "topk_grad_rows(Tensor student, Tensor ids, Tensor student_at_ids, Tensor? labels, "
      "Tensor stats, Tensor row_coefs, Tensor pair_grads, Tensor(a!) grad, float temperature, "
      "float? softcap, int ignore_index) -> ()");
  // A vocab-parallel shard's phase (kd_params.h: KdShardLaunch), CPU only:
  // fastkd/_vocab_parallel.py calls it positionally.
  m.def(
      "kd_shard_rows(Tensor student, Tensor teacher, Tensor? labels, Tensor(a!)? grad, "
      "Tensor? consts, int phase, int offset, int divergence, float temperature, "
      "float mix_weight, float? softcap, float kd_grad_coef, float ce_weight, "
      "int ignore_index) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  m.impl("kd_rows", &fastkd::kd_rows_cpu);
  m.impl("scale_rows_", &fastkd::scale_rows_cpu);
  m.impl("topk_row_stats", &fastkd::topk_row_stats_cpu);
  m.impl("topk_grad_rows", &fastkd::topk_grad_rows_cpu);
  m.impl("kd_shard_rows", &fastkd::kd_shard_rows_cpu);
}

#if defined(FASTKD_WITH_CUDA)
TORCH_LIBRARY_IMPL(fastkd, CUDA, m) {
  m.impl("kd_rows", &fastkd::kd_rows_cuda);
  m.impl("scale_rows_", &fastkd::scale_rows_cuda);
  m.impl("topk_row_stats", &fastkd::topk_row_stats_cuda);
  m.impl("topk_grad_rows", &fastkd::topk_grad_rows_cuda);
}
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() =
      "fastkd compiled ops: fastkd::kd_rows, fastkd::scale_rows_, fastkd::topk_row_stats, "
      "fastkd::topk_grad_rows and fastkd::kd_shard_rows";
  m.def("build_info", &fastkd::build_info, "What this build of fastkd._C holds.");
  m.def("set_cpu_kernels", &fastkd::set_cpu_kernels,
        "Installs the CPU kernels of a fastkd._C_cpu_<isa> module (its `kernels` capsule).");
}
