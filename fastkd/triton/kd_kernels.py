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
from . import kd_split
from . import launch as launch_table
from .kd_math import (
    block_terms,
    grad_terms,
    load_row_block,
    one_pass_loss,
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
    """The fastkd._rows interface over (N, V) row-major views: kd_row_kernel one program a
    row, or for short rows kd_onchip.kd_row_onchip_kernel, or for few rows the kd_split.py
    kernels over several programs a row (fastkd/triton/launch.py chooses)."""
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
    launch = launch_table.row_launch(V, div.name, n_rows, launch_table.sm_count(student.device))
    w = config.mix_weight
    # The mixture weight's complements and logs in double here: 1 - float32(w) loses
    # 1 - w's digits as w nears 1, and so do the logs of float32 w and 1 - w.
    mix = dict(w=w, one_minus_w=1.0 - w, log_w=math.log(w), log_1mw=math.log1p(-w))
    inputs = dict(
        s_ptr=student,
        s_row_stride=student.stride(0),
        t_ptr=rows.teacher,
        t_row_stride=rows.teacher.stride(0),
        labels_ptr=labels if labels is not None else kd_per_row,
    )
    outputs = dict(
        grad_ptr=grad if grad is not None else student,
        grad_row_stride=grad.stride(0) if grad is not None else 0,
        kd_per_row_ptr=kd_per_row,
        ce_per_row_ptr=ce_per_row,
        reduction_factor_ptr=rows.reduction_factor,
    )
    scalars = dict(
        V=V,
        inv_t=1.0 / config.temperature,
        softcap=config.softcap if config.softcap is not None else 1.0,
        **mix,
        kd_grad_coef=config.kd_grad_coef,
        ce_weight=config.ce_weight,
        ignore_index=config.ignore_index,
    )
    flags = dict(
        DIV=div.name,
        ONE_PASS_LOSS=div.one_pass_loss,
        HAS_LABELS=labels is not None,
        HAS_CE=labels is not None and config.has_ce,
        SOFTCAP=config.softcap is not None,
        COMPUTE_GRAD=grad is not None,
        BLOCK=launch.block,
    )
    with _launch_device(student):
        if launch.kernel == launch_table.SPLIT:
            _launch_split(launch, n_rows, inputs, outputs, scalars, flags)
        else:
            kernel = (
                kd_row_kernel
                if launch.kernel == launch_table.MULTI_PASS
                else (kd_row_onchip_kernel)
            )
            kernel[(n_rows,)](**inputs, **outputs, **scalars, **flags,
                              num_warps=launch.num_warps)  # fmt: skip
    return RowLosses(kd_per_row, ce_per_row)


def _launch_split(launch, n_rows, inputs, outputs, scalars, flags) -> None:
    """kd_split.py's launches: stats, the 3-pass divergences' terms, then the loss and the
    gradient, over chunks of whole blocks."""
    V, block = scalars["V"], launch.block
    chunk = triton.cdiv(triton.cdiv(V, launch.chunks), block) * block
    K = triton.cdiv(V, chunk)
    device = inputs["s_ptr"].device
    stats = torch.empty((n_rows, K, kd_split.STATS), dtype=torch.float32, device=device)
    terms = torch.empty((n_rows, K, kd_split.TERMS), dtype=torch.float32, device=device)
    row = dict(V=V, chunk=chunk, inv_t=scalars["inv_t"], softcap=scalars["softcap"], offset=0)
    mix = {k: scalars[k] for k in ("w", "one_minus_w", "log_w", "log_1mw")}
    common = dict(DIV=flags["DIV"], HAS_LABELS=flags["HAS_LABELS"], SOFTCAP=flags["SOFTCAP"],
                  BLOCK=block, num_warps=launch.num_warps)  # fmt: skip
    KP = triton.next_power_of_2(K)
    kd_split.kd_split_stats_kernel[(n_rows, K)](
        **inputs, stats_ptr=stats, **row, ignore_index=scalars["ignore_index"],
        HAS_CE=flags["HAS_CE"], **common,
    )  # fmt: skip
    if not flags["ONE_PASS_LOSS"]:
        kd_split.kd_split_terms_kernel[(n_rows, K)](
            **inputs, stats_ptr=stats, terms_ptr=terms, K=K, **row, **mix,
            ignore_index=scalars["ignore_index"], KP=KP, **common,
        )  # fmt: skip
    kd_split.kd_split_finish_kernel[(n_rows, K if flags["COMPUTE_GRAD"] else 1)](
        **inputs, **outputs, stats_ptr=stats, terms_ptr=terms, K=K, **row, **mix,
        kd_grad_coef=scalars["kd_grad_coef"], ce_weight=scalars["ce_weight"],
        ignore_index=scalars["ignore_index"], ONE_PASS_LOSS=flags["ONE_PASS_LOSS"],
        HAS_CE=flags["HAS_CE"], COMPUTE_GRAD=flags["COMPUTE_GRAD"], KP=KP, **common,
    )  # fmt: skip


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
