"""The compiled ops fastkd::kd_rows and fastkd::scale_rows_ (csrc/) behind the row interface
of :mod:`fastkd._rows`: the "cpu" and "cuda" backends' row kernel (the op dispatches on the
tensors' device). fastkd/_extension.py loads the ops; this module only calls them."""

from __future__ import annotations

import torch
from torch import Tensor

from ._rows import RowArgs, RowLosses
from .divergences import DIVERGENCES


def row_kernel(rows: RowArgs) -> RowLosses:
    """The fastkd._rows interface on the op fastkd::kd_rows (CPU or CUDA by the tensors)."""
    config = rows.config
    kd_per_row, ce_per_row = torch.ops.fastkd.kd_rows(
        rows.student,
        rows.teacher,
        rows.labels,
        rows.grad,
        rows.reduction_factor,
        DIVERGENCES[config.divergence].code,
        config.temperature,
        config.mix_weight,
        config.softcap,
        config.kd_grad_coef,
        config.ce_weight,
        config.ignore_index,
    )
    return RowLosses(kd_per_row, ce_per_row)


def scale_rows_(grad: Tensor, grad_output: Tensor) -> None:
    torch.ops.fastkd.scale_rows_(grad, grad_output)
