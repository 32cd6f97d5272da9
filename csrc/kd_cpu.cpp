// CPU row kernel of KDLoss: design.md §3 (how the kernels work) on CPU threads, with §2's
// precision. The formulas of §1 and of the passes are kd_math.h's; this file walks the rows
// in float32 at::vec::Vectorized arithmetic (rows in parallel, at::parallel_for) and keeps
// the exponentials of pass 1 for the later passes.
//
// setup.py compiles this file once per instruction set (AVX512, AVX2 on x86-64; the baseline
// elsewhere) into its own module fastkd._C_cpu_<isa>, because at::vec picks its vector width
// at compile time. The module holds no torch op: it hands its kernels (kd_params.h:CpuKernels)
// to fastkd._C, whose CPU implementations of the ops call them; fastkd/_extension.py imports
// the best module the machine runs and connects it.
//
// Pass plan, per row (a thread owns a group of rows and a few V-long float32 scratch rows,
// which live in its L2 cache, not in an N x V buffer):
//   pass 1  online softmax over chunks of kChunk entries: the chunk's maximum updates the
//           running maximum once, then e = exp(x - max) is summed and kept in scratch with
//           the chunk's shift, for a = s/T, b = t/T (and s at T = 1 when CE is on and T != 1).
//           forward_kl, soft_ce and reverse_kl carry their cross term (kd_math.h:cross_term):
//           the loss is known here (loss_from_pass1).
//   pass 2  (jsd, skew KLs, tvd only) the loss terms and S = sum_k q_k h_k (kd_math.h:
//           pointwise); q_k h_k is kept.
//   grad    dL/ds_j (kd_math.h:grad_entry) from the kept exponentials: q_j = e_j *
//           exp(shift - m - log z), no exp per entry.
// So forward_kl costs two exps per entry and jsd three (and a log1p series), against four
// and eight in the recomputing GPU plan; the price is a few V-long float rows per thread.
#include <Python.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "kd_cpu_vec.h"
#include "kd_math.h"
#include "kd_params.h"

namespace fastkd {
namespace {

// A row's running log-sum-exp (design.md §3) and the shift each chunk's kept exponentials
// were taken against. Rows reuse it (no allocation per row).
struct OnlineLse {
  float max = kNegInf;
  float sum = 0.0f;
  std::vector<float> shifts;
  RowLse row{};  // after finish()

  void reset() {
    max = kNegInf;
    sum = 0.0f;
    shifts.clear();
  }
  LseStep step(float chunk_max) {
    const LseStep st = lse_step(max, chunk_max);
    sum *= st.rescale;
    shifts.push_back(st.shift);
    return st;
  }
  void finish() { row = row_lse(max, sum); }
  // Chunk c's kept exponentials exp(x - shift_c), times this, are the probabilities: no exp
  // per entry after pass 1.
  float to_prob(int64_t c) const { return Ops<float>::exp(log_softmax(shifts[c], row)); }
};

// One thread's scratch rows, V floats each, and its running log-sum-exps.
struct Scratch {
  std::vector<float> s, t;    // the rows in float32, soft-capped (when the input isn't that)
  std::vector<float> ea, eb;  // kept exp(a - shift), exp(b - shift); eb then holds q_k h_k
  std::vector<float> es;      // kept exp(s - shift) for CE at T != 1
  OnlineLse lse_a, lse_b, lse_s;
  explicit Scratch(int64_t V) : ea(V), eb(V) {}
};

struct RowPointers {
  const char* s;
  const char* t;
  char* g;
  int64_t s_stride, t_stride, g_stride;  // in bytes
  DType s_dtype, t_dtype;
  int64_t s_elem, t_elem;
};

template <int DIV>
void kd_row(const KdRowsParams& p, const RowPointers& ptr, const int64_t* labels,
            float reduction_factor, int64_t row, Scratch& sc, float* kd_per_row,
            float* ce_per_row) {
  const int64_t V = p.V;
  char* g_row = p.compute_grad ? ptr.g + row * ptr.g_stride : nullptr;
  const int64_t label = p.has_labels ? labels[row] : -1;
  if (p.has_labels && label == p.ignore_index) {
    kd_per_row[row] = 0.0f;  // ce_per_row is zero-initialised
    if (g_row) std::memset(g_row, 0, V * ptr.s_elem);
    return;
  }
  const float* s = float_row(ptr.s + row * ptr.s_stride, ptr.s_dtype, p, sc.s);
  const float* t = float_row(ptr.t + row * ptr.t_stride, ptr.t_dtype, p, sc.t);
  // CE at temperature 1: when T == 1 it is the student's own softmax, already in ea.
  const bool ce_own = p.has_ce && p.inv_t != 1.0f;
  if (ce_own) sc.es.resize(V);
  // Read before the gradient pass, which may overwrite the student row.
  const float s_label = p.has_ce ? s[std::clamp<int64_t>(label, 0, V - 1)] : 0.0f;

  // Pass 1.
  const Vec inv_t(p.inv_t);
  OnlineLse& lse_a = sc.lse_a;
  OnlineLse& lse_b = sc.lse_b;
  OnlineLse& lse_s = sc.lse_s;
  lse_a.reset();
  lse_b.reset();
  lse_s.reset();
  float cross = 0.0f;  // kd_math.h: cross_term
  for (int64_t lo = 0; lo < V; lo += kChunk) {
    const int64_t n = std::min(kChunk, V - lo);
    const float s_max = max_of(s + lo, n);
    const float z_side_old = cross_side<DIV>(lse_a.sum, lse_b.sum);
    const LseStep step_a = lse_a.step(s_max * p.inv_t);
    const LseStep step_b = lse_b.step(max_of(t + lo, n) * p.inv_t);
    const float shift_s = ce_own ? lse_s.step(s_max).shift : 0.0f;
    if constexpr (one_pass_loss(DIV)) cross = rebase_cross<DIV>(cross, z_side_old, step_a, step_b);
    const Vec sh_a(step_a.shift), sh_b(step_b.shift), sh_s(shift_s);
    Vec sum_a(0.0f), sum_b(0.0f), sum_s(0.0f), acc_cross(0.0f);
    float* ea = sc.ea.data() + lo;
    float* eb = sc.eb.data() + lo;
    for_each_vec(n, [&](int64_t j, int64_t cnt) {
      // The next chunk streams in from memory while this one is in exp: without it the
      // chunk's max loop waits on memory and the exp loop on the ALUs, one after the other.
      __builtin_prefetch(s + lo + j + kChunk);
      __builtin_prefetch(t + lo + j + kChunk);
      const Vec sv = load(s + lo + j, cnt, kNegInf);
      const Vec a = sv * inv_t;
      const Vec b = load(t + lo + j, cnt, kNegInf) * inv_t;
      const Vec a_rel = a - sh_a;
      const Vec b_rel = b - sh_b;
      const Vec e_a = Ops<Vec>::exp(a_rel);
      const Vec e_b = Ops<Vec>::exp(b_rel);
      e_a.store(ea + j, cnt);
      e_b.store(eb + j, cnt);
      sum_a += e_a;
      sum_b += e_b;
      if constexpr (one_pass_loss(DIV)) acc_cross += cross_term<DIV>(a_rel, b_rel, e_a, e_b);
      if (ce_own) {
        const Vec e_s = Ops<Vec>::exp(sv - sh_s);
        e_s.store(sc.es.data() + lo + j, cnt);
        sum_s += e_s;
      }
    });
    lse_a.sum += hsum(sum_a);
    lse_b.sum += hsum(sum_b);
    if (ce_own) lse_s.sum += hsum(sum_s);
    if constexpr (one_pass_loss(DIV)) cross += hsum(acc_cross);
  }
  lse_a.finish();
  lse_b.finish();
  if (ce_own) lse_s.finish();
  const RowLse& row_a = lse_a.row;
  const RowLse& row_b = lse_b.row;

  RowSums sums;
  if constexpr (one_pass_loss(DIV)) {
    sums = loss_from_pass1<DIV>(cross, row_a, row_b);
  } else {
    // Pass 2: the loss terms and q_k h_k, kept in eb for the gradient pass.
    Pass2Sums<DIV, Vec> acc;
    for (int64_t lo = 0, c = 0; lo < V; lo += kChunk, ++c) {
      const int64_t n = std::min(kChunk, V - lo);
      const Vec to_q(lse_a.to_prob(c)), to_p(lse_b.to_prob(c));
      const float* ea = sc.ea.data() + lo;
      float* eb = sc.eb.data() + lo;
      for_each_vec(n, [&](int64_t j, int64_t cnt) {
        // Past cnt: -inf logits and zero probabilities, whose terms are 0.
        const Vec a = load(s + lo + j, cnt, kNegInf) * inv_t;
        const Vec b = load(t + lo + j, cnt, kNegInf) * inv_t;
        const Vec q = load(ea + j, cnt, 0.0f) * to_q;
        const Vec pr = load(eb + j, cnt, 0.0f) * to_p;
        const Terms<Vec> terms =
            pointwise<DIV>(log_softmax(b, row_b), log_softmax(a, row_a), pr, q,
                           log_ratio(a, b, row_a, row_b), p.mix);
        acc.add(terms);
        terms.qh.store(eb + j, cnt);
      });
    }
    sums = {hsum(acc.kd), hsum(acc.qh), hsum(acc.q_above), hsum(acc.q_below)};
  }
  const float no_distribution = nan_unless_distributions(row_a.z, row_b.z);
  kd_per_row[row] = sums.kd + no_distribution;
  if (p.has_ce) ce_per_row[row] = ce_loss(ce_own ? lse_s.row : row_a, s_label);
  if (!g_row) return;

  // The gradient, written as it is made, chunk by chunk.
  const RowGrad grad =
      row_grad(sums, no_distribution, reduction_factor, p.kd_grad_coef, p.ce_weight);
  const bool direct = ptr.s_dtype == kF32;  // else via ea, then converted
  const Vec iota = [] {
    alignas(64) float idx[kVec];
    for (int64_t k = 0; k < kVec; ++k) idx[k] = static_cast<float>(k);
    return Vec::loadu(idx);
  }();
  const Vec label_v(static_cast<float>(label));
  for (int64_t lo = 0, c = 0; lo < V; lo += kChunk, ++c) {
    const int64_t n = std::min(kChunk, V - lo);
    const Vec to_q(lse_a.to_prob(c)), to_p(lse_b.to_prob(c));
    const Vec to_sm(ce_own ? lse_s.to_prob(c) : 0.0f);
    float* ea = sc.ea.data() + lo;
    const float* eb = sc.eb.data() + lo;
    float* out = direct ? reinterpret_cast<float*>(g_row) + lo : ea;
    for_each_vec(n, [&](int64_t j, int64_t cnt) {
      const Vec q = load(ea + j, cnt, 0.0f) * to_q;
      Vec qh;
      if constexpr (one_pass_loss(DIV)) {
        // Recomputed: the log-probabilities are dead code for forward_kl and soft_ce.
        const Vec a = load(s + lo + j, cnt, kNegInf) * inv_t;
        const Vec b = load(t + lo + j, cnt, kNegInf) * inv_t;
        const Vec pr = load(eb + j, cnt, 0.0f) * to_p;
        qh = pointwise<DIV>(log_softmax(b, row_b), log_softmax(a, row_a), pr, q,
                            log_ratio(a, b, row_a, row_b), p.mix)
                 .qh;
      } else {
        qh = load(eb + j, cnt, 0.0f);
      }
      const auto ce = [&] {
        // A named local (not a member initialiser): GCC then versions the loop on ce_own
        // and contracts its multiply-adds as grad_entry's comment says.
        const Vec softmax = ce_own ? load(sc.es.data() + lo + j, cnt, 0.0f) * to_sm : q;
        const Vec index = iota + Vec(static_cast<float>(lo + j));
        return CeEntry<Vec>{softmax, Vec::blendv(Vec(0.0f), Vec(1.0f), index == label_v)};
      };
      const auto s_capped = [&] { return load(s + lo + j, cnt, 0.0f); };
      grad_entry<DIV>(p, grad, qh, q, ce, s_capped).store(out + j, cnt);
    });
    if (!direct) row_from_float(ea, ptr.s_dtype, g_row + lo * ptr.s_elem, n);
  }
}

using RowFn = void (*)(const KdRowsParams&, const RowPointers&, const int64_t*, float, int64_t,
                       Scratch&, float*, float*);

template <int... DIVS>
constexpr std::array<RowFn, sizeof...(DIVS)> row_table(std::integer_sequence<int, DIVS...>) {
  return {&kd_row<DIVS>...};
}

void kd_rows_cpu(const KdRowsLaunch& args) {
  const KdRowsParams& p = args.p;
  if (p.n_rows == 0) return;
  RowPointers ptr{};
  ptr.s = static_cast<const char*>(args.s);
  ptr.t = static_cast<const char*>(args.t);
  ptr.g = static_cast<char*>(args.g);
  ptr.s_dtype = args.s_dtype;
  ptr.t_dtype = args.t_dtype;
  ptr.s_elem = elem_size(args.s_dtype);
  ptr.t_elem = elem_size(args.t_dtype);
  ptr.s_stride = args.s_stride * ptr.s_elem;
  ptr.t_stride = args.t_stride * ptr.t_elem;
  ptr.g_stride = args.g_stride * ptr.s_elem;
  const float reduction_factor = *args.reduction_factor;

  static constexpr auto table = row_table(std::make_integer_sequence<int, kNumDivergences>{});
  const RowFn fn = table[p.divergence];
  // About 32k entries per task, so a handful of short rows is not split across threads.
  const int64_t grain = std::max<int64_t>(1, 32768 / p.V);
  at::parallel_for(0, p.n_rows, grain, [&](int64_t begin, int64_t end) {
    Scratch scratch(p.V);
    for (int64_t row = begin; row < end; ++row) {
      fn(p, ptr, args.labels, reduction_factor, row, scratch, args.kd_per_row, args.ce_per_row);
    }
  });
}

// grad[row] *= grad_output[row * grad_output_stride] (the backward), skipping rows whose
// grad_output is 1: the usual backward of a scalar loss then touches no memory.
void scale_rows_cpu(void* grad, DType dtype, int64_t stride, const float* grad_output,
                    int64_t grad_output_stride, int64_t n_rows, int64_t V) {
  if (n_rows == 0) return;
  char* base = static_cast<char*>(grad);
  const int64_t elem = elem_size(dtype);
  const int64_t grain = std::max<int64_t>(1, 32768 / V);
  at::parallel_for(0, n_rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(std::min(kChunk, V));
    for (int64_t row = begin; row < end; ++row) {
      const float go = grad_output[row * grad_output_stride];
      if (go == 1.0f) continue;
      const Vec go_v(go);
      char* g = base + row * stride * elem;
      for (int64_t lo = 0; lo < V; lo += kChunk) {
        const int64_t n = std::min(kChunk, V - lo);
        row_to_float(g + lo * elem, dtype, buf.data(), n);
        for_each_vec(n, [&](int64_t j, int64_t c) {
          (Vec::loadu(buf.data() + j, c) * go_v).store(buf.data() + j, c);
        });
        row_from_float(buf.data(), dtype, g + lo * elem, n);
      }
    }
  });
}

}  // namespace
}  // namespace fastkd

// A Python module holding the table of its kernels, as a PyCapsule named "kernels", and
// its instruction set, as "isa". FASTKD_CPU_MODULE (e.g. _C_cpu_avx2) and FASTKD_CPU_ISA
// come from setup.py.
#define FASTKD_STR2(x) #x
#define FASTKD_STR(x) FASTKD_STR2(x)
#define FASTKD_CAT2(a, b) a##b
#define FASTKD_CAT(a, b) FASTKD_CAT2(a, b)

namespace {
const fastkd::CpuKernels kKernels = {
    fastkd::kCpuKernelsAbi,      FASTKD_STR(FASTKD_CPU_ISA),  &fastkd::kd_rows_cpu,
    &fastkd::scale_rows_cpu,     &fastkd::topk_row_stats_cpu, &fastkd::topk_grad_rows_cpu,
    &fastkd::kd_shard_rows_cpu};
}  // namespace

PyMODINIT_FUNC FASTKD_CAT(PyInit_, FASTKD_CPU_MODULE)(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, FASTKD_STR(FASTKD_CPU_MODULE),
                            "fastkd's CPU kernels for one instruction set", -1, nullptr};
  PyObject* module = PyModule_Create(&def);
  if (module == nullptr) return nullptr;
  PyObject* capsule = PyCapsule_New(const_cast<fastkd::CpuKernels*>(&kKernels),
                                    fastkd::kCpuKernelsCapsule, nullptr);
  if (capsule == nullptr || PyModule_AddObject(module, "kernels", capsule) < 0 ||
      PyModule_AddStringConstant(module, "isa", kKernels.isa) < 0) {
    Py_XDECREF(capsule);
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
