"""The compiled ops fastkd::kd_rows and fastkd::scale_rows_ (csrc/) behind the row interface
of :mod:`fastkd._rows`: the "cpu" and "cuda" backends' row kernel (the op dispatches on the
tensors' device); and fastkd::topk_row_stats / fastkd::topk_grad_rows as the two top-k row
functions of fastkd/_topk_rows.py. fastkd/_extension.py loads the ops; this module only calls
them."""

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


# fastkd::kd_shard_rows's phases (csrc/kd_params.h: ShardPhase).
SHARD_STATS, SHARD_TERMS, SHARD_GRAD = 0, 1, 2


def shard_rows(student, teacher, labels, grad, consts, phase: int, offset: int, config) -> Tensor:
    """One phase of a vocab-parallel rank's shard on the CPU (fastkd/_vocab_parallel.py)."""
    return torch.ops.fastkd.kd_shard_rows(
        student, teacher, labels, grad, consts, phase, offset,
        DIVERGENCES[config.divergence].code, config.temperature, config.mix_weight,
        config.softcap, config.kd_grad_coef, config.ce_weight, config.ignore_index,
    )  # fmt: skip


def topk_row_stats(student, ids, labels, *, temperature, softcap, tail, ce, ignore_index) -> Tensor:
    """(n, 5) float32 stats of a top-k teacher's rows (fastkd/_topk_rows.py)."""
    return torch.ops.fastkd.topk_row_stats(
        student, ids, labels, temperature, softcap, tail, ce, ignore_index
    )


def topk_grad_rows(
    student,
    ids,
    student_at_ids,
    labels,
    stats,
    row_coefs,
    pair_grads,
    grad,
    *,
    temperature,
    softcap,
    ignore_index,
) -> None:
    """Writes a top-k teacher's gradient rows into ``grad`` (fastkd/_topk_rows.py); ``grad``
    may be ``student`` itself."""
    torch.ops.fastkd.topk_grad_rows(
        student, ids, student_at_ids, labels, stats, row_coefs, pair_grads, grad,
        temperature, softcap, ignore_index,
    )  # fmt: skip
