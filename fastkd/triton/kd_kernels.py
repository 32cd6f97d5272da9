"""Triton kernels for KDLoss: one program walks one row of the vocabulary (design.md §3).

Pass 1 is an online softmax over vocabulary blocks: the log-sum-exps of a = s/T (student),
b = t/T (teacher) and, when hard-label CE is mixed in, of s at temperature 1. For
forward_kl, soft_ce and reverse_kl it also carries a cross term rescaled with the running
max, so the loss is known after this one pass. The other divergences take a second pass
for their loss and for S = sum_k q_k g_k. The last pass writes the gradient
dL/ds_j = scale * (kd_coef/T * q_j (g_j - S) + ce_weight (softmax(s)_j - [j == y])) * cap'(s_j).
Nothing of size N x V is allocated here: the caller hands in the gradient buffer (which may
be the student logits themselves, since the last pass reads a block before writing it).

Every sum, exp and log is float32; row offsets are int64.
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl

from .._rows import RowArgs, RowLosses
from ..divergences import DIVERGENCES

NAN = tl.constexpr(float("nan"))

NEG_INF = tl.constexpr(float("-inf"))


@triton.jit
def _safe_shift(m):
    # Running maxima start at -inf; exp(x - (-inf)) would be NaN, exp(x - 0) with x = -inf is 0.
    return tl.where(m == NEG_INF, 0.0, m)


@triton.jit
def _xlogratio(w, log_w, log_v):
    # w * (log_w - log_v) with 0 log 0 = 0 (masked -inf entries give 0, never NaN).
    return tl.where(w > 0.0, w * (log_w - log_v), 0.0)


@triton.jit
def _tanh(x):
    # libdevice.tanh is not available under TRITON_INTERPRET; this form saturates to +-1.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _log1p_small(x):
    # log(1 + x) for 0 <= x <= 1, accurate near 0 (Goldberg's trick; no log1p in the
    # interpreter).
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * (x / (u - 1.0)))


@triton.jit
def _mixture(u):
    """softplus(u), softplus(-u), sigmoid(u), sigmoid(-u) from one exp and one log1p:
    csrc/kd_math.h's mixture. u is the log of the ratio of a mixture's two weighted
    probabilities; log(m / p) and log(m / q) are written with these, never as
    log(w p + (1 - w) q): both probabilities underflow for far-off logits, and log p - log m
    cancels in float32 where they are close (w near 1 or 0)."""
    e = tl.exp(-tl.abs(u))  # in (0, 1]: no overflow for any u
    log1p_e = _log1p_small(e)
    r = 1.0 / (1.0 + e)
    positive = u > 0.0
    softplus_pos = tl.maximum(u, 0.0) + log1p_e
    softplus_neg = tl.maximum(-u, 0.0) + log1p_e
    return softplus_pos, softplus_neg, tl.where(positive, r, e * r), tl.where(positive, e * r, r)


@triton.jit
def _pointwise(DIV: tl.constexpr, log_p, log_q, a_minus_b, w, one_minus_w, log_w, log_1mw):
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
        loss = _xlogratio(p, log_p, log_q)
        qh = -p  # g = -p/q
    elif DIV == "soft_ce":
        loss = tl.where(p > 0.0, -p * log_q, 0.0)
        qh = -p  # g = -p/q
    elif DIV == "reverse_kl":
        loss = _xlogratio(q, log_q, log_p)
        qh = tl.where(q > 0.0, q * a_minus_b, 0.0)  # g = log q - log p + 1
    elif DIV == "jsd":
        # m = w p + (1-w) q, u = log(w p / ((1-w) q)): log(m/p) = log w + softplus(-u),
        # log(m/q) = log(1-w) + softplus(u).
        sp_pos, sp_neg, _, _ = _mixture(log_w - log_1mw + log_p - log_q)
        p_term = tl.where(p > 0.0, p * (log_w + sp_neg), 0.0)
        q_term = tl.where(q > 0.0, q * (log_1mw + sp_pos), 0.0)
        loss = -w * p_term - one_minus_w * q_term
        # g = (1-w) log(q/m) = (1-w) (-log(1-w) - softplus(u))
        qh = tl.where(q > 0.0, -one_minus_w * q * sp_pos, 0.0)
    elif DIV == "skew_forward_kl":
        # m = w p + (1-w) q as for jsd; g = -(1-w) p/m, and (1-w) q/m = sigmoid(-u).
        _, sp_neg, _, sig_neg = _mixture(log_w - log_1mw + log_p - log_q)
        loss = tl.where(p > 0.0, -p * (log_w + sp_neg), 0.0)
        qh = tl.where(p > 0.0, -p * sig_neg, 0.0)
    elif DIV == "skew_reverse_kl":
        # m = w q + (1-w) p, u = log((1-w) p / (w q)): log(m/q) = log w + softplus(u);
        # g = log(q/m) + 1 - w q/m = -log(w) - softplus(u) + sigmoid(u)
        sp_pos, _, sig_pos, _ = _mixture(log_1mw - log_w + log_p - log_q)
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
def _rebase(cross, rescale, z_old, moved):
    """A carried sum of e * (a value relative to the running maxima), after the maxima moved:
    each value shifts by ``moved`` and each weight by ``rescale``. Nothing is carried while
    z_old is 0 (its maxima may still be -inf)."""
    return tl.where(z_old > 0.0, (cross + moved * z_old) * rescale, 0.0)


@triton.jit
def _load_row_block(ptr, cols, n_cols, inv_t, softcap, SOFTCAP: tl.constexpr):
    """Loads a block, soft-caps it, and returns (capped logits, logits / T); -inf past n_cols."""
    mask = cols < n_cols
    x = tl.load(ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if SOFTCAP:
        x = softcap * _tanh(x / softcap)
    x = tl.where(mask, x, NEG_INF)
    return x, x * inv_t


@triton.jit
def _block_terms(
    DIV: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK: tl.constexpr, s_row, t_row, start, n_cols,
    inv_t, softcap, m_a, m_b, log_z_a, log_z_b, w, one_minus_w, log_w, log_1mw,
):  # fmt: skip
    """The block of a row from ``start``, once the row's log-sum-exps are known: (columns,
    soft-capped s, log q, and the table's loss and q h terms)."""
    cols = start + tl.arange(0, BLOCK)
    s, a = _load_row_block(s_row, cols, n_cols, inv_t, softcap, SOFTCAP)
    _, b = _load_row_block(t_row, cols, n_cols, inv_t, softcap, SOFTCAP)
    log_q = (a - m_a) - log_z_a
    log_p = (b - m_b) - log_z_b
    a_minus_b = (a - m_a) - (b - m_b)
    loss, qh = _pointwise(DIV, log_p, log_q, a_minus_b, w, one_minus_w, log_w, log_1mw)
    return cols, s, log_q, loss, qh


@triton.jit
def _vector_lse_step(z, x, m_old, m_new):
    """Folds a block into running sums of exp(x - max), one a lane, after the row's running
    maximum moved from m_old to m_new (scalars); returns them, exp(x - max) and the rescale
    of the old sums."""
    shift = _safe_shift(m_new)
    rescale = tl.exp(m_old - shift)
    e = tl.exp(x - shift)
    return z * rescale + e, e, rescale


@triton.jit
def kd_row_kernel(
    s_ptr,
    s_row_stride,
    t_ptr,
    t_row_stride,
    labels_ptr,
    grad_ptr,
    grad_row_stride,
    kd_per_row_ptr,
    ce_per_row_ptr,
    reduction_factor_ptr,
    V,
    inv_t,
    softcap,
    w,
    one_minus_w,
    log_w,
    log_1mw,
    kd_grad_coef,
    ce_weight,
    ignore_index,
    DIV: tl.constexpr,
    ONE_PASS_LOSS: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    HAS_CE: tl.constexpr,
    SOFTCAP: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Loss (and gradient) of one row.

    Writes D to kd_per_row[row] and CE to ce_per_row[row] (0 for ignored rows). DIV is the
    divergence's name in fastkd/divergences.py. When COMPUTE_GRAD, writes
    reduction_factor * dL/ds to the gradient row, with kd_grad_coef = kd_weight * T^2 / T (or
    kd_weight / T without T^2 scaling).
    """
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_row_stride
    t_row = t_ptr + row * t_row_stride
    offs = tl.arange(0, BLOCK)

    if HAS_LABELS:
        label = tl.load(labels_ptr + row).to(tl.int64)
        ignored = label == ignore_index
    else:
        label = row * 0 - 1
        ignored = row < 0
    # An ignored row reads nothing: its loops run zero times and its outputs are 0.
    n_cols = tl.where(ignored, 0, V)

    if HAS_CE:
        # Read before any pass: the gradient pass may write over the student row, and a warp
        # running ahead there must not change the label's logit under another's feet.
        label_safe = tl.minimum(tl.maximum(label, 0), V - 1)
        s_label = tl.load(s_row + label_safe).to(tl.float32)
        if SOFTCAP:
            s_label = softcap * _tanh(s_label / softcap)

    # Pass 1: log-sum-exps, and the cross term for the one-pass divergences. The maxima are
    # scalars (two block-wide max reductions a block); the sums are vectors, one lane a
    # column of the block, reduced once at the end of the row: the lanes share the maxima,
    # so the reduction is a plain sum. a = s * inv_t rounds monotonically in s (inv_t > 0),
    # so max a = max(s) * inv_t exactly, and s's maximum serves CE and the student.
    m_s = float("-inf")
    m_b = float("-inf")
    m_a = float("-inf")
    z_a = tl.zeros([BLOCK], dtype=tl.float32)
    z_b = tl.zeros([BLOCK], dtype=tl.float32)
    z_s = tl.zeros([BLOCK], dtype=tl.float32)
    cross = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK):
        cols = start + offs
        s, a = _load_row_block(s_row, cols, n_cols, inv_t, softcap, SOFTCAP)
        _, b = _load_row_block(t_row, cols, n_cols, inv_t, softcap, SOFTCAP)
        m_s_old, m_a_old, m_b_old = m_s, m_a, m_b
        z_a_old, z_b_old = z_a, z_b
        m_s = tl.maximum(m_s, tl.max(s, axis=0))
        m_a = m_s * inv_t
        m_b = tl.maximum(m_b, tl.max(b, axis=0))
        z_a, e_a, rescale_a = _vector_lse_step(z_a, a, m_a_old, m_a)
        z_b, e_b, rescale_b = _vector_lse_step(z_b, b, m_b_old, m_b)
        if HAS_CE:
            z_s, _, _ = _vector_lse_step(z_s, s, m_s_old, m_s)
        # The cross terms are carried relative to the running maxima (a - m_a, b - m_b), so
        # that an offset shared by the logits is never summed and then cancelled.
        moved_a = m_a - m_a_old
        moved_b = m_b - m_b_old
        a_rel = a - _safe_shift(m_a)
        b_rel = b - _safe_shift(m_b)
        if DIV == "forward_kl":  # sum e_b ((b - m_b) - (a - m_a))
            cross = _rebase(cross, rescale_b, z_b_old, moved_a - moved_b) + tl.where(
                e_b > 0.0, e_b * (b_rel - a_rel), 0.0
            )
        elif DIV == "soft_ce":  # -sum e_b (a - m_a)
            cross = _rebase(cross, rescale_b, z_b_old, moved_a) - tl.where(
                e_b > 0.0, e_b * a_rel, 0.0
            )
        elif DIV == "reverse_kl":  # sum e_a ((a - m_a) - (b - m_b))
            cross = _rebase(cross, rescale_a, z_a_old, moved_b - moved_a) + tl.where(
                e_a > 0.0, e_a * (a_rel - b_rel), 0.0
            )
    z_a = tl.sum(z_a, axis=0)
    z_b = tl.sum(z_b, axis=0)
    z_s = tl.sum(z_s, axis=0)
    cross = tl.sum(cross, axis=0)
    # log q = (a - m_a) - log z_a, as torch's log_softmax: folding m + log z into one lse
    # would round it to the ulp of the logits' magnitude.
    m_a = _safe_shift(m_a)
    m_b = _safe_shift(m_b)
    log_z_a = tl.log(z_a)
    log_z_b = tl.log(z_b)
    # NaN when a row has no distribution (a NaN or +inf logit, or all -inf: z is then NaN or
    # 0), added to the divergence and the gradient's coefficient: csrc/kd_math.h's
    # nan_unless_distributions.
    no_distribution = tl.where((z_a > 0.0) & (z_b > 0.0), 0.0, NAN)

    # The loss, and S = sum_k q_k g_k for the gradient.
    if ONE_PASS_LOSS:
        if DIV == "forward_kl":
            kd = cross / z_b + (log_z_a - log_z_b)
            qh_sum = -1.0
        elif DIV == "soft_ce":
            kd = cross / z_b + log_z_a
            qh_sum = -1.0
        else:  # reverse_kl
            qh_sum = cross / z_a  # sum_k q_k ((a_k - m_a) - (b_k - m_b)), the h of _pointwise
            kd = qh_sum + (log_z_b - log_z_a)
    else:
        kd_acc = tl.zeros([BLOCK], dtype=tl.float32)
        qh_acc = tl.zeros([BLOCK], dtype=tl.float32)
        # TVD only: the sums of q where q > p and where q < p.
        q_above_acc = tl.zeros([BLOCK], dtype=tl.float32)
        q_below_acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):
            _, _, _, loss_terms, qh_terms = _block_terms(
                DIV, SOFTCAP, BLOCK, s_row, t_row, start, n_cols, inv_t, softcap, m_a, m_b,
                log_z_a, log_z_b, w, one_minus_w, log_w, log_1mw,
            )  # fmt: skip
            kd_acc += loss_terms
            qh_acc += qh_terms
            if DIV == "tvd":
                q_above_acc += tl.maximum(qh_terms, 0.0)
                q_below_acc += tl.maximum(-qh_terms, 0.0)
        kd = tl.sum(kd_acc, axis=0)
        qh_sum = tl.sum(qh_acc, axis=0)
        q_above = tl.sum(q_above_acc, axis=0)
        q_below = tl.sum(q_below_acc, axis=0)

    if HAS_CE:
        m_s = _safe_shift(m_s)
        log_z_s = tl.log(z_s)
        ce = (m_s - s_label) + log_z_s
        tl.store(ce_per_row_ptr + row, tl.where(ignored, 0.0, ce))
    tl.store(kd_per_row_ptr + row, tl.where(ignored, 0.0, kd + no_distribution))

    if COMPUTE_GRAD:
        # Last pass: it reads a block before writing it, so grad_ptr may alias s_ptr.
        reduction_factor = tl.load(reduction_factor_ptr).to(tl.float32)
        g_row = grad_ptr + row * grad_row_stride
        for start in range(0, V, BLOCK):
            cols, s, log_q, _, qh = _block_terms(
                DIV, SOFTCAP, BLOCK, s_row, t_row, start, n_cols, inv_t, softcap, m_a, m_b,
                log_z_a, log_z_b, w, one_minus_w, log_w, log_1mw,
            )  # fmt: skip
            q = tl.exp(log_q)
            if DIV == "tvd":
                # q_j (g_j - S) = q_j * (sum of q where q < p) where q_j > p_j, and
                # -q_j * (sum of q where q > p) where q_j < p_j: no 1/2 - S cancellation.
                d_a = tl.where(qh > 0.0, q * q_below, tl.where(qh < 0.0, -q * q_above, 0.0))
            else:
                d_a = qh - q * qh_sum
            g = (kd_grad_coef + no_distribution) * d_a
            if HAS_CE:
                softmax_s = tl.exp((s - m_s) - log_z_s)
                g += ce_weight * (softmax_s - tl.where(cols == label, 1.0, 0.0))
            if SOFTCAP:
                g *= 1.0 - (s / softcap) * (s / softcap)
            g = tl.where(ignored, 0.0, g * reduction_factor)
            tl.store(g_row + cols, g.to(grad_ptr.dtype.element_ty), mask=cols < V)


@triton.jit
def scale_rows_kernel(
    grad_ptr, grad_row_stride, grad_output_ptr, grad_output_row_stride, V, BLOCK: tl.constexpr
):
    """grad[row] *= grad_output[row * grad_output_row_stride]; a row whose grad_output is 1
    is not touched.

    Backward of KDLoss: the stored gradient times grad_output. Reading it on the device (no
    host sync) and skipping when it is 1 makes the common case free.
    """
    row = tl.program_id(0).to(tl.int64)
    factor = tl.load(grad_output_ptr + row * grad_output_row_stride).to(tl.float32)
    if factor != 1.0:
        g_row = grad_ptr + row * grad_row_stride
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < V
            g = tl.load(g_row + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(g_row + cols, (g * factor).to(grad_ptr.dtype.element_ty), mask=mask)


def row_launch(V: int, divergence: str) -> tuple[int, int]:
    """(BLOCK, num_warps) of kd_row_kernel for a row of V entries.

    At most 2048 entries a block, 4 a thread: at 4096 over 16 warps (8 a thread) the mixture
    divergences and TVD spilled on sm_90, and pass 1's vector accumulators take the others
    to 91-95 registers (tests/test_cuda_resources.py holds every row kernel to no spill and
    at most 64 registers: 32 warps an SM).
    """
    block = min(triton.next_power_of_2(max(V, 16)), 2048)
    return block, min(16, max(1, block // 128))


# scale_rows_kernel holds one value an entry: 8 a thread at 16 warps (16-byte loads of
# 16-bit data).
SCALE_BLOCK = 4096
SCALE_WARPS = 16


def _launch_device(x: torch.Tensor):
    """Triton launches on the current CUDA device and its stream: make that x's device."""
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


def row_kernel(rows: RowArgs) -> RowLosses:
    """The fastkd._rows interface: one program per row of (N, V) row-major views."""
    config = rows.config
    student, labels, grad = rows.student, rows.labels, rows.grad
    n_rows, V = student.shape
    if labels is not None:
        labels = labels.contiguous()  # the kernel reads labels_ptr + row
    kd_per_row = torch.empty(n_rows, dtype=torch.float32, device=student.device)
    ce_per_row = torch.zeros(n_rows, dtype=torch.float32, device=student.device)
    if n_rows == 0:
        return RowLosses(kd_per_row, ce_per_row)
    div = DIVERGENCES[config.divergence]
    block, num_warps = row_launch(V, div.name)
    w = config.mix_weight
    with _launch_device(student):
        kd_row_kernel[(n_rows,)](
            student,
            student.stride(0),
            rows.teacher,
            rows.teacher.stride(0),
            labels if labels is not None else kd_per_row,
            grad if grad is not None else student,
            grad.stride(0) if grad is not None else 0,
            kd_per_row,
            ce_per_row,
            rows.reduction_factor,
            V,
            1.0 / config.temperature,
            config.softcap if config.softcap is not None else 1.0,
            w,
            # In double here: 1 - float32(w) loses 1 - w's digits as w nears 1, and so do
            # the logs of float32 w and 1 - w.
            1.0 - w,
            math.log(w),
            math.log1p(-w),
            config.kd_grad_coef,
            config.ce_weight,
            config.ignore_index,
            DIV=div.name,
            ONE_PASS_LOSS=div.one_pass_loss,
            HAS_LABELS=labels is not None,
            HAS_CE=labels is not None and config.has_ce,
            SOFTCAP=config.softcap is not None,
            COMPUTE_GRAD=grad is not None,
            BLOCK=block,
            num_warps=num_warps,
        )
    return RowLosses(kd_per_row, ce_per_row)


def scale_rows_(grad: torch.Tensor, grad_output: torch.Tensor) -> None:
    """grad (N, V) *= grad_output, a 0-d tensor or one value per row, in place."""
    n_rows, V = grad.shape
    if n_rows == 0:
        return
    grad_output = grad_output.to(device=grad.device)
    block = min(triton.next_power_of_2(max(V, 16)), SCALE_BLOCK)
    with _launch_device(grad):
        scale_rows_kernel[(n_rows,)](
            grad,
            grad.stride(0),
            grad_output,
            0 if grad_output.dim() == 0 else grad_output.stride(0),
            V,
            BLOCK=block,
            num_warps=min(SCALE_WARPS, max(4, block // 256)),
        )
