"""The float reference behind the row-kernel interface, for chunked callers on CPU.

FusedLinearKDLoss runs a row kernel on each chunk of rows. Where no kernel runs (CPU tensors
before the C++ kernel exists, float64 inputs, ``backend="torch"``), it runs these two
functions instead: they implement the row interface of :mod:`fastkd._rows` and compute the
spec (:mod:`fastkd.reference`) with autograd on one chunk, so the formulas stay in one place.
They materialise several chunk-sized temporaries; the caller's chunk size accounts for that
(``REFERENCE_ROW_FLOATS``).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from ._rows import RowArgs, RowLosses
from .reference import reference_loss
from .topk_reference import topk_reference_loss

# Peak floats held per element of a chunk's (rows, V) logits while row_kernel runs with a
# gradient (student and teacher logits, log-probabilities, probabilities, mixtures and their
# autograd buffers); measured by max RSS: 18.5 for jsd with softcap and CE (the worst),
# 12.3 for forward_kl. Sizes the chunks of the reference path.
REFERENCE_ROW_FLOATS = 19


def row_kernel(rows: RowArgs) -> RowLosses:
    """The fastkd._rows interface on the spec: D and CE per row; ``rows.grad`` (may be the
    student) receives reduction_factor * dL/ds, as the kernels define it."""
    return _spec_rows(rows, reference_loss)


def topk_row_kernel(rows: RowArgs) -> RowLosses:
    """:func:`row_kernel` for a TopKTeacher's rows (the spec of design.md §4)."""
    return _spec_rows(rows, topk_reference_loss)


def _spec_rows(rows: RowArgs, spec_loss) -> RowLosses:
    # The kernels' D per row: without the reduction and the T^2 factor (the driver applies
    # them), and CE only where labels come with it.
    config = dataclasses.replace(
        rows.config,
        scale_by_temperature_squared=False,
        kd_weight=rows.config.kd_grad_coef * rows.config.temperature,
        ce_weight=rows.config.ce_weight if rows.labels is not None else 0.0,
        reduction="none",
    )
    with torch.enable_grad():
        s = rows.student.detach().requires_grad_(rows.grad is not None)
        loss_per_row, kd_per_row, ce_per_row = spec_loss(s, rows.teacher, rows.labels, None, config)
        if rows.grad is not None:
            (g,) = torch.autograd.grad(loss_per_row.sum(), s)
            rows.grad.copy_(g.mul_(rows.reduction_factor))
    kd_per_row = kd_per_row.detach()
    ce_per_row = torch.zeros_like(kd_per_row) if ce_per_row is None else ce_per_row.detach()
    return RowLosses(kd_per_row, ce_per_row)


def scale_rows_(grad: Tensor, grad_output: Tensor) -> None:
    """grad (n, V) *= grad_output, a 0-d tensor or one value per row, in place."""
    grad.mul_(grad_output.unsqueeze(-1) if grad_output.dim() > 0 else grad_output)
