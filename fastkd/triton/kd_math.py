"""The per-entry and per-block math the Triton row kernels share (design.md §1-3): the
divergence table (``pointwise``), the mixture's log-space terms, the online softmax steps,
the row's constants after pass 1 and the gradient of a block. The twin of csrc/kd_math.h.

Every sum, exp and log is float32.
"""

import triton
import triton.language as tl

NAN = tl.constexpr(float("nan"))

NEG_INF = tl.constexpr(float("-inf"))


@triton.jit
def safe_shift(m):
    # Running maxima start at -inf; exp(x - (-inf)) would be NaN, exp(x - 0) with x = -inf is 0.
    return tl.where(m == NEG_INF, 0.0, m)


@triton.jit
def xlogratio(w, log_w, log_v):
    # w * (log_w - log_v) with 0 log 0 = 0 (masked -inf entries give 0, never NaN).
    return tl.where(w > 0.0, w * (log_w - log_v), 0.0)


@triton.jit
def tanh(x):
    # libdevice.tanh is not available under TRITON_INTERPRET; this form saturates to +-1.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def log1p_small(x):
    # log(1 + x) for 0 <= x <= 1, accurate near 0 (Goldberg's trick; no log1p in the
    # interpreter).
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * (x / (u - 1.0)))


@triton.jit
def mixture(u):
    """softplus(u), softplus(-u), sigmoid(u), sigmoid(-u) from one exp and one log1p:
    csrc/kd_math.h's mixture. u is the log of the ratio of a mixture's two weighted
    probabilities; log(m / p) and log(m / q) are written with these, never as
    log(w p + (1 - w) q): both probabilities underflow for far-off logits, and log p - log m
    cancels in float32 where they are close (w near 1 or 0)."""
    e = tl.exp(-tl.abs(u))  # in (0, 1]: no overflow for any u
    log1p_e = log1p_small(e)
    r = 1.0 / (1.0 + e)
    positive = u > 0.0
    softplus_pos = tl.maximum(u, 0.0) + log1p_e
    softplus_neg = tl.maximum(-u, 0.0) + log1p_e
    return softplus_pos, softplus_neg, tl.where(positive, r, e * r), tl.where(positive, e * r, r)


@triton.jit
def pointwise(DIV: tl.constexpr, log_p, log_q, a_minus_b, w, one_minus_w, log_w, log_1mw):
    """The design.md §1 table for one vocabulary entry: (loss term, q_k * h_k).

    h_k is g_k = dD/dq_k, less a constant where that helps: the gradient
    q_j (h_j - sum_k q_k h_k) is unchanged by it, and a g that tends to a non-zero constant
    where the student's mass meets none of the teacher's (p << q) would cancel there in
    float32. Each row writes g in the form that tends to 0 in that regime. TVD's gradient is
    assembled in the kernel from q_above / q_below sums instead (see kd_row_kernel).
    a_minus_b = (a - max a) - (b - max b), the log-ratio less a constant, relative to the
    row's maxima so that no offset of the logits is carried into it.
    w is beta (jsd) or alpha (skew KLs), with one_minus_w = 1 - w, log_w = log(w) and
    log_1mw = log(1 - w) formed on the host in double precision.
    """
    p = tl.exp(log_p)
    q = tl.exp(log_q)
    if DIV == "forward_kl":
        loss = xlogratio(p, log_p, log_q)
        qh = -p  # g = -p/q
    elif DIV == "soft_ce":
        loss = tl.where(p > 0.0, -p * log_q, 0.0)
        qh = -p  # g = -p/q
    elif DIV == "reverse_kl":
        loss = xlogratio(q, log_q, log_p)
        qh = tl.where(q > 0.0, q * a_minus_b, 0.0)  # g = log q - log p + 1
    elif DIV == "jsd":
        # m = w p + (1-w) q, u = log(w p / ((1-w) q)): log(m/p) = log w + softplus(-u),
        # log(m/q) = log(1-w) + softplus(u).
        sp_pos, sp_neg, _, _ = mixture(log_w - log_1mw + log_p - log_q)
        p_term = tl.where(p > 0.0, p * (log_w + sp_neg), 0.0)
        q_term = tl.where(q > 0.0, q * (log_1mw + sp_pos), 0.0)
        loss = -w * p_term - one_minus_w * q_term
        # g = (1-w) log(q/m) = (1-w) (-log(1-w) - softplus(u))
        qh = tl.where(q > 0.0, -one_minus_w * q * sp_pos, 0.0)
    elif DIV == "skew_forward_kl":
        # m = w p + (1-w) q as for jsd; g = -(1-w) p/m, and (1-w) q/m = sigmoid(-u).
        _, sp_neg, _, sig_neg = mixture(log_w - log_1mw + log_p - log_q)
        loss = tl.where(p > 0.0, -p * (log_w + sp_neg), 0.0)
        qh = tl.where(p > 0.0, -p * sig_neg, 0.0)
    elif DIV == "skew_reverse_kl":
        # m = w q + (1-w) p, u = log((1-w) p / (w q)): log(m/q) = log w + softplus(u);
        # g = log(q/m) + 1 - w q/m = -log(w) - softplus(u) + sigmoid(u)
        sp_pos, _, sig_pos, _ = mixture(log_1mw - log_w + log_p - log_q)
        loss = tl.where(q > 0.0, -q * (log_w + sp_pos), 0.0)
        qh = tl.where(q > 0.0, q * (sig_pos - sp_pos), 0.0)
    elif DIV == "hellinger":
        # D = 1/2 sum (sqrt p - sqrt q)^2, g = (1 - sqrt(p/q)) / 2, h = g - 1/2. The roots
        # are exp(log / 2): 0 for masked entries (exp(-inf)), so no guard is needed. The
        # square of the difference, not (p + q)/2 - sqrt(p q), whose terms cancel where p
        # and q are close.
        sqrt_p = tl.exp(0.5 * log_p)
        sqrt_q = tl.exp(0.5 * log_q)
        loss = 0.5 * (sqrt_p - sqrt_q) * (sqrt_p - sqrt_q)
        qh = -0.5 * sqrt_p * sqrt_q  # q h = -sqrt(p q) / 2
    else:
        tl.static_assert(DIV == "tvd", "a divergence of the table without a branch here")
        # g = sign(q - p) / 2; qh = q where q > p, and -q where q < p
        loss = 0.5 * tl.abs(p - q)
        qh = tl.where(q > p, q, tl.where(q < p, -q, 0.0))
    return loss, qh


@triton.jit
def rebase(cross, rescale, z_old, moved):
    """A carried sum of e * (a value relative to the running maxima), after the maxima moved:
    each value shifts by ``moved`` and each weight by ``rescale``. Nothing is carried while
    z_old is 0 (its maxima may still be -inf)."""
    return tl.where(z_old > 0.0, (cross + moved * z_old) * rescale, 0.0)


@triton.jit
def load_row_block(ptr, cols, n_cols, inv_t, softcap, SOFTCAP: tl.constexpr):
    """Loads a block, soft-caps it, and returns (capped logits, logits / T); -inf past n_cols."""
    mask = cols < n_cols
    x = tl.load(ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if SOFTCAP:
        x = softcap * tanh(x / softcap)
    x = tl.where(mask, x, NEG_INF)
    return x, x * inv_t


@triton.jit
def entry_terms(
    DIV: tl.constexpr, a, b, m_a, m_b, log_z_a, log_z_b, w, one_minus_w, log_w, log_1mw
):  # fmt: skip
    """Once the row's log-sum-exps are known: (log q, and the table's loss and q h terms) of
    the entries a = s/T, b = t/T."""
    log_q = (a - m_a) - log_z_a
    log_p = (b - m_b) - log_z_b
    a_minus_b = (a - m_a) - (b - m_b)
    loss, qh = pointwise(DIV, log_p, log_q, a_minus_b, w, one_minus_w, log_w, log_1mw)
    return log_q, loss, qh


@triton.jit
def block_terms(
    DIV: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK: tl.constexpr, s_row, t_row, start, n_cols,
    inv_t, softcap, m_a, m_b, log_z_a, log_z_b, w, one_minus_w, log_w, log_1mw,
):  # fmt: skip
    """The block of a row from ``start``, read again once the row's log-sum-exps are known:
    (columns, soft-capped s, log q, and the table's loss and q h terms)."""
    cols = start + tl.arange(0, BLOCK)
    s, a = load_row_block(s_row, cols, n_cols, inv_t, softcap, SOFTCAP)
    _, b = load_row_block(t_row, cols, n_cols, inv_t, softcap, SOFTCAP)
    log_q, loss, qh = entry_terms(
        DIV, a, b, m_a, m_b, log_z_a, log_z_b, w, one_minus_w, log_w, log_1mw
    )
    return cols, s, log_q, loss, qh


@triton.jit
def online_lse_step(m, z, x):
    """Folds a block into a running (max, sum of exp(x - max)), both scalars; returns them,
    exp(x - max) and the rescale of the old sum."""
    m_new = tl.maximum(m, tl.max(x, axis=0))
    shift = safe_shift(m_new)
    e = tl.exp(x - shift)
    z = z * tl.exp(m - shift) + tl.sum(e, axis=0)
    return m_new, z, e, tl.exp(m - shift)


@triton.jit
def vector_lse_step(z, x, m_old, m_new):
    """Folds a block into running sums of exp(x - max), one a lane, after the row's running
    maximum moved from m_old to m_new (scalars); returns them, exp(x - max) and the rescale
    of the old sums."""
    shift = safe_shift(m_new)
    rescale = tl.exp(m_old - shift)
    e = tl.exp(x - shift)
    return z * rescale + e, e, rescale


@triton.jit
def cross_terms(DIV: tl.constexpr, a_rel, b_rel, e_b, e_a):
    """The terms of the cross sum from which pass 1 gives the loss of forward_kl, soft_ce and
    reverse_kl (one_pass_loss), with a_rel = a - m_a, b_rel = b - m_b, e = exp(rel)."""
    if DIV == "forward_kl":  # sum e_b ((b - m_b) - (a - m_a))
        return tl.where(e_b > 0.0, e_b * (b_rel - a_rel), 0.0)
    elif DIV == "soft_ce":  # -sum e_b (a - m_a)
        return -tl.where(e_b > 0.0, e_b * a_rel, 0.0)
    else:
        tl.static_assert(DIV == "reverse_kl", "a divergence without a one-pass loss")
        return tl.where(e_a > 0.0, e_a * (a_rel - b_rel), 0.0)


@triton.jit
def stats_step(DIV: tl.constexpr, HAS_CE: tl.constexpr, s, a, b, inv_t, m_s, m_b, z_a, z_b,
               z_s, cross):  # fmt: skip
    """Pass 1's step over a block (s soft-capped, a = s/T, b = t/T; -inf where masked): the
    running maxima m_s and m_b are scalars (two block-wide max reductions); the sums z_a,
    z_b, z_s (CE's, at T = 1) and the cross term of the divergences whose loss comes out of
    pass 1 are vectors, one lane a column of the block, reduced once a row by the caller:
    the lanes share the maxima, so that reduction is a plain sum. a = s * inv_t rounds
    monotonically in s (inv_t > 0), so max a = max(s) * inv_t exactly and s's maximum
    serves both the student and CE."""
    m_s_old = m_s
    m_a_old = m_s * inv_t
    m_b_old = m_b
    z_a_old = z_a
    z_b_old = z_b
    m_s = tl.maximum(m_s, tl.max(s, axis=0))
    m_a = m_s * inv_t
    m_b = tl.maximum(m_b, tl.max(b, axis=0))
    z_a, e_a, rescale_a = vector_lse_step(z_a, a, m_a_old, m_a)
    z_b, e_b, rescale_b = vector_lse_step(z_b, b, m_b_old, m_b)
    if HAS_CE:
        z_s, _, _ = vector_lse_step(z_s, s, m_s_old, m_s)
    # The cross terms are carried relative to the running maxima (a - m_a, b - m_b), so
    # that an offset shared by the logits is never summed and then cancelled: moving the
    # maxima moves every carried value.
    moved_a = m_a - m_a_old
    moved_b = m_b - m_b_old
    if DIV == "forward_kl":
        cross = rebase(cross, rescale_b, z_b_old, moved_a - moved_b)
    elif DIV == "soft_ce":
        cross = rebase(cross, rescale_b, z_b_old, moved_a)
    elif DIV == "reverse_kl":
        cross = rebase(cross, rescale_a, z_a_old, moved_b - moved_a)
    if DIV == "forward_kl" or DIV == "soft_ce" or DIV == "reverse_kl":
        cross += cross_terms(DIV, a - safe_shift(m_a), b - safe_shift(m_b), e_b, e_a)
    return m_s, m_b, z_a, z_b, z_s, cross


@triton.jit
def row_constants(m_s, m_b, z_a, z_b, inv_t):
    """The row's constants from pass 1's maxima and reduced sums: (m_a, m_b, log z_a,
    log z_b, no_distribution), the maxima made finite for the shifts.

    log q = (a - m_a) - log z_a, as torch's log_softmax: folding m + log z into one lse
    would round it to the ulp of the logits' magnitude. no_distribution is NaN when a row
    has no distribution (a NaN or +inf logit, or all -inf: z is then NaN or 0), to be added
    to the divergence and the gradient's coefficient (csrc/kd_math.h's
    nan_unless_distributions); 0 otherwise."""
    no_distribution = tl.where((z_a > 0.0) & (z_b > 0.0), 0.0, NAN)
    m_a = safe_shift(m_s * inv_t)
    return m_a, safe_shift(m_b), tl.log(z_a), tl.log(z_b), no_distribution


@triton.jit
def one_pass_loss(DIV: tl.constexpr, cross, z_a, z_b, log_z_a, log_z_b):
    """(D, S = sum_k q_k h_k) of forward_kl, soft_ce and reverse_kl from pass 1's reduced
    cross term."""
    if DIV == "forward_kl":
        kd = cross / z_b + (log_z_a - log_z_b)
        qh_sum = -1.0
    elif DIV == "soft_ce":
        kd = cross / z_b + log_z_a
        qh_sum = -1.0
    else:
        tl.static_assert(DIV == "reverse_kl", "a divergence without a one-pass loss")
        qh_sum = cross / z_a  # sum_k q_k ((a_k - m_a) - (b_k - m_b)), the h of pointwise
        kd = qh_sum + (log_z_b - log_z_a)
    return kd, qh_sum


@triton.jit
def grad_terms(DIV: tl.constexpr, HAS_CE: tl.constexpr, SOFTCAP: tl.constexpr, cols, s, log_q,
               qh, qh_sum, q_above, q_below, grad_coef, label, m_s, log_z_s, ce_weight,
               softcap):  # fmt: skip
    """dL/ds of a block before the reduction's factor (design.md §1):
    grad_coef q_j (h_j - S) + ce_weight (softmax(s)_j - [j == y]), times the soft-cap's
    derivative; grad_coef = kd_grad_coef (+ NaN for a row without a distribution)."""
    q = tl.exp(log_q)
    if DIV == "tvd":
        # q_j (g_j - S) = q_j * (sum of q where q < p) where q_j > p_j, and
        # -q_j * (sum of q where q > p) where q_j < p_j: no 1/2 - S cancellation.
        d_a = tl.where(qh > 0.0, q * q_below, tl.where(qh < 0.0, -q * q_above, 0.0))
    else:
        d_a = qh - q * qh_sum
    g = grad_coef * d_a
    if HAS_CE:
        softmax_s = tl.exp((s - m_s) - log_z_s)
        g += ce_weight * (softmax_s - tl.where(cols == label, 1.0, 0.0))
    if SOFTCAP:
        g *= 1.0 - (s / softcap) * (s / softcap)
    return g


@triton.jit
def tvd_split(qh):
    """TVD's q where q > p and where q < p, from its q h terms (q and -q there)."""
    return tl.maximum(qh, 0.0), tl.maximum(-qh, 0.0)
