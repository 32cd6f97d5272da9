// Every per-element and per-row formula of KDLoss (design.md §1 the math, §3 the passes, §4
// the top-k rows), once for the CPU and CUDA kernels, which only walk rows and blocks
// (design.md §6).
//
// The C++ twin of `pointwise` in fastkd/triton/kd_math.py: written as templates over the
// value type F, so that one text serves both kernels. The CUDA kernel instantiates them with
// F = float (host/device functions); the CPU kernel with F = at::vec::Vectorized<float>, whose
// primitives it supplies by specialising `Ops<F>`. Nothing here branches on the data: guards
// are selects, so a vector lane never diverges; the branches on a row's flags (has_ce,
// has_softcap) are the same for the whole row.
#pragma once

#include <cmath>
#include <limits>

#if defined(__CUDACC__)
#define KD_HD __host__ __device__ __forceinline__
#else
#define KD_HD inline
#endif

namespace fastkd {

// The codes of fastkd/divergences.py (the source of truth); the tests run every divergence
// of that table through these kernels against the float64 reference.
enum Divergence : int {
  FORWARD_KL = 0,
  SOFT_CE = 1,
  REVERSE_KL = 2,
  JSD = 3,
  SKEW_FORWARD_KL = 4,
  SKEW_REVERSE_KL = 5,
  TVD = 6,
  HELLINGER = 7,
};
constexpr int kNumDivergences = 8;

// True when pass 1 yields the loss through a carried cross term (design.md §3), so that the
// gradient needs one more pass only.
KD_HD constexpr bool one_pass_loss(int div) {
  return div == FORWARD_KL || div == SOFT_CE || div == REVERSE_KL;
}

// The mixture weight w (the ops' mix_weight: beta for jsd, alpha for the skew KLs) with
// 1 - w, log(w) and log(1 - w), each formed in double on the host: 1 - float(w) would keep
// few of 1 - w's digits as w nears 1 (at w = 1 - 1e-6, 1.3% off, and jsd's loss with it).
struct MixWeight {
  float w;
  float one_minus_w;
  float log_w;
  float log_1mw;
};

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Elementwise primitives of a value type F. Comparisons return F's mask type, which
// `select(mask, a, b)` consumes (a where the mask holds, b elsewhere).
template <class F>
struct Ops;

template <>
struct Ops<float> {
  // expf, not __expf: __expf's error grows with |x| (2 + 1.16|x| ulp), and the float32
  // gradient's 1e-5 budget of design.md §2 is half spent by reverse_kl's cancellation.
  KD_HD static float exp(float x) { return ::expf(x); }
  KD_HD static float tanh(float x) { return ::tanhf(x); }
  KD_HD static float abs(float x) { return ::fabsf(x); }
  KD_HD static float max(float a, float b) { return ::fmaxf(a, b); }
  KD_HD static bool gt(float a, float b) { return a > b; }
  KD_HD static bool lt(float a, float b) { return a < b; }
  KD_HD static float select(bool m, float a, float b) { return m ? a : b; }
};

// A running maximum starts at -inf; exp(x - (-inf)) would be NaN, exp(x - 0) with x = -inf
// is 0. Used on the scalar maxima of the online softmax.
KD_HD float safe_shift(float m) { return m == kNegInf ? 0.0f : m; }

// --- Log-sum-exps (design.md §3) -----------------------------------------------------------

// A move of an online softmax's maximum from from_max to to_max: exponentials are then taken
// against `shift`; whatever was summed against the old maximum is multiplied by `rescale`
// (0 while that maximum is -inf), and a value kept relative to it shifts by -moved.
struct LseStep {
  float shift;
  float rescale;
  float moved;
};
KD_HD LseStep lse_move(float from_max, float to_max) {
  const float shift = safe_shift(to_max);
  return {shift, Ops<float>::exp(from_max - shift), shift - safe_shift(from_max)};
}

// One step of the online softmax: a block whose maximum is block_max joins the running
// maximum.
KD_HD LseStep lse_step(float& running_max, float block_max) {
  const float new_max = Ops<float>::max(running_max, block_max);
  const LseStep step = lse_move(running_max, new_max);
  running_max = new_max;
  return step;
}

// A row's finished log-sum-exp: m its (safe) maximum, z = sum_k exp(x_k - m), log z.
struct RowLse {
  float m;
  float z;
  float log_z;
};
KD_HD RowLse row_lse(float max, float z) { return {safe_shift(max), z, ::logf(z)}; }

// log softmax(x) = (x - m) - log z, as torch's log_softmax: folding m + log z into one lse
// would round it to the ulp of the logits' magnitude.
template <class F>
KD_HD F log_softmax(F x, const RowLse& lse) {
  return (x - F(lse.m)) - F(lse.log_z);
}

// (a - m_a) - (b - m_b): log q - log p less a constant, relative to the rows' maxima so that
// an offset the logits share is never carried (reverse_kl's h in pointwise).
template <class F>
KD_HD F log_ratio(F a, F b, const RowLse& lse_a, const RowLse& lse_b) {
  return (a - F(lse_a.m)) - (b - F(lse_b.m));
}

// The hard-label cross-entropy lse(s) - s_y at temperature 1.
KD_HD float ce_loss(const RowLse& lse_s, float s_label) {
  return (lse_s.m - s_label) + lse_s.log_z;
}

// 0, or NaN when the student's or the teacher's row has no distribution: a NaN or +inf logit,
// or every logit -inf. z_a and z_b are the rows' sums of exp(x - max), in [1, V] otherwise
// and 0 or NaN exactly then. Added to the row's divergence and to its gradient coefficient,
// so that the masked sums of the table cannot make a finite number of such a row.
KD_HD float nan_unless_distributions(float z_a, float z_b) {
  return (z_a > 0.0f && z_b > 0.0f) ? 0.0f : std::numeric_limits<float>::quiet_NaN();
}

// w * (log_w - log_v), with 0 log 0 = 0: masked (-inf) entries give 0, never NaN.
template <class F>
KD_HD F xlogratio(F w, F log_w, F log_v) {
  using O = Ops<F>;
  return O::select(O::gt(w, F(0.0f)), w * (log_w - log_v), F(0.0f));
}

// Soft-capping c * tanh(x / c) (design.md §1, before the temperature), and its derivative
// written with the capped value x_c: d(x_c)/dx = 1 - (x_c / c)^2.
template <class F>
KD_HD F softcap(F x, float cap, float inv_cap) {
  return F(cap) * Ops<F>::tanh(x * F(inv_cap));
}
template <class F>
KD_HD F softcap_grad(F capped, float inv_cap) {
  const F r = capped * F(inv_cap);
  return F(1.0f) - r * r;
}

// log(1 + x) for 0 <= x <= 1, to a few ulp also where x is tiny: 2 atanh(s), s = x / (2 + x)
// in [0, 1/3], by its series to s^13 (the next term is below 1.4e-8 of the sum). A divide
// and eight multiply-adds: the vector libraries' log1p, made for every x, costs several exps.
template <class F>
KD_HD F log1p_unit(F x) {
  const F s = x / (F(2.0f) + x);
  const F z = s * s;
  F poly = F(1.0f / 13.0f);
  poly = poly * z + F(1.0f / 11.0f);
  poly = poly * z + F(1.0f / 9.0f);
  poly = poly * z + F(1.0f / 7.0f);
  poly = poly * z + F(1.0f / 5.0f);
  poly = poly * z + F(1.0f / 3.0f);
  poly = poly * z + F(1.0f);
  return F(2.0f) * s * poly;
}

// The log-space mixture of two distributions, by u = log of the ratio of their weighted
// probabilities: softplus(+-u) = log(1 + e^(+-u)) and sigmoid(+-u), from one exp and one
// log1p. Mixtures are written with them, never as log(w p + (1 - w) q): both probabilities
// underflow for far-off logits, and log p - log m would cancel where they are close.
template <class F>
struct Mixture {
  F softplus_pos, softplus_neg;  // softplus(u), softplus(-u)
  F sigmoid_pos, sigmoid_neg;    // sigmoid(u), sigmoid(-u)
};
template <class F>
KD_HD Mixture<F> mixture(F u) {
  using O = Ops<F>;
  const F zero(0.0f);
  const F e = O::exp(zero - O::abs(u));  // in (0, 1]: no overflow for any u
  const F l = log1p_unit(e);
  const F r = F(1.0f) / (F(1.0f) + e);
  const auto positive = O::gt(u, zero);
  return {O::max(u, zero) + l, O::max(zero - u, zero) + l, O::select(positive, r, e * r),
          O::select(positive, e * r, r)};
}

template <class F>
struct Terms {
  F loss;  // this entry's term of D(p, q)
  F qh;    // q_k * h_k, h_k = dD/dq_k less a constant (below)
};

// The design.md §1 table for one vocabulary entry, from the teacher's and the student's
// log-probabilities and probabilities (p = exp(log_p), q = exp(log_q): the callers have them)
// and a_minus_b = log_ratio(a, b). The C++ twin of `pointwise` in fastkd/triton/kd_math.py,
// with the same h; the mixture divergences are written through `mixture` (one exp and one
// log1p an entry where logaddexp + softplus take two of each; also free of the cancellation
// of log p - log m, as their gradients already were).
//
// h_k is g_k = dD/dq_k less a constant where that helps: the gradient q_j (h_j - sum_k q_k h_k)
// is unchanged by it, and a g that tends to a non-zero constant where the student's mass
// meets none of the teacher's (p << q) would cancel there in float32. Each row writes g in
// the form that tends to 0 in that regime. TVD's gradient is assembled by the kernels from
// the sums of q where q > p and where q < p instead (tvd_grad below).
template <int DIV, class F>
KD_HD Terms<F> pointwise(F log_p, F log_q, F p, F q, F a_minus_b, const MixWeight& mix) {
  using O = Ops<F>;
  const F zero(0.0f);
  if constexpr (DIV == FORWARD_KL) {
    return {xlogratio(p, log_p, log_q), zero - p};  // g = -p/q
  } else if constexpr (DIV == SOFT_CE) {
    return {O::select(O::gt(p, zero), zero - p * log_q, zero), zero - p};  // g = -p/q
  } else if constexpr (DIV == REVERSE_KL) {
    // g = log q - log p + 1 = log_ratio(a, b) + a constant
    return {xlogratio(q, log_q, log_p), O::select(O::gt(q, zero), q * a_minus_b, zero)};
  } else if constexpr (DIV == JSD) {
    // m = w p + (1-w) q, u = log(w p / ((1-w) q)): log(m/p) = log w + softplus(-u),
    // log(m/q) = log(1-w) + softplus(u).
    const Mixture<F> mx = mixture(F(mix.log_w - mix.log_1mw) + log_p - log_q);
    const F p_term = O::select(O::gt(p, zero), p * (F(mix.log_w) + mx.softplus_neg), zero);
    const F q_term = O::select(O::gt(q, zero), q * (F(mix.log_1mw) + mx.softplus_pos), zero);
    // g = (1-w) log(q/m) = (1-w) (-log(1-w) - softplus(u))
    return {zero - F(mix.w) * p_term - F(mix.one_minus_w) * q_term,
            O::select(O::gt(q, zero), F(-mix.one_minus_w) * q * mx.softplus_pos, zero)};
  } else if constexpr (DIV == SKEW_FORWARD_KL) {
    // m = w p + (1-w) q as for jsd; g = -(1-w) p/m, and (1-w) q/m = sigmoid(-u).
    const Mixture<F> mx = mixture(F(mix.log_w - mix.log_1mw) + log_p - log_q);
    return {O::select(O::gt(p, zero), zero - p * (F(mix.log_w) + mx.softplus_neg), zero),
            O::select(O::gt(p, zero), zero - p * mx.sigmoid_neg, zero)};
  } else if constexpr (DIV == SKEW_REVERSE_KL) {
    // m = w q + (1-w) p, u = log((1-w) p / (w q)): log(m/q) = log w + softplus(u);
    // g = log(q/m) + 1 - w q/m = -log(w) - softplus(u) + sigmoid(u)
    const Mixture<F> mx = mixture(F(mix.log_1mw - mix.log_w) + log_p - log_q);
    return {O::select(O::gt(q, zero), zero - q * (F(mix.log_w) + mx.softplus_pos), zero),
            O::select(O::gt(q, zero), q * (mx.sigmoid_pos - mx.softplus_pos), zero)};
  } else if constexpr (DIV == HELLINGER) {
    // D = 1/2 sum (sqrt p - sqrt q)^2, g = (1 - sqrt(p/q)) / 2, h = g - 1/2. The roots are
    // exp(log / 2): 0 for masked entries (exp(-inf)), so no guard is needed. The square of
    // the difference, not (p + q)/2 - sqrt(p q), whose terms cancel where p and q are close.
    const F sqrt_p = O::exp(F(0.5f) * log_p);
    const F sqrt_q = O::exp(F(0.5f) * log_q);
    const F d = sqrt_p - sqrt_q;
    return {F(0.5f) * d * d, F(-0.5f) * sqrt_p * sqrt_q};  // q h = -sqrt(p q) / 2
  } else {
    static_assert(DIV == TVD, "a divergence code without a row in the table");
    // g = sign(q - p) / 2; qh = q where q > p, -q where q < p
    return {F(0.5f) * O::abs(p - q),
            O::select(O::gt(q, p), q, O::select(O::lt(q, p), zero - q, zero))};
  }
}

// TVD's q_j (g_j - S) from its qh_j and the sums of q over the entries where q > p
// (q_above) and where q < p (q_below): q_j q_below where q_j > p_j, -q_j q_above where
// q_j < p_j; no 1/2 - S cancellation. q multiplies outside the selects, so that a NaN q (a
// NaN logit in the row) stays NaN.
template <class F>
KD_HD F tvd_grad(F qh, F q, float q_above, float q_below) {
  using O = Ops<F>;
  const F zero(0.0f);
  return q * O::select(O::gt(qh, zero), F(q_below),
                       O::select(O::lt(qh, zero), F(-q_above), zero));
}

// --- The one-pass loss of forward_kl, soft_ce and reverse_kl (design.md §3) ----------------
//
// Pass 1 carries cross = sum_k e_k c_k beside the log-sum-exps, with e the kept exponential
// of one side (e_b = exp(b - m_b) for forward_kl and soft_ce, e_a for reverse_kl) and c their
// log-ratio part, relative to the running maxima: (b - m_b) - (a - m_a), -(a - m_a),
// (a - m_a) - (b - m_b). cross / z of that side is then E_p[c] or E_q[c], and the loss
// follows from the lse's without a second look at the row. Relative, so that an offset the
// logits share (100 / T, say) is never summed and then cancelled against lse(b) - lse(a).

// The cross term follows the running maximum of the side that weights it: `student` or
// `teacher` (its rescale, its max) by the divergence.
template <int DIV, class T>
KD_HD T cross_side(T student, T teacher) {
  return DIV == REVERSE_KL ? student : teacher;
}

// One entry's share of cross, from a_rel = a - m_a and b_rel = b - m_b (the maxima its
// exponentials were taken against); masked entries (e = 0, logits -inf) give 0, never 0 * inf.
template <int DIV, class F>
KD_HD F cross_term(F a, F b, F e_a, F e_b) {
  using O = Ops<F>;
  const F zero(0.0f);
  if constexpr (DIV == FORWARD_KL) {
    return O::select(O::gt(e_b, zero), e_b * (b - a), zero);
  } else if constexpr (DIV == SOFT_CE) {
    return O::select(O::gt(e_b, zero), zero - e_b * a, zero);
  } else {
    static_assert(DIV == REVERSE_KL, "only forward_kl, soft_ce and reverse_kl carry a cross term");
    return O::select(O::gt(e_a, zero), e_a * (a - b), zero);
  }
}

// The carried cross after the maxima moved (the steps of the student's and the teacher's
// online softmax, or a thread's sums joining its team's): its values shift with the maxima,
// its weights rescale with its side's. z_side_old is that side's sum before the move:
// nothing was carried while it is 0 (and its maximum may still be -inf).
template <int DIV>
KD_HD float rebase_cross(float cross, float z_side_old, const LseStep& a, const LseStep& b) {
  const float moved = DIV == FORWARD_KL ? a.moved - b.moved
                      : DIV == SOFT_CE  ? a.moved
                                        : b.moved - a.moved;
  const float rescale = cross_side<DIV>(a.rescale, b.rescale);
  return z_side_old > 0.0f ? (cross + moved * z_side_old) * rescale : 0.0f;
}

// What a row's gradient needs from the loss passes: the divergence D, S = sum_k q_k h_k, and
// for TVD the sums of q where q > p and where q < p (tvd_grad).
struct RowSums {
  float kd = 0.0f;
  float qh_sum = 0.0f;
  float q_above = 0.0f;
  float q_below = 0.0f;
};

// The loss and S from pass 1, with the maxima inside cross: forward_kl =
// E_p[(b - m_b) - (a - m_a)] + log z_a - log z_b, soft_ce = E_p[-(a - m_a)] + log z_a,
// reverse_kl = E_q[(a - m_a) - (b - m_b)] + log z_b - log z_a; S = sum_k q_k h_k is -1 for
// the first two (h = -p/q) and E_q[log_ratio] for reverse_kl (its h in pointwise).
template <int DIV>
KD_HD RowSums loss_from_pass1(float cross, const RowLse& a, const RowLse& b) {
  RowSums r;
  if constexpr (DIV == FORWARD_KL) {
    r.kd = cross / b.z + (a.log_z - b.log_z);
    r.qh_sum = -1.0f;
  } else if constexpr (DIV == SOFT_CE) {
    r.kd = cross / b.z + a.log_z;
    r.qh_sum = -1.0f;
  } else {
    static_assert(DIV == REVERSE_KL, "only forward_kl, soft_ce and reverse_kl finish in pass 1");
    r.qh_sum = cross / a.z;
    r.kd = r.qh_sum + (b.log_z - a.log_z);
  }
  return r;
}

// --- Pass 2 of jsd, the skew KLs and tvd (design.md §3) ------------------------------------

// One thread's (CUDA) or one vector's lanes' (CPU) running sums of pointwise's terms.
template <int DIV, class F>
struct Pass2Sums {
  F kd = F(0.0f);
  F qh = F(0.0f);
  F q_above = F(0.0f);
  F q_below = F(0.0f);

  KD_HD void add(const Terms<F>& terms) {
    using O = Ops<F>;
    const F zero(0.0f);
    kd = kd + terms.loss;
    qh = qh + terms.qh;
    if constexpr (DIV == TVD) {
      // TVD's qh is q where q > p and -q where q < p.
      q_above = q_above + O::max(terms.qh, zero);
      q_below = q_below + O::max(zero - terms.qh, zero);
    }
  }
};

// --- The gradient (design.md §1) ------------------------------------------------------------
//
// dL/ds_j = (kd_coef q_j (h_j - S) + ce_coef (softmax(s)_j - [j == y])) * cap'(s_j), with
// TVD's q_j (h_j - S) by tvd_grad. The reduction's factor is in both coefficients: the
// backward only multiplies by grad_output (design.md §3).

// A row's constants of its gradient.
struct RowGrad {
  float kd_coef;  // reduction_factor * kd_grad_coef; NaN for a row without distributions
  float ce_coef;  // reduction_factor * ce_weight
  RowSums sums;
};

// no_distribution is nan_unless_distributions of the row: it makes the whole gradient row
// NaN, as the loss, where the student or the teacher has no distribution.
KD_HD RowGrad row_grad(const RowSums& sums, float no_distribution, float reduction_factor,
                       float kd_grad_coef, float ce_weight) {
  return {kd_grad_coef * reduction_factor + no_distribution, ce_weight * reduction_factor, sums};
}

// softmax(s)_j at temperature 1 and [j == y] of one entry, for the CE part.
template <class F>
struct CeEntry {
  F softmax;
  F onehot;
};

// dL/ds_j of one entry from q_j and pointwise's q_j h_j (qh). `p` is the kernels'
// KdRowsParams (kd_params.h): its has_ce, has_softcap and inv_cap. The kernels keep or
// recompute the rest their own way, so they pass it as callables that run only when the row
// needs it: ce() -> CeEntry<F> when the row has CE, s_capped() -> the soft-capped student
// logit when it is soft-capped.
//
// The flags are read from p, not copied into RowGrad: a copy in a local lets GCC version the
// CPU loop on them and contract its multiply-adds differently (-ffp-contract=fast), which
// moves the CPU gradient by an ulp.
template <int DIV, class F, class Params, class Ce, class Capped>
KD_HD F grad_entry(const Params& p, const RowGrad& row, F qh, F q, const Ce& ce,
                   const Capped& s_capped) {
  F g;
  if constexpr (DIV == TVD) {
    g = F(row.kd_coef) * tvd_grad(qh, q, row.sums.q_above, row.sums.q_below);
  } else {
    g = F(row.kd_coef) * (qh - q * F(row.sums.qh_sum));
  }
  if (p.has_ce) {
    const CeEntry<F> e = ce();
    g = g + F(row.ce_coef) * (e.softmax - e.onehot);
  }
  if (p.has_softcap) g = g * softcap_grad(s_capped(), p.inv_cap);
  return g;
}

// --- Top-k teachers (design.md §4) -----------------------------------------------------------
//
// The O(V) side of a top-k teacher: per row, the log-sum-exps (topk_row_stats) and the dense
// gradient spread from the coefficients of the O(K) side (topk_grad_rows). The contract,
// with the why of the split, is fastkd/_topk_rows.py's docstring; tests/topk_kernel_oracle.py
// is its float64 oracle.

// Columns of a row's stats (fastkd/_topk_rows.py: STATS) and coefficients (ROW_COEFS).
enum TopKStat : int {
  kStatMA = 0,
  kStatLogZA = 1,
  kStatLogZOut = 2,
  kStatMS = 3,
  kStatLogZS = 4,
  kNumTopKStats = 5
};
enum TopKCoef : int { kCoefQ = 0, kCoefCe = 1, kNumTopKCoefs = 2 };

// A row's stats from its online softmaxes: of a (max_a, z_a, and z_out, the sum over the
// entries outside S against the same maxima), and of x at T = 1 (max_s, z_s) when ce_own;
// without ce_own (T == 1) x's are a's. Columns not asked for are 0; log 0 = -inf where
// nothing has mass (a row of -inf gives m_a = 0 and log_z_a = -inf).
KD_HD void topk_write_stats(float* out, float max_a, float z_a, float z_out, float max_s,
                            float z_s, bool tail, bool ce, bool ce_own) {
  const RowLse a = row_lse(max_a, z_a);
  const RowLse s = ce_own ? row_lse(max_s, z_s) : a;
  out[kStatMA] = a.m;
  out[kStatLogZA] = a.log_z;
  out[kStatLogZOut] = tail ? ::logf(z_out) : 0.0f;
  out[kStatMS] = ce ? s.m : 0.0f;
  out[kStatLogZS] = ce ? s.log_z : 0.0f;
}

// One row's constants of its gradient. With a = x * inv_t (x soft-capped), on every entry
//   g_j = (c_q q_j + c_ce (sm_j - [j == y])) cap'(x_j),
// then on every pair i, d_i its pair_grads, written whole (formed on the O(K) side, so that
// nothing of it cancels here)
//   g_i = (d_i + c_ce (sm_i - [i == y])) cap'(x_i),
// q = exp((a - m_a) - log_z_a), sm = exp((x - m_s) - log_z_s). A term whose coefficient is
// exactly 0 is off for the whole row, not multiplied by 0: its exp may be inf or NaN there
// (the CE term is also off without labels).
struct TopKRowGrad {
  float m_a, log_z_a, m_s, log_z_s;
  float c_q, c_ce;
  bool has_q, has_ce;
  // sm is q (T == 1 and the CE stats are a's): one exp an entry, not two.
  bool ce_is_q;
};

KD_HD TopKRowGrad topk_row_grad(const float* stats, const float* coefs, float inv_t,
                                bool has_labels) {
  TopKRowGrad row;
  row.m_a = stats[kStatMA];
  row.log_z_a = stats[kStatLogZA];
  row.m_s = stats[kStatMS];
  row.log_z_s = stats[kStatLogZS];
  row.c_q = coefs[kCoefQ];
  row.c_ce = coefs[kCoefCe];
  // != 0 holds for NaN: a NaN coefficient (a row without a distribution) stays in.
  row.has_q = row.c_q != 0.0f;
  row.has_ce = has_labels && row.c_ce != 0.0f;
  row.ce_is_q = inv_t == 1.0f && row.m_s == row.m_a && row.log_z_s == row.log_z_a;
  return row;
}

// The CE term and the soft-cap factor of g, the same for both forms; q is the entry's q when
// ce_is_q. `p` is the kernels' TopKParams (kd_params.h): its has_softcap and inv_cap.
template <class F, class Params>
KD_HD F topk_ce_and_cap(const Params& p, const TopKRowGrad& row, F g, F q, F x, F onehot) {
  if (row.has_ce) {
    const F sm = row.ce_is_q ? q : Ops<F>::exp((x - F(row.m_s)) - F(row.log_z_s));
    g = g + F(row.c_ce) * (sm - onehot);
  }
  if (p.has_softcap) g = g * softcap_grad(x, p.inv_cap);
  return g;
}

// q at a = x * inv_t (rounded: the max m_a was taken of rounded values), when it is wanted:
// for the c_q term (dense) or as the CE softmax.
template <class F>
KD_HD F topk_q(const TopKRowGrad& row, F a, bool wanted) {
  return wanted ? Ops<F>::exp((a - F(row.m_a)) - F(row.log_z_a)) : F(0.0f);
}

// g_j of the dense form.
template <class F, class Params>
KD_HD F topk_dense_grad(const Params& p, const TopKRowGrad& row, F a, F x, F onehot) {
  const F q = topk_q(row, a, row.has_q || (row.has_ce && row.ce_is_q));
  const F g = row.has_q ? F(row.c_q) * q : F(0.0f);
  return topk_ce_and_cap(p, row, g, q, x, onehot);
}

// g_i of a pair, with its d.
template <class F, class Params>
KD_HD F topk_pair_grad(const Params& p, const TopKRowGrad& row, F a, F x, F d, F onehot) {
  const F q = topk_q(row, a, row.has_ce && row.ce_is_q);
  return topk_ce_and_cap(p, row, d, q, x, onehot);
}

}  // namespace fastkd
