"""The row-kernel interface, and the driver every path calls (design.md §3).

A row kernel takes :class:`RowArgs` (n rows of student and teacher logits, their labels, an
optional gradient buffer, the reduction's factor and the loss's :class:`KDConfig`) and
returns the divergence D and the hard-label CE of each row in float32, writing
``reduction_factor * dL/ds`` into the buffer. Every backend in ``_backends.REGISTRY`` has one
(``row_kernel``) with a companion ``scale_rows_`` for the backward; the logits path
(``_ops``) and the fused-linear chunk loop (``_fused_linear_ops``) reach them only through
:func:`run_rows`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, Protocol

import torch
from torch import Tensor

if TYPE_CHECKING:
    from ._config import KDConfig
    from .topk import TopKTeacher


@dataclass(frozen=True)
class RowArgs:
    """One row-kernel call over n rows of a V-entry vocabulary."""

    student: Tensor  # (n, V) logits, unit stride along V
    teacher: Tensor | TopKTeacher  # (n, V) logits, unit stride along V; or (n, K) pairs
    labels: Tensor | None  # (n,) integers, or None
    # (n, V) in the student's dtype, or None for the loss only: receives
    # reduction_factor * dL/ds. It may be ``student`` itself (a kernel reads an entry before
    # it writes it), never memory that another row or the teacher still reads.
    grad: Tensor | None
    reduction_factor: Tensor  # 0-d float tensor on the logits' device
    config: KDConfig


class RowLosses(NamedTuple):
    kd_per_row: Tensor  # (n,) float32: D(p, q), without T^2 or kd_weight
    ce_per_row: Tensor  # (n,) float32: CE of the student at T = 1 (0 without CE)


class RowKernel(Protocol):
    def __call__(self, rows: RowArgs) -> RowLosses: ...


class ScaleRows(Protocol):
    def __call__(self, grad: Tensor, grad_output: Tensor) -> None:
        """grad (n, V) *= grad_output (0-d, or one value per row), in place."""


def as_rows(x: Tensor, V: int) -> Tensor:
    """(N, V) view (copy only if the rows can't be viewed) with unit stride along V."""
    x2 = x.reshape(-1, V)
    return x2 if x2.stride(1) == 1 or V == 1 else x2.contiguous()


def reduction_factor(
    config: KDConfig,
    n_rows: int,
    size0: int,
    labels: Tensor | None,
    num_items_in_batch: Tensor | None,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """The reduction's factor on each row's loss, as a 0-d tensor on the device (float32,
    or float64 for FusedLinearKDLoss's float64 path).

    Computed without a host sync: the kernel reads it, and the reduced loss uses it too.
    """
    if config.reduction in ("sum", "none"):
        value = 1.0
    elif config.reduction == "batchmean":
        value = 1.0 / max(size0, 1)
    elif num_items_in_batch is not None:
        return 1.0 / nonzero_count(num_items_in_batch.to(dtype))
    elif labels is not None:
        kept = (labels != config.ignore_index).sum().to(dtype)
        return 1.0 / nonzero_count(kept)
    else:
        value = 1.0 / max(n_rows, 1)
    return torch.full((), value, dtype=dtype, device=device)


def nonzero_count(count: Tensor) -> Tensor:
    """The divisor of a mean over ``count`` rows: the count, or 1 where it is exactly 0 (no
    row kept: the sum is 0, and so is the mean and its gradient). Fractional counts stay."""
    return torch.where(count == 0, torch.ones_like(count), count)


def run_rows(kernel: RowKernel, rows: RowArgs) -> RowLosses:
    """Runs a row kernel: (T^2-scaled D per row, CE per row), float32."""
    kd_per_row, ce_per_row = kernel(rows)
    return RowLosses(kd_per_row * rows.config.t_squared, ce_per_row)


def reduce_rows(
    config: KDConfig, losses: RowLosses, reduction_factor: Tensor, lead_shape: torch.Size
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, kd, ce) from per-row losses: shaped like ``lead_shape`` for 'none', else summed
    and multiplied by the reduction's factor."""
    if config.reduction == "none":
        kd, ce = losses.kd_per_row.view(lead_shape), losses.ce_per_row.view(lead_shape)
    else:
        kd, ce = (
            losses.kd_per_row.sum() * reduction_factor,
            losses.ce_per_row.sum() * reduction_factor,
        )
    return config.kd_weight * kd + config.ce_weight * ce, kd, ce
