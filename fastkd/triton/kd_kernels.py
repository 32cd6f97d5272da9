"""Triton kernels for KDLoss: one program walks one row of the vocabulary (design.md §3).

Pass 1 is an online softmax over vocabulary blocks: the log-sum-exps of a = s/T (student),
b = t/T (teacher) and, when hard-label CE is mixed in, of s at temperature 1. For
forward_kl, soft_ce and reverse_kl it also carries a cross term rescaled with the running
max, so the loss is known after this one pass. The other divergences take a second pass
for their loss and for S = sum_k q_k g_k. The last pass writes the gradient
dL/ds_j = scale * (kd_coef/T * q_j (g_j - S) + ce_weight (softmax(s)_j - [j == y])) * cap'(s_j).
Nothing of size N x V is allocated here: the caller hands in the gradient buffer (which may
be the student logits themselves, since the last pass reads a block before writing it).

Every sum, exp and log is float32; row offsets are int64. Rows short enough to hold on chip
take kd_onchip.py's one-read kernel instead (launch.py chooses; row_kernel below launches).
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl

from .._rows import RowArgs, RowLosses
from ..divergences import DIVERGENCES
from . import launch as launch_table
from .kd_math import (
    block_terms,
    grad_terms,
    load_row_block,
    one_pass_loss,
    online_lse_step,
    row_constants,
    safe_shift,
    stats_step,
    tanh,
    tvd_split,
)
from .kd_onchip import kd_row_onchip_kernel


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
            s_label = softcap * tanh(s_label / softcap)

    # Pass 1: log-sum-exps, and the cross term for the one-pass divergences.
    m_s = float("-inf")
    m_b = float("-inf")
    z_a = tl.zeros([BLOCK], dtype=tl.float32)
    z_b = tl.zeros([BLOCK], dtype=tl.float32)
    z_s = tl.zeros([BLOCK], dtype=tl.float32)
    cross = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK):
        cols = start + offs
        s, a = load_row_block(s_row, cols, n_cols, inv_t, softcap, SOFTCAP)
        _, b = load_row_block(t_row, cols, n_cols, inv_t, softcap, SOFTCAP)
        m_s, m_b, z_a, z_b, z_s, cross = stats_step(
            DIV, HAS_CE, s, a, b, inv_t, m_s, m_b, z_a, z_b, z_s, cross
        )
    z_a = tl.sum(z_a, axis=0)
    z_b = tl.sum(z_b, axis=0)
    m_a, m_b, log_z_a, log_z_b, no_distribution = row_constants(m_s, m_b, z_a, z_b, inv_t)

    # The loss, and S = sum_k q_k g_k for the gradient.
    q_above = 0.0
    q_below = 0.0
    if ONE_PASS_LOSS:
        kd, qh_sum = one_pass_loss(DIV, tl.sum(cross, axis=0), z_a, z_b, log_z_a, log_z_b)
    else:
        kd_acc = tl.zeros([BLOCK], dtype=tl.float32)
        qh_acc = tl.zeros([BLOCK], dtype=tl.float32)
        # TVD only: the sums of q where q > p and where q < p.
        q_above_acc = tl.zeros([BLOCK], dtype=tl.float32)
        q_below_acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):
            _, _, _, loss_terms, qh_terms = block_terms(
                DIV, SOFTCAP, BLOCK, s_row, t_row, start, n_cols, inv_t, softcap, m_a, m_b,
                log_z_a, log_z_b, w, one_minus_w, log_w, log_1mw,
            )  # fmt: skip
            kd_acc += loss_terms
            qh_acc += qh_terms
            if DIV == "tvd":
                above, below = tvd_split(qh_terms)
                q_above_acc += above
                q_below_acc += below
        kd = tl.sum(kd_acc, axis=0)
        qh_sum = tl.sum(qh_acc, axis=0)
        q_above = tl.sum(q_above_acc, axis=0)
        q_below = tl.sum(q_below_acc, axis=0)

    m_s = safe_shift(m_s)
    log_z_s = 0.0
    if HAS_CE:
        log_z_s = tl.log(tl.sum(z_s, axis=0))
        ce = (m_s - s_label) + log_z_s
        tl.store(ce_per_row_ptr + row, tl.where(ignored, 0.0, ce))
    tl.store(kd_per_row_ptr + row, tl.where(ignored, 0.0, kd + no_distribution))

    if COMPUTE_GRAD:
        # Last pass: it reads a block before writing it, so grad_ptr may alias s_ptr.
        reduction_factor = tl.load(reduction_factor_ptr).to(tl.float32)
        g_row = grad_ptr + row * grad_row_stride
        for start in range(0, V, BLOCK):
            cols, s, log_q, _, qh = block_terms(
                DIV, SOFTCAP, BLOCK, s_row, t_row, start, n_cols, inv_t, softcap, m_a, m_b,
                log_z_a, log_z_b, w, one_minus_w, log_w, log_1mw,
            )  # fmt: skip
            g = grad_terms(
                DIV, HAS_CE, SOFTCAP, cols, s, log_q, qh, qh_sum, q_above, q_below,
                kd_grad_coef + no_distribution, label, m_s, log_z_s, ce_weight, softcap,
            )  # fmt: skip
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


# scale_rows_kernel holds one value an entry: 8 a thread at 16 warps (16-byte loads of
# 16-bit data).
SCALE_BLOCK = 4096
SCALE_WARPS = 16


def _launch_device(x: torch.Tensor):
    """Triton launches on the current CUDA device and its stream: make that x's device."""
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


def row_kernel(rows: RowArgs) -> RowLosses:
    """The fastkd._rows interface: one program per row of (N, V) row-major views, by
    kd_row_kernel or, for rows that fit on chip, kd_onchip.kd_row_onchip_kernel
    (fastkd/triton/launch.py)."""
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
    launch = launch_table.row_launch(V, div.name)
    kernel = kd_row_kernel if launch.kernel == launch_table.MULTI_PASS else kd_row_onchip_kernel
    w = config.mix_weight
    with _launch_device(student):
        kernel[(n_rows,)](
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
            BLOCK=launch.block,
            num_warps=launch.num_warps,
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


# fastkd/triton/topk_kernels.py (the top-k teachers' kernels, written on main alongside this
# change) imports these under their earlier names and keeps its earlier launch; they can go
# once it imports fastkd/triton/kd_math.py and launch.py.
_load_row_block = load_row_block
_online_lse_step = online_lse_step
_safe_shift = safe_shift
_tanh = tanh


def _block_size(V: int) -> int:
    return min(triton.next_power_of_2(max(V, 16)), 4096)


def _num_warps(block: int) -> int:
    return 4 if block <= 1024 else 8 if block <= 2048 else 16
