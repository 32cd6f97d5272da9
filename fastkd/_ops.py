"""KDLoss as torch ops: ``fastkd::kd_loss`` and its in-place twin, with autograd.

The forward runs a row kernel that computes the loss and, when the student needs a
gradient, the gradient already scaled by the reduction's factor (design.md §3; float16
gradients get it in the backward, see _defers_scale). The backward only multiplies that stored
gradient by grad_output (skipped on the device where it is 1).
The ops are opaque to torch.compile (fake implementations give their shapes), so a compiled
model calls the same kernels with no graph break.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _backends


def _rows(x: Tensor, V: int) -> Tensor:
    """(N, V) view (copy only if the rows can't be viewed) with unit stride along V."""
    x2 = x.reshape(-1, V)
    return x2 if x2.stride(1) == 1 or V == 1 else x2.contiguous()


def _grad_scale(
    reduction: str,
    n_rows: int,
    size0: int,
    labels: Optional[Tensor],
    num_items_in_batch: Optional[Tensor],
    ignore_index: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """The reduction's factor on each row's loss, as a 0-d tensor on the device (float32, or
    float64 for FusedLinearKDLoss's float64 path).

    Computed without a host sync: the kernel reads it, and the reduced loss uses it too.
    """
    if reduction in ("sum", "none"):
        value = 1.0
    elif reduction == "batchmean":
        value = 1.0 / max(size0, 1)
    elif num_items_in_batch is not None:
        ones = torch.ones((), dtype=dtype, device=device)
        return ones / num_items_in_batch.to(dtype).clamp_min(1)
    elif labels is not None:
        kept = (labels != ignore_index).sum().to(dtype)
        return 1.0 / kept.clamp_min(1)
    else:
        value = 1.0 / max(n_rows, 1)
    return torch.full((), value, dtype=dtype, device=device)


def _run_rows(
    kd_rows_fn,
    s2: Tensor,
    t2: Tensor,
    labels1: Optional[Tensor],
    grad2: Optional[Tensor],
    scale: Tensor,
    divergence: str,
    temperature: float,
    param: float,
    softcap: Optional[float],
    scale_t2: bool,
    kd_weight: float,
    ce_weight: float,
    ignore_index: int,
) -> tuple[Tensor, Tensor]:
    """Runs a row kernel on (n, V) rows: (T^2-scaled kd per row, ce per row), float32.

    ``grad2`` (or None for loss only) receives ``scale`` * dL/ds; it may be ``s2`` itself.
    FusedLinearKDLoss calls this once per chunk of rows.
    """
    t_sq = temperature**2 if scale_t2 else 1.0
    kd_rows, ce_rows = kd_rows_fn(
        s2,
        t2,
        labels1,
        grad2,
        scale,
        divergence=divergence,
        temperature=temperature,
        param=param,
        softcap=softcap,
        kd_grad_coef=kd_weight * t_sq / temperature,
        ce_weight=ce_weight,
        ignore_index=ignore_index,
    )
    return kd_rows * t_sq, ce_rows


def _reduce_rows(
    kd_rows: Tensor,
    ce_rows: Tensor,
    scale: Tensor,
    reduction: str,
    lead_shape: torch.Size,
    kd_weight: float,
    ce_weight: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, kd, ce) from per-row losses: shaped like ``lead_shape`` for 'none', else summed
    and multiplied by the reduction's factor."""
    if reduction == "none":
        kd, ce = kd_rows.view(lead_shape), ce_rows.view(lead_shape)
    else:
        kd, ce = kd_rows.sum() * scale, ce_rows.sum() * scale
    return kd_weight * kd + ce_weight * ce, kd, ce


def _kd_forward(
    student: Tensor,
    teacher: Tensor,
    labels: Optional[Tensor],
    num_items_in_batch: Optional[Tensor],
    divergence: str,
    temperature: float,
    param: float,
    softcap: Optional[float],
    scale_t2: bool,
    kd_weight: float,
    ce_weight: float,
    ignore_index: int,
    reduction: str,
    backend: str,
    grad: Optional[Tensor],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Runs the row kernel (gradient into ``grad`` when given) and reduces: (loss, kd, ce,
    the reduction's factor); the gradient lacks that factor when :func:`_defers_scale`."""
    V = student.shape[-1]
    s2 = _rows(student, V)
    t2 = _rows(teacher, V)
    labels1 = labels.reshape(-1) if labels is not None else None
    n_rows = s2.shape[0]
    size0 = student.shape[0] if student.dim() > 1 else V
    scale = _grad_scale(
        reduction, n_rows, size0, labels1, num_items_in_batch, ignore_index, student.device
    )
    kd_rows_fn, _ = _backends.row_kernel(backend)
    kd_rows, ce_rows = _run_rows(
        kd_rows_fn,
        s2,
        t2,
        labels1,
        None if grad is None else grad.view(n_rows, V),
        torch.ones_like(scale) if _defers_scale(student, reduction) else scale,
        divergence,
        temperature,
        param,
        softcap,
        scale_t2,
        kd_weight,
        ce_weight,
        ignore_index,
    )
    loss, kd, ce = _reduce_rows(
        kd_rows, ce_rows, scale, reduction, student.shape[:-1], kd_weight, ce_weight
    )
    return loss, kd, ce, scale


def _defers_scale(student: Tensor, reduction: str) -> bool:
    """A float16 gradient gets the reduction's factor in the backward, with grad_output:
    stored as (q - p) / N it would flush to zero (below 6e-8) before a GradScaler's
    grad_output of 2^16 could lift it. bfloat16 has float32's range."""
    return student.dtype == torch.float16 and reduction in ("mean", "batchmean")


def _loss_shape(student: Tensor, reduction: str) -> torch.Size:
    return student.shape[:-1] if reduction == "none" else torch.Size([])


@torch.library.custom_op("fastkd::kd_loss", mutates_args=())
def kd_loss_op(
    student: Tensor,
    teacher: Tensor,
    labels: Optional[Tensor],
    num_items_in_batch: Optional[Tensor],
    divergence: str,
    temperature: float,
    param: float,
    softcap: Optional[float],
    scale_t2: bool,
    kd_weight: float,
    ce_weight: float,
    ignore_index: int,
    reduction: str,
    backend: str,
    compute_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, kd, ce, grad, grad_factor): grad is dloss/dstudent shaped like the student (or
    empty), short of the 0-d grad_factor when :func:`_defers_scale`."""
    grad = (
        torch.empty(student.shape, dtype=student.dtype, device=student.device)
        if compute_grad
        else student.new_empty(0)
    )
    loss, kd, ce, grad_factor = _kd_forward(
        student,
        teacher,
        labels,
        num_items_in_batch,
        divergence,
        temperature,
        param,
        softcap,
        scale_t2,
        kd_weight,
        ce_weight,
        ignore_index,
        reduction,
        backend,
        grad if compute_grad else None,
    )
    return loss, kd, ce, grad, grad_factor


@kd_loss_op.register_fake
def _kd_loss_fake(
    student,
    teacher,
    labels,
    num_items_in_batch,
    divergence,
    temperature,
    param,
    softcap,
    scale_t2,
    kd_weight,
    ce_weight,
    ignore_index,
    reduction,
    backend,
    compute_grad,
):
    shape = _loss_shape(student, reduction)
    out = [student.new_empty(shape, dtype=torch.float32) for _ in range(3)]
    grad = student.new_empty(student.shape) if compute_grad else student.new_empty(0)
    return out[0], out[1], out[2], grad, student.new_empty((), dtype=torch.float32)


@torch.library.custom_op("fastkd::kd_loss_inplace", mutates_args=("student",))
def kd_loss_inplace_op(
    student: Tensor,
    teacher: Tensor,
    labels: Optional[Tensor],
    num_items_in_batch: Optional[Tensor],
    divergence: str,
    temperature: float,
    param: float,
    softcap: Optional[float],
    scale_t2: bool,
    kd_weight: float,
    ce_weight: float,
    ignore_index: int,
    reduction: str,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, kd, ce, grad_factor), with dloss/dstudent written over the student logits (short
    of grad_factor when :func:`_defers_scale`)."""
    return _kd_forward(
        student,
        teacher,
        labels,
        num_items_in_batch,
        divergence,
        temperature,
        param,
        softcap,
        scale_t2,
        kd_weight,
        ce_weight,
        ignore_index,
        reduction,
        backend,
        student,
    )


@kd_loss_inplace_op.register_fake
def _kd_loss_inplace_fake(
    student,
    teacher,
    labels,
    num_items_in_batch,
    divergence,
    temperature,
    param,
    softcap,
    scale_t2,
    kd_weight,
    ce_weight,
    ignore_index,
    reduction,
    backend,
):
    shape = _loss_shape(student, reduction)
    out = tuple(student.new_empty(shape, dtype=torch.float32) for _ in range(3))
    return out + (student.new_empty((), dtype=torch.float32),)


@torch.library.custom_op("fastkd::scale_grad_", mutates_args=("grad",))
def scale_grad_op(grad: Tensor, grad_output: Tensor, backend: str) -> None:
    """grad *= grad_output (a scalar, or one value per leading index), in place."""
    V = grad.shape[-1]
    factor = grad_output.reshape(-1) if grad_output.dim() > 0 else grad_output
    _, scale_rows_ = _backends.row_kernel(backend)
    scale_rows_(grad.view(-1, V), factor)


@scale_grad_op.register_fake
def _scale_grad_fake(grad, grad_output, backend):
    return None


def _scale_stored_grad(ctx, d_loss: Tensor) -> Tensor:
    """The stored gradient times grad_output (and the deferred factor), in place."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            "fastkd: KDLoss has no double backward (create_graph=True): its gradient is "
            "computed in the forward; use backend='torch' for higher-order gradients"
        )
    if ctx.backward_done:
        raise RuntimeError(
            "fastkd: a second backward through one KDLoss call (retain_graph=True): the first "
            "already scaled the stored gradient in place; compute the loss again instead"
        )
    ctx.backward_done = True
    grad, grad_factor = ctx.saved_tensors
    factor = d_loss * grad_factor if ctx.defers_scale else d_loss
    torch.ops.fastkd.scale_grad_(grad, factor, ctx.backend)
    return grad


def _backward(ctx, d_loss, d_kd, d_ce, d_grad, d_grad_factor):
    if d_loss is None:
        return (None,) * 15
    return (_scale_stored_grad(ctx, d_loss),) + (None,) * 14


def _setup_context(ctx, inputs, output):
    ctx.backend = inputs[13]
    ctx.defers_scale = _defers_scale(inputs[0], inputs[12])
    ctx.backward_done = False
    ctx.save_for_backward(output[3], output[4])
    # kd and ce are for logging and grad is the stored gradient: none of them gets a
    # gradient, and the backward takes None for them. Else autograd hands it zeros for each,
    # an N x V tensor for grad: memory, and a memset the size of the gradient itself.
    ctx.mark_non_differentiable(output[1], output[2], output[3], output[4])
    ctx.set_materialize_grads(False)


torch.library.register_autograd("fastkd::kd_loss", _backward, setup_context=_setup_context)


class _KDLossInplace(torch.autograd.Function):
    """The in-place op under autograd: the student logits hold the gradient afterwards."""

    @staticmethod
    def forward(ctx, student, teacher, labels, num_items_in_batch, *config):
        loss, kd, ce, grad_factor = torch.ops.fastkd.kd_loss_inplace(
            student, teacher, labels, num_items_in_batch, *config
        )
        ctx.backend = config[-1]
        ctx.defers_scale = _defers_scale(student, config[-2])
        ctx.backward_done = False
        ctx.save_for_backward(student, grad_factor)
        ctx.mark_non_differentiable(kd, ce)
        return loss, kd, ce

    @staticmethod
    def backward(ctx, d_loss, d_kd, d_ce):
        return (_scale_stored_grad(ctx, d_loss),) + (None,) * 13


def kd_loss_kernel(
    student: Tensor,
    teacher: Tensor,
    labels: Optional[Tensor],
    num_items_in_batch: Optional[Tensor],
    *,
    divergence: str,
    temperature: float,
    param: float,
    softcap: Optional[float],
    scale_t2: bool,
    kd_weight: float,
    ce_weight: float,
    ignore_index: int,
    reduction: str,
    backend: str,
    inplace_backward: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Validated arguments in, (loss, kd, ce) out, through a kernel backend."""
    config = (
        divergence,
        float(temperature),
        float(param),
        softcap,
        scale_t2,
        float(kd_weight),
        float(ce_weight),
        int(ignore_index),
        reduction,
        backend,
    )
    compute_grad = torch.is_grad_enabled() and student.requires_grad
    if compute_grad and inplace_backward:
        return _KDLossInplace.apply(student, teacher, labels, num_items_in_batch, *config)
    loss, kd, ce, _, _ = torch.ops.fastkd.kd_loss(
        student, teacher, labels, num_items_in_batch, *config, compute_grad
    )
    return loss, kd.detach(), ce.detach()
