"""The chunk loop of FusedLinearKDLoss, its matmuls, autograd and chunk sizing.

design.md §3 "Fused linear": the value and gradients are those of :class:`fastkd.KDLoss` on
``hidden @ weight.T (+ bias)`` for both models, but the N x V logits are never held. Rows
are processed in chunks sized by a memory budget; per chunk:

1. student and teacher logits, float32 accumulation and a float32 result (no rounding to
   bf16/fp16 before the softmax);
2. the row kernel (KDLoss's, through ``_rows.run_rows``) writes dL/ds, already scaled by the
   reduction's reduction_factor (``_rows.reduction_factor``), over the chunk's student logits;
3. grad_hidden for the chunk, and grad_weight / grad_bias accumulated in float32 (cast to
   the parameters' dtype at the end).

The gradients are computed in the forward; the backward only multiplies them by
grad_output. ``reduction="none"`` is the exception: a per-row grad_output scales the rows
of dL/ds before they are summed into grad_weight, which no afterwards-rescaling can do, so
for "none" the forward computes only the loss and the backward recomputes the chunks with
the rows scaled (two more matmuls per chunk, and no gradient held between the passes).

Rows whose label is ``ignore_index`` are dropped before any matmul. Finding them
(``nonzero``) needs the count on the host: one synchronisation per call, before the loop,
and only when labels are given; nothing inside the loop synchronises.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import _backends, _reference_rows, _rows
from ._config import KDConfig
from ._linear_heads import Head, chunk_rows
from ._rows import RowArgs
from .topk import TopKTeacher

# Floats per element of a chunk's (rows, V) logits that the kernel path holds: student and
# teacher logits, plus room for the gradient's cast to a low-precision weight dtype.
KERNEL_ROW_FLOATS = 3


# --- the chunk loop ----------------------------------------------------------------------


@dataclass
class _Grads:
    """Gradients filled by the loop: None where not wanted. Weight and bias are float32
    accumulators until ``finish``."""

    hidden: Tensor | None
    weight: Tensor | None
    bias: Tensor | None

    @classmethod
    def allocate(cls, student: Head, needs: tuple[bool, bool, bool], all_rows_kept: bool):
        h, w = student.hidden, student.weight
        # Ignored rows are never visited: their gradient rows must start at zero.
        new = torch.empty if all_rows_kept else torch.zeros
        return cls(
            new(h.shape, dtype=h.dtype, device=h.device) if needs[0] else None,
            torch.zeros(w.shape, dtype=student.wide, device=w.device) if needs[1] else None,
            torch.zeros(w.shape[0], dtype=student.wide, device=w.device) if needs[2] else None,
        )

    def finish(self, hidden_shape, weight_dtype, bias_dtype) -> tuple:
        return (
            None if self.hidden is None else self.hidden.view(hidden_shape),
            None if self.weight is None else self.weight.to(weight_dtype),
            None if self.bias is None else self.bias.to(bias_dtype),
        )


class _TopKRows:
    """A top-k teacher as the loop's teacher: the chunk's (id, log-probability) pairs, no
    matmul (three matmuls a chunk instead of four)."""

    def __init__(self, token_ids: Tensor, logprobs: Tensor, mask: Tensor | None) -> None:
        self.pairs = TopKTeacher(token_ids, logprobs, mask).as_rows()

    def chunk(self, index, dtype: torch.dtype) -> TopKTeacher:
        p = self.pairs
        mask = None if p.mask is None else p.mask[index]
        return TopKTeacher(p.token_ids[index], p.logprobs[index], mask)


def _teacher_chunk(teacher: Head | _TopKRows, index, dtype: torch.dtype):
    """The teacher of the rows ``index``: their logits in ``dtype``, or their top-k pairs."""
    if isinstance(teacher, _TopKRows):
        return teacher.chunk(index, dtype)
    return teacher.logits(teacher.rows(index)).to(dtype)


def _kept_rows(labels1: Tensor | None, ignore_index: int, n_rows: int):
    """(index of the rows not ignored, or None for all of them; their count).

    ``nonzero`` synchronises with the device once, here, so that the loop knows its bounds.
    """
    if labels1 is None:
        return None, n_rows
    kept = torch.nonzero(labels1 != ignore_index).squeeze(1)
    n_kept = kept.numel()
    return (None if n_kept == n_rows else kept), n_kept


def _chunk_loop(
    config: KDConfig,
    chunk_rows: int,
    student: Head,
    teacher: Head,
    labels1: Tensor | None,
    kept: Tensor | None,
    n_kept: int,
    reduction_factor: Tensor,
    grads: _Grads | None,
    grad_output: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Runs every chunk of the kept rows; returns (kd, ce) per row (zeros for ignored rows),
    filling ``grads`` when given.

    ``grad_output`` (one value per row) multiplies each row's gradient before the gradient
    matmuls: the backward of reduction="none".
    """
    n_rows = student.hidden.shape[0]
    kernels = _backends.row_kernel(config.backend, topk=isinstance(teacher, _TopKRows))
    kd_all = torch.zeros(n_rows, dtype=student.wide, device=student.hidden.device)
    ce_all = torch.zeros_like(kd_all)
    for start in range(0, n_kept, chunk_rows):
        index = slice(start, min(start + chunk_rows, n_kept))
        if kept is not None:
            index = kept[index]
        # One call per chunk, so that its buffers are freed before the next is allocated.
        kd_all[index], ce_all[index] = _run_chunk(
            config, kernels, student, teacher, labels1, index, reduction_factor, grads, grad_output
        )
    return kd_all, ce_all


def _run_chunk(
    config, kernels, student, teacher, labels1, index, reduction_factor, grads, grad_output
) -> tuple[Tensor, Tensor]:
    """The rows ``index`` (a slice or an index tensor): (kd, ce) per row, grads accumulated."""
    row_kernel, scale_rows_ = kernels
    h_s = student.rows(index)
    s = student.logits(h_s)
    t = _teacher_chunk(teacher, index, s.dtype)
    labels_c = labels1[index] if (labels1 is not None and config.has_ce) else None
    grad = s if grads is not None else None  # the kernel writes dL/ds over the logits
    kd_c, ce_c = _rows.run_rows(row_kernel, RowArgs(s, t, labels_c, grad, reduction_factor, config))
    del t
    if grad is not None:
        if grad_output is not None:
            scale_rows_(grad, grad_output[index].to(grad.dtype))
        if grads.hidden is not None:
            grads.hidden[index] = student.grad_hidden(grad)
        if grads.weight is not None:
            student.accumulate_grad_weight_(grads.weight, grad, h_s)
        if grads.bias is not None:
            grads.bias.add_(grad.sum(0))
    return kd_c.to(student.wide), ce_c.to(student.wide)


def _prepare(config: KDConfig, s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, labels,
             num_items, topk_teacher: bool):  # fmt: skip
    """Everything the loop needs: (student, teacher, labels1, reduction_factor, kept, n_kept).
    With ``topk_teacher``, (t_hidden, t_weight, t_bias) are a TopKTeacher's (token_ids,
    logprobs, mask)."""
    student = Head(s_hidden, s_weight, s_bias)
    teacher = (
        _TopKRows(t_hidden, t_weight, t_bias) if topk_teacher else Head(t_hidden, t_weight, t_bias)
    )
    labels1 = None if labels is None else labels.reshape(-1)
    n_rows = student.hidden.shape[0]
    size0 = s_hidden.shape[0] if s_hidden.dim() > 1 else s_weight.shape[0]
    reduction_factor = _rows.reduction_factor(
        config, n_rows, size0, labels1, num_items, s_hidden.device, student.wide
    )
    kept, n_kept = _kept_rows(labels1, config.ignore_index, n_rows)
    return student, teacher, labels1, reduction_factor, kept, n_kept


def _forward(config: KDConfig, chunk_rows: int, inputs: tuple, needs: tuple[bool, bool, bool],
             topk_teacher: bool):  # fmt: skip
    """(loss, kd, ce, grads): grads is None unless ``needs`` asks for any, and then holds
    the gradients for a grad_output of 1."""
    s_hidden = inputs[0]
    with torch.autocast(s_hidden.device.type, enabled=False):
        student, teacher, labels1, reduction_factor, kept, n_kept = _prepare(
            config, *inputs, topk_teacher
        )
        grads = _Grads.allocate(student, needs, kept is None) if any(needs) else None
        losses = _rows.RowLosses(
            *_chunk_loop(
                config, chunk_rows, student, teacher, labels1, kept, n_kept, reduction_factor, grads
            )
        )
        loss, kd, ce = _rows.reduce_rows(config, losses, reduction_factor, s_hidden.shape[:-1])
    return loss, kd, ce, grads


def _backward_none(
    config: KDConfig, chunk_rows: int, inputs: tuple, needs, grad_output: Tensor,
    topk_teacher: bool,
) -> _Grads:  # fmt: skip
    """reduction="none": recompute the chunks with each row's gradient times its
    grad_output (the loss per row is recomputed too, and dropped)."""
    with torch.autocast(inputs[0].device.type, enabled=False):
        student, teacher, labels1, reduction_factor, kept, n_kept = _prepare(
            config, *inputs, topk_teacher
        )
        grads = _Grads.allocate(student, needs, kept is None)
        _chunk_loop(
            config, chunk_rows, student, teacher, labels1, kept, n_kept, reduction_factor, grads,
            grad_output=grad_output.reshape(-1),
        )  # fmt: skip
    return grads


class _FusedLinearKD(torch.autograd.Function):
    """Autograd for the fused loss: the forward computes the gradients, the backward scales
    them by grad_output (or, for reduction="none", recomputes them row-scaled)."""

    @staticmethod
    def forward(ctx, s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, labels,
                num_items, config, chunk_rows, needs, topk_teacher):  # fmt: skip
        inputs = (s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, labels, num_items)
        deferred = config.reduction == "none"
        loss, kd, ce, grads = _forward(
            config, chunk_rows, inputs, (False,) * 3 if deferred else needs, topk_teacher
        )
        ctx.config, ctx.chunk_rows, ctx.needs = config, chunk_rows, needs
        ctx.topk_teacher = topk_teacher
        ctx.shapes = (s_hidden.shape, s_weight.dtype, None if s_bias is None else s_bias.dtype)
        if deferred:
            ctx.save_for_backward(*inputs)
        else:
            ctx.grads = grads.finish(*ctx.shapes)
        ctx.mark_non_differentiable(kd, ce)
        return loss, kd, ce

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_loss, d_kd, d_ce):
        if d_loss is None:
            return (None,) * 12
        if ctx.config.reduction == "none":
            grads = _backward_none(ctx.config, ctx.chunk_rows, ctx.saved_tensors, ctx.needs,
                                   d_loss, ctx.topk_teacher)  # fmt: skip
            g_hidden, g_weight, g_bias = grads.finish(*ctx.shapes)
        else:
            if ctx.grads is None:
                raise RuntimeError(
                    "FusedLinearKDLoss: backward through the same loss a second time; its "
                    "gradients are computed in the forward and handed over by the first "
                    "backward (compute the loss again instead of retain_graph=True)"
                )
            g_hidden, g_weight, g_bias = ctx.grads
            ctx.grads = None
            for g in (g_hidden, g_weight, g_bias):
                if g is not None:
                    g.mul_(d_loss)
        return (g_hidden, g_weight, g_bias) + (None,) * 9


def loss_chunk_rows(n_rows, V, logits_dtype, backend, chunk_size, memory_budget, device) -> int:
    """Rows per chunk of the loss: the kernel path holds KERNEL_ROW_FLOATS logits-sized
    buffers, the reference path REFERENCE_ROW_FLOATS."""
    row_floats = (
        KERNEL_ROW_FLOATS
        if _backends.REGISTRY[backend].is_kernel
        else _reference_rows.REFERENCE_ROW_FLOATS
    )
    return chunk_rows(n_rows, V, logits_dtype, row_floats, chunk_size, memory_budget, device)


def fused_linear_kd(
    config: KDConfig, chunk_rows: int, inputs: tuple, needs: tuple[bool, bool, bool],
    topk_teacher: bool = False,
):  # fmt: skip
    """Validated inputs (s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, labels,
    num_items) in, (loss, kd, ce) out; through autograd when ``needs`` asks for gradients of
    (s_hidden, s_weight, s_bias). With ``topk_teacher`` the teacher's three are a
    TopKTeacher's (token_ids, logprobs, mask)."""
    if any(needs):
        return _FusedLinearKD.apply(*inputs, config, chunk_rows, needs, topk_teacher)
    loss, kd, ce, _ = _forward(config, chunk_rows, inputs, needs, topk_teacher)
    return loss, kd, ce
