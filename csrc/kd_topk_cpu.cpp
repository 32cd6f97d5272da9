// CPU top-k row kernels (design.md §4): topk_row_stats and topk_grad_rows of the contract in
// fastkd/_topk_rows.py, on CPU threads in float32 at::vec::Vectorized arithmetic, rows in
// parallel (at::parallel_for). The formulas are kd_math.h's (topk_write_stats, TopKRowGrad);
// this file walks the rows in chunks of kChunk entries, converting bf16/fp16 and soft-capping
// one chunk at a time into L1-sized scratch, so a thread holds no V-long float row.
//
// Compiled into each fastkd._C_cpu_<isa> module beside kd_cpu.cpp, which puts these two
// functions in the module's CpuKernels table (kd_params.h).
//
//   stats  one pass: the online softmax of a = x / T (kd_math.h:lse_step once per chunk), one
//          exp per entry summed twice against the same shifts, into z_a and, for the entries
//          outside S, into z_out (the tail is summed, never z_a minus the mass of S, which
//          cancels when S holds nearly all of it); a second exp only for CE at T != 1. S is
//          a per-thread membership mask of V bytes, set at the row's ids and cleared after it.
//   grad   one pass writing g_j of the dense form (one exp per entry, a second for CE at
//          T != 1), then the label's entry with its one-hot and, last, the pairs' entries,
//          whose logits come from student_at_ids: the row may be written over the student.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "kd_cpu_vec.h"
#include "kd_math.h"
#include "kd_params.h"

namespace fastkd {
namespace {

// About 32k entries per task, so a handful of short rows is not split across threads.
int64_t row_grain(int64_t V) { return std::max<int64_t>(1, 32768 / V); }

// The float32, soft-capped entries [lo, lo + n) of a row: the row itself when it already is
// that, else converted into buf (kChunk floats).
const float* float_chunk(const char* row, DType dtype, int64_t lo, int64_t n,
                         const TopKParams& p, float* buf) {
  if (dtype == kF32 && !p.has_softcap) return reinterpret_cast<const float*>(row) + lo;
  row_to_float(row + lo * elem_size(dtype), dtype, buf, n);
  if (p.has_softcap) {
    for_each_vec(n, [&](int64_t j, int64_t c) {
      softcap(Vec::loadu(buf + j, c), p.cap, p.inv_cap).store(buf + j, c);
    });
  }
  return buf;
}

// Entry j of a row (or of student_at_ids), soft-capped, in float32.
float float_entry(const void* row, DType dtype, int64_t j, const TopKParams& p) {
  float x;
  switch (dtype) {
    case kF32:
      x = static_cast<const float*>(row)[j];
      break;
    case kBF16:
      x = static_cast<float>(static_cast<const c10::BFloat16*>(row)[j]);
      break;
    default:
      x = static_cast<float>(static_cast<const c10::Half*>(row)[j]);
  }
  return p.has_softcap ? softcap(x, p.cap, p.inv_cap) : x;
}

// row[j] = v rounded to the row's dtype (round to nearest even, as at::vec::convert).
void store_entry(void* row, DType dtype, int64_t j, float v) {
  switch (dtype) {
    case kF32:
      static_cast<float*>(row)[j] = v;
      return;
    case kBF16:
      static_cast<c10::BFloat16*>(row)[j] = c10::BFloat16(v);
      return;
    default:
      static_cast<c10::Half*>(row)[j] = c10::Half(v);
  }
}

// Whether any of the kVec mask bytes from m is set; the mask has kVec zero bytes past V, so
// a row's short last vector reads them too.
inline bool any_member(const uint8_t* m) {
  uint64_t words[(kVec + 7) / 8] = {};
  std::memcpy(words, m, kVec);
  uint64_t any = 0;
  for (uint64_t w : words) any |= w;
  return any != 0;
}

// The lanes of the kVec mask bytes from m that are outside S, as a Vec mask.
inline Vec outside_lanes(const uint8_t* m) {
  alignas(64) float flags[kVec];
  for (int64_t k = 0; k < kVec; ++k) flags[k] = m[k] ? 0.0f : 1.0f;
  return Vec::loadu(flags) > Vec(0.5f);
}

// --- topk_row_stats ---------------------------------------------------------------------------

void stats_row(const TopKStatsLaunch& args, int64_t row, float* xbuf, std::vector<uint8_t>& in_s) {
  const TopKParams& p = args.p;
  const int64_t V = p.V;
  float* out = args.stats + row * kNumTopKStats;
  if (args.labels && args.labels[row] == p.ignore_index) {
    std::fill(out, out + kNumTopKStats, 0.0f);
    return;
  }
  const int64_t* ids = args.ids + row * p.K;
  if (args.tail) {
    // Ids outside [0, V) are the caller's to exclude; skipped, never written out of bounds.
    for (int64_t k = 0; k < p.K; ++k) {
      if (ids[k] >= 0 && ids[k] < V) in_s[ids[k]] = 1;
    }
  }
  const char* s_row = static_cast<const char*>(args.s) +
                      row * args.s_stride * elem_size(args.s_dtype);
  const bool ce_own = args.ce && p.inv_t != 1.0f;  // else x's softmax is a's
  const Vec inv_t(p.inv_t);
  float max_a = kNegInf, z_a = 0.0f, z_out = 0.0f, max_s = kNegInf, z_s = 0.0f;
  for (int64_t lo = 0; lo < V; lo += kChunk) {
    const int64_t n = std::min(kChunk, V - lo);
    const float* x = float_chunk(s_row, args.s_dtype, lo, n, p, xbuf);
    const float x_max = max_of(x, n);
    // x_max * inv_t is the max of the a below: rounding is monotonic.
    const LseStep step_a = lse_step(max_a, x_max * p.inv_t);
    z_a *= step_a.rescale;
    z_out *= step_a.rescale;  // the same shifts: log_z_out is relative to m_a
    float shift_s = 0.0f;
    if (ce_own) {
      const LseStep step_s = lse_step(max_s, x_max);
      z_s *= step_s.rescale;
      shift_s = step_s.shift;
    }
    const Vec sh_a(step_a.shift), sh_s(shift_s);
    const uint8_t* mask = args.tail ? in_s.data() + lo : nullptr;
    Vec sum_a(0.0f), sum_out(0.0f), sum_s(0.0f);
    for_each_vec(n, [&](int64_t j, int64_t cnt) {
      const Vec xv = load(x + j, cnt, kNegInf);
      const Vec e = Ops<Vec>::exp(xv * inv_t - sh_a);
      sum_a += e;
      if (args.tail) {
        // Most vectors hold no id (K << V): the mask costs one load and test there.
        sum_out += any_member(mask + j) ? Ops<Vec>::select(outside_lanes(mask + j), e, Vec(0.0f))
                                        : e;
      }
      if (ce_own) sum_s += Ops<Vec>::exp(xv - sh_s);
    });
    z_a += hsum(sum_a);
    if (args.tail) z_out += hsum(sum_out);
    if (ce_own) z_s += hsum(sum_s);
  }
  topk_write_stats(out, max_a, z_a, z_out, max_s, z_s, args.tail, args.ce, ce_own);
  if (args.tail) {
    for (int64_t k = 0; k < p.K; ++k) {
      if (ids[k] >= 0 && ids[k] < V) in_s[ids[k]] = 0;
    }
  }
}

void topk_row_stats_cpu_impl(const TopKStatsLaunch& args) {
  const TopKParams& p = args.p;
  if (p.n_rows == 0) return;
  at::parallel_for(0, p.n_rows, row_grain(p.V), [&](int64_t begin, int64_t end) {
    std::vector<float> xbuf(std::min(kChunk, p.V));
    // S of the row at hand, kVec bytes longer than V for the last vector's reads.
    std::vector<uint8_t> in_s(args.tail ? p.V + kVec : 0, 0);
    for (int64_t row = begin; row < end; ++row) stats_row(args, row, xbuf.data(), in_s);
  });
}

// --- topk_grad_rows ---------------------------------------------------------------------------

void grad_row(const TopKGradLaunch& args, int64_t row, float* xbuf, float* gbuf) {
  const TopKParams& p = args.p;
  const int64_t V = p.V;
  const DType dt = args.s_dtype;
  const int64_t elem = elem_size(dt);
  const char* s_row = static_cast<const char*>(args.s) + row * args.s_stride * elem;
  char* g_row = static_cast<char*>(args.g) + row * args.g_stride * elem;
  const int64_t label = args.labels ? args.labels[row] : -1;
  if (args.labels && label == p.ignore_index) {
    std::memset(g_row, 0, V * elem);
    return;
  }
  const TopKRowGrad rg =
      topk_row_grad(args.stats + row * kNumTopKStats, args.row_coefs + row * kNumTopKCoefs,
                    p.inv_t, args.labels != nullptr);
  // The label's entry gets its one-hot after the dense pass; its logit is read before that
  // pass, which may write over the student row.
  const bool label_entry = rg.has_ce && label >= 0 && label < V;
  const float x_label = label_entry ? float_entry(s_row, dt, label, p) : 0.0f;

  const Vec inv_t(p.inv_t);
  const bool direct = dt == kF32;  // else via gbuf, then converted
  for (int64_t lo = 0; lo < V; lo += kChunk) {
    const int64_t n = std::min(kChunk, V - lo);
    const float* x = float_chunk(s_row, dt, lo, n, p, xbuf);
    float* out = direct ? reinterpret_cast<float*>(g_row) + lo : gbuf;
    for_each_vec(n, [&](int64_t j, int64_t cnt) {
      const Vec xv = load(x + j, cnt, 0.0f);
      topk_dense_grad(p, rg, xv * inv_t, xv, Vec(0.0f)).store(out + j, cnt);
    });
    if (!direct) row_from_float(gbuf, dt, g_row + lo * elem, n);
  }
  if (label_entry) {
    store_entry(g_row, dt, label, topk_dense_grad(p, rg, x_label * p.inv_t, x_label, 1.0f));
  }
  // The pairs last: their entries replace the dense form's (and the label's, when in S).
  const int64_t* ids = args.ids + row * p.K;
  const float* d = args.pair_grads + row * p.K;
  for (int64_t k = 0; k < p.K; ++k) {
    const int64_t id = ids[k];
    if (id < 0 || id >= V) continue;  // padding (ids >= V: the caller's to exclude)
    const float x = float_entry(args.s_at_ids, args.s_at_ids_dtype, row * p.K + k, p);
    const float onehot = id == label ? 1.0f : 0.0f;
    store_entry(g_row, dt, id, topk_pair_grad(p, rg, x * p.inv_t, x, d[k], onehot));
  }
}

void topk_grad_rows_cpu_impl(const TopKGradLaunch& args) {
  const TopKParams& p = args.p;
  if (p.n_rows == 0) return;
  at::parallel_for(0, p.n_rows, row_grain(p.V), [&](int64_t begin, int64_t end) {
    std::vector<float> xbuf(std::min(kChunk, p.V)), gbuf(std::min(kChunk, p.V));
    for (int64_t row = begin; row < end; ++row) grad_row(args, row, xbuf.data(), gbuf.data());
  });
}

}  // namespace

// kd_cpu.cpp's CpuKernels table points here.
FASTKD_MODULE_LOCAL void topk_row_stats_cpu(const TopKStatsLaunch& args) {
  topk_row_stats_cpu_impl(args);
}
FASTKD_MODULE_LOCAL void topk_grad_rows_cpu(const TopKGradLaunch& args) {
  topk_grad_rows_cpu_impl(args);
}

}  // namespace fastkd
