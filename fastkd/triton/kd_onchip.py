"""The Triton row kernel for rows that fit on chip: one read of each row, one write of the
gradient (design.md §3's floor, 6 bytes an entry of 16-bit logits instead of 10 or 14).

One program holds a whole row of the student and of the teacher (BLOCK = V rounded up to a
power of two) in its registers: the log-sum-exps, the loss, S = sum_k q_k h_k and the
gradient all come from that one read. fastkd/triton/launch.py picks it where the row fits
without spilling (by V and the divergence); longer rows take kd_kernels.kd_row_kernel. The
formulas are kd_math.py's, as in kd_row_kernel: the same loss to the rounding of the sums'
order.
"""

import triton
import triton.language as tl

from .kd_math import (
    cross_terms,
    entry_terms,
    grad_terms,
    load_row_block,
    one_pass_loss,
    row_constants,
    safe_shift,
    tanh,
    tvd_split,
)


@triton.jit
def kd_row_onchip_kernel(
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
    """Loss (and gradient) of one row held whole; the arguments are kd_row_kernel's, with
    BLOCK >= V. Every load comes before the first store, so grad_ptr may alias s_ptr."""
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_row_stride
    t_row = t_ptr + row * t_row_stride
    cols = tl.arange(0, BLOCK)

    if HAS_LABELS:
        label = tl.load(labels_ptr + row).to(tl.int64)
        ignored = label == ignore_index
    else:
        label = row * 0 - 1
        ignored = row < 0
    # An ignored row reads nothing (every column masked) and its outputs are 0.
    n_cols = tl.where(ignored, 0, V)

    s, a = load_row_block(s_row, cols, n_cols, inv_t, softcap, SOFTCAP)
    _, b = load_row_block(t_row, cols, n_cols, inv_t, softcap, SOFTCAP)
    if HAS_CE:
        label_safe = tl.minimum(tl.maximum(label, 0), V - 1)
        s_label = tl.load(s_row + label_safe).to(tl.float32)
        if SOFTCAP:
            s_label = softcap * tanh(s_label / softcap)

    # The row's sums one reduction at a time: nothing but s and b stays live across them.
    m_s = tl.max(s, axis=0)
    m_b = tl.max(b, axis=0)
    shift_a = safe_shift(m_s * inv_t)
    shift_b = safe_shift(m_b)
    z_a = tl.sum(tl.exp(a - shift_a), axis=0)
    e_b = tl.exp(b - shift_b)
    z_b = tl.sum(e_b, axis=0)
    m_a, m_b, log_z_a, log_z_b, no_distribution = row_constants(m_s, m_b, z_a, z_b, inv_t)
    log_q, loss_terms, qh = entry_terms(
        DIV, a, b, m_a, m_b, log_z_a, log_z_b, w, one_minus_w, log_w, log_1mw
    )

    q_above = 0.0
    q_below = 0.0
    if ONE_PASS_LOSS:
        cross = cross_terms(DIV, a - shift_a, b - shift_b, e_b, tl.exp(a - shift_a))
        kd, qh_sum = one_pass_loss(DIV, tl.sum(cross, axis=0), z_a, z_b, log_z_a, log_z_b)
    else:
        kd = tl.sum(loss_terms, axis=0)
        qh_sum = tl.sum(qh, axis=0)
        if DIV == "tvd":
            above, below = tvd_split(qh)
            q_above = tl.sum(above, axis=0)
            q_below = tl.sum(below, axis=0)

    m_s = safe_shift(m_s)
    log_z_s = 0.0
    if HAS_CE:
        log_z_s = tl.log(tl.sum(tl.exp(s - m_s), axis=0))
        ce = (m_s - s_label) + log_z_s
        tl.store(ce_per_row_ptr + row, tl.where(ignored, 0.0, ce))
    tl.store(kd_per_row_ptr + row, tl.where(ignored, 0.0, kd + no_distribution))

    if COMPUTE_GRAD:
        reduction_factor = tl.load(reduction_factor_ptr).to(tl.float32)
        g = grad_terms(
            DIV, HAS_CE, SOFTCAP, cols, s, log_q, qh, qh_sum, q_above, q_below,
            kd_grad_coef + no_distribution, label, m_s, log_z_s, ce_weight, softcap,
        )  # fmt: skip
        g = tl.where(ignored, 0.0, g * reduction_factor)
        tl.store(grad_ptr + row * grad_row_stride + cols, g.to(grad_ptr.dtype.element_ty),
                 mask=cols < V)  # fmt: skip
