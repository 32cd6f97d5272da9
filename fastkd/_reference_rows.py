"""The float reference behind the row-kernel interface, for chunked callers on CPU.

FusedLinearKDLoss runs a row kernel on each chunk of rows. Where no kernel runs (CPU tensors
before the C++ kernel exists, float64 inputs, ``backend="torch"``), it runs these two
functions instead: they have the signatures of :func:`fastkd.triton.kd_kernels.kd_rows` and
``scale_rows_`` and compute the spec (:mod:`fastkd.reference`) with autograd on one chunk, so
the formulas stay in one place. They materialise several chunk-sized temporaries; the
caller's chunk size accounts for that (``REFERENCE_ROW_FLOATS``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .reference import kd_loss_reference

# Peak floats held per element of a chunk's (rows, V) logits while kd_rows runs with a
# gradient (student and teacher logits, log-probabilities, probabilities, mixtures and their
# autograd buffers); measured by max RSS: 18.5 for jsd with softcap and CE (the worst),
# 12.3 for forward_kl. Sizes the chunks of the reference path.
REFERENCE_ROW_FLOATS = 19


def kd_rows(
    student: Tensor,
    teacher: Tensor,
    labels: Tensor | None,
    grad: Tensor | None,
    grad_scale: Tensor,
    *,
    divergence: str,
    temperature: float,
    param: float,
    softcap: float | None,
    kd_grad_coef: float,
    ce_weight: float,
    ignore_index: int,
) -> tuple[Tensor, Tensor]:
    """(D per row, CE per row) of (n, V) logits; ``grad`` (may be ``student``) receives
    grad_scale * d(kd_grad_coef * T * D + ce_weight * CE)/ds, as the kernels define it."""
    with torch.enable_grad():
        s = student.detach().requires_grad_(grad is not None)
        rows, d_rows, ce_rows = kd_loss_reference(
            s,
            teacher,
            labels,
            divergence=divergence,
            temperature=temperature,
            beta=param,
            alpha=param,
            softcap=softcap,
            scale_by_temperature_squared=False,
            kd_weight=kd_grad_coef * temperature,
            ce_weight=ce_weight if labels is not None else 0.0,
            ignore_index=ignore_index,
            reduction="none",
        )
        if grad is not None:
            (g,) = torch.autograd.grad(rows.sum(), s)
            grad.copy_(g.mul_(grad_scale))
    d_rows = d_rows.detach()
    ce_rows = torch.zeros_like(d_rows) if ce_rows is None else ce_rows.detach()
    return d_rows, ce_rows


def scale_rows_(grad: Tensor, factor: Tensor) -> None:
    """grad (n, V) *= factor, a 0-d tensor or one value per row, in place."""
    grad.mul_(factor.unsqueeze(-1) if factor.dim() > 0 else factor)
