// The CPU kernels of a vocab-parallel rank's shard (design.md §5): the three walks of
// fastkd/_vocab_parallel.py's phases, one call each (KdShardLaunch::phase). Between them the
// ranks gather what a walk wrote and combine it in Python (float64, O(rows x ranks)).
//   kShardStats  pass 1 of design.md §3 over the shard: per row the ShardStat columns.
//   kShardTerms  jsd, the skew KLs, tvd and hellinger: with the row's constants from the whole
//                vocabulary, the shard's sums of pointwise's terms (ShardTerm columns).
//   kShardGrad   the shard's dL/ds (kd_math.h:grad_entry) from the row's constants.
// The formulas are kd_math.h's. Each walk recomputes its exponentials: kd_cpu.cpp keeps them
// between passes in scratch rows, which the exchange between the walks would not leave in cache.
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <utility>
#include <vector>

#include "kd_cpu_vec.h"
#include "kd_math.h"
#include "kd_params.h"

namespace fastkd {
namespace {

struct ShardRow {
  const float* s;  // the soft-capped float32 student shard row
  const float* t;
  int64_t label;  // the label's column in the shard: outside [0, V) when another rank holds it
};

template <int DIV>
void stats_row(const KdRowsParams& p, const ShardRow& r, float* out) {
  const int64_t V = p.V;
  const Vec inv_t(p.inv_t);
  // CE at temperature 1: the student's own softmax when T == 1.
  const bool ce_own = p.has_ce && p.inv_t != 1.0f;
  float max_a = kNegInf, max_b = kNegInf, max_s = kNegInf;
  float z_a = 0.0f, z_b = 0.0f, z_s = 0.0f, cross = 0.0f;
  for (int64_t lo = 0; lo < V; lo += kChunk) {
    const int64_t n = std::min(kChunk, V - lo);
    const float s_max = max_of(r.s + lo, n);
    const float z_side_old = cross_side<DIV>(z_a, z_b);
    const LseStep step_a = lse_step(max_a, s_max * p.inv_t);
    const LseStep step_b = lse_step(max_b, max_of(r.t + lo, n) * p.inv_t);
    z_a *= step_a.rescale;
    z_b *= step_b.rescale;
    if constexpr (one_pass_loss(DIV)) cross = rebase_cross<DIV>(cross, z_side_old, step_a, step_b);
    float shift_s = 0.0f;
    if (ce_own) {
      const LseStep step_s = lse_step(max_s, s_max);
      z_s *= step_s.rescale;
      shift_s = step_s.shift;
    }
    const Vec sh_a(step_a.shift), sh_b(step_b.shift), sh_s(shift_s);
    Vec sum_a(0.0f), sum_b(0.0f), sum_s(0.0f), acc_cross(0.0f);
    for_each_vec(n, [&](int64_t j, int64_t cnt) {
      const Vec sv = load(r.s + lo + j, cnt, kNegInf);
      const Vec a_rel = sv * inv_t - sh_a;
      const Vec b_rel = load(r.t + lo + j, cnt, kNegInf) * inv_t - sh_b;
      const Vec e_a = Ops<Vec>::exp(a_rel);
      const Vec e_b = Ops<Vec>::exp(b_rel);
      sum_a += e_a;
      sum_b += e_b;
      if constexpr (one_pass_loss(DIV)) acc_cross += cross_term<DIV>(a_rel, b_rel, e_a, e_b);
      if (ce_own) sum_s += Ops<Vec>::exp(sv - sh_s);
    });
    z_a += hsum(sum_a);
    z_b += hsum(sum_b);
    if (ce_own) z_s += hsum(sum_s);
    if constexpr (one_pass_loss(DIV)) cross += hsum(acc_cross);
  }
  if (p.has_ce && !ce_own) {
    max_s = max_a;
    z_s = z_a;
  }
  const bool here = r.label >= 0 && r.label < V;
  out[kShardMaxA] = max_a;
  out[kShardZA] = z_a;
  out[kShardMaxB] = max_b;
  out[kShardZB] = z_b;
  out[kShardCross] = cross;
  out[kShardMaxS] = max_s;
  out[kShardZS] = z_s;
  out[kShardLabel] = p.has_ce && here ? r.s[r.label] : 0.0f;
}

// The row's log-sum-exps from its constants (z is not needed past pass 1).
inline RowLse row_of(const float* c, int max_col, int log_z_col) {
  return {c[max_col], 0.0f, c[log_z_col]};
}

template <int DIV>
void terms_row(const KdRowsParams& p, const ShardRow& r, const float* c, float* out) {
  const RowLse row_a = row_of(c, kConstMaxA, kConstLogZA);
  const RowLse row_b = row_of(c, kConstMaxB, kConstLogZB);
  const Vec inv_t(p.inv_t);
  Pass2Sums<DIV, Vec> acc;
  for_each_vec(p.V, [&](int64_t j, int64_t cnt) {
    // Past cnt: -inf logits and zero probabilities, whose terms are 0.
    const Vec a = load(r.s + j, cnt, kNegInf) * inv_t;
    const Vec b = load(r.t + j, cnt, kNegInf) * inv_t;
    const Vec log_q = log_softmax(a, row_a);
    const Vec log_p = log_softmax(b, row_b);
    acc.add(pointwise<DIV>(log_p, log_q, Ops<Vec>::exp(log_p), Ops<Vec>::exp(log_q),
                           log_ratio(a, b, row_a, row_b), p.mix));
  });
  out[kShardKd] = hsum(acc.kd);
  out[kShardQh] = hsum(acc.qh);
  out[kShardQAbove] = hsum(acc.q_above);
  out[kShardQBelow] = hsum(acc.q_below);
}

template <int DIV>
void grad_row(const KdRowsParams& p, const ShardRow& r, const float* c, float* g) {
  const RowLse row_a = row_of(c, kConstMaxA, kConstLogZA);
  const RowLse row_b = row_of(c, kConstMaxB, kConstLogZB);
  const RowLse row_s = row_of(c, kConstMaxS, kConstLogZS);
  RowSums sums;
  sums.qh_sum = c[kConstQhSum];
  sums.q_above = c[kConstQAbove];
  sums.q_below = c[kConstQBelow];
  const RowGrad grad{c[kConstKdCoef], c[kConstCeCoef], sums};
  const Vec inv_t(p.inv_t);
  const Vec iota = [] {
    alignas(64) float idx[kVec];
    for (int64_t k = 0; k < kVec; ++k) idx[k] = static_cast<float>(k);
    return Vec::loadu(idx);
  }();
  const Vec label_v(static_cast<float>(r.label));
  for_each_vec(p.V, [&](int64_t j, int64_t cnt) {
    const Vec sv = load(r.s + j, cnt, 0.0f);
    const Vec a = sv * inv_t;
    const Vec b = load(r.t + j, cnt, 0.0f) * inv_t;
    const Vec log_q = log_softmax(a, row_a);
    const Vec log_p = log_softmax(b, row_b);
    const Vec q = Ops<Vec>::exp(log_q);
    const Vec qh = pointwise<DIV>(log_p, log_q, Ops<Vec>::exp(log_p), q,
                                  log_ratio(a, b, row_a, row_b), p.mix)
                       .qh;
    const auto ce = [&] {
      const Vec index = iota + Vec(static_cast<float>(j));
      return CeEntry<Vec>{Ops<Vec>::exp(log_softmax(sv, row_s)),
                          Vec::blendv(Vec(0.0f), Vec(1.0f), index == label_v)};
    };
    const auto s_capped = [&] { return sv; };
    grad_entry<DIV>(p, grad, qh, q, ce, s_capped).store(g + j, cnt);
  });
}

using ShardFn = void (*)(const KdShardLaunch&, const ShardRow&, int64_t, std::vector<float>&);

template <int DIV>
void shard_row(const KdShardLaunch& args, const ShardRow& r, int64_t row,
               std::vector<float>& g) {
  const KdRowsParams& p = args.p;
  if (args.phase == kShardStats) {
    stats_row<DIV>(p, r, args.out + row * kNumShardStats);
  } else if (args.phase == kShardTerms) {
    if constexpr (!one_pass_loss(DIV)) {
      terms_row<DIV>(p, r, args.consts + row * kNumShardConsts, args.out + row * kNumShardTerms);
    }
  } else {
    const int64_t elem = elem_size(args.s_dtype);
    char* g_row = static_cast<char*>(args.g) + row * args.g_stride * elem;
    const float* c = args.consts + row * kNumShardConsts;
    if (args.s_dtype == kF32) {
      // Straight into the gradient: an entry is read before it is written, so g may be s.
      grad_row<DIV>(p, r, c, reinterpret_cast<float*>(g_row));
      return;
    }
    g.resize(p.V);
    grad_row<DIV>(p, r, c, g.data());
    row_from_float(g.data(), args.s_dtype, g_row, p.V);
  }
}

template <int... DIVS>
constexpr std::array<ShardFn, sizeof...(DIVS)> shard_table(std::integer_sequence<int, DIVS...>) {
  return {&shard_row<DIVS>...};
}

}  // namespace

void kd_shard_rows_cpu(const KdShardLaunch& args) {
  const KdRowsParams& p = args.p;
  if (p.n_rows == 0) return;
  static constexpr auto table = shard_table(std::make_integer_sequence<int, kNumDivergences>{});
  const ShardFn fn = table[p.divergence];
  const char* s = static_cast<const char*>(args.s);
  const char* t = static_cast<const char*>(args.t);
  const int64_t s_bytes = args.s_stride * elem_size(args.s_dtype);
  const int64_t t_bytes = args.t_stride * elem_size(args.t_dtype);
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(p.V, 1));
  at::parallel_for(0, p.n_rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> s_buf, t_buf, g_buf;
    for (int64_t row = begin; row < end; ++row) {
      const int64_t label = p.has_labels ? args.labels[row] : p.ignore_index;
      if (p.has_labels && label == p.ignore_index) {
        // An ignored row: statistics of nothing, no terms, a zero gradient (the Python side
        // leaves the row out of the loss).
        if (args.phase == kShardStats) {
          float* out = args.out + row * kNumShardStats;
          std::fill(out, out + kNumShardStats, 0.0f);
          out[kShardMaxA] = out[kShardMaxB] = out[kShardMaxS] = kNegInf;
        } else if (args.phase == kShardTerms) {
          std::fill(args.out + row * kNumShardTerms, args.out + (row + 1) * kNumShardTerms, 0.0f);
        } else {
          const int64_t elem = elem_size(args.s_dtype);
          std::memset(static_cast<char*>(args.g) + row * args.g_stride * elem, 0, p.V * elem);
        }
        continue;
      }
      const ShardRow r{float_row(s + row * s_bytes, args.s_dtype, p, s_buf),
                       float_row(t + row * t_bytes, args.t_dtype, p, t_buf),
                       p.has_labels ? label - args.offset : -1};
      fn(args, r, row, g_buf);
    }
  });
}

}  // namespace fastkd
