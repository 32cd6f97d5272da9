"""Vocab-parallel KD's phases (design.md §5) as kd_split.py's kernels: a rank's shard is one
chunk of every row, and the ranks' partials are the chunks' partials.

1. ``kd_split_stats_kernel`` over the shard: its partial (kd_split.STATS floats a row: the
   maxima, the rescaled sums, the one-pass divergences' cross term, the label's logit where
   the label lies in the shard). The ranks gather them, in rank order.
2. the 3-pass divergences only: ``kd_split_terms_kernel`` combines the gathered partials and
   sums the shard's loss, q h and TVD terms (kd_split.TERMS floats a row); gathered too.
3. ``kd_split_finish_kernel``: the row's loss from the gathered partials and the shard's
   gradient (its label a column of the shard, or of none).

Every rank combines the same gathered tensors in the same order, so every rank's loss is
the same, bit for bit. One program a (row, rank): every rank must launch as many as the
others for the gathers' shapes to agree, and a split of the shard that depends on the device
(launch.split_chunks) might not.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import triton

from .._rows import RowLosses
from ..divergences import DIVERGENCES
from . import kd_split
from . import launch as launch_table
from .kd_kernels import _launch_device

# x -> (world, *x.shape): x from every rank, in rank order.
Gather = Callable[[torch.Tensor, str], torch.Tensor]


def _by_row(every: torch.Tensor) -> torch.Tensor:
    """(world, n, 1, F) gathered partials -> (n, world, F): the rank's partial is its chunk."""
    return every.squeeze(2).transpose(0, 1).contiguous()


def shard_rows(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor | None,
    grad: torch.Tensor | None,
    reduction_factor: torch.Tensor,
    config,
    offset: int,
    gather: Gather,
) -> RowLosses:
    """The loss of each row of the whole vocabulary from this rank's (n, V_r) shards of the
    student and teacher logits (unit stride along V_r; V_r may be 0), columns [offset,
    offset + V_r) of it; labels global. ``grad`` (n, V_r) receives reduction_factor * dL/ds
    of the shard (it may be ``student``). Every rank of the group calls with the same n."""
    n_rows, V = student.shape
    device = student.device
    kd_per_row = torch.empty(n_rows, dtype=torch.float32, device=device)
    ce_per_row = torch.zeros(n_rows, dtype=torch.float32, device=device)
    if n_rows == 0:
        return RowLosses(kd_per_row, ce_per_row)
    if V == 0:
        # An empty shard walks no column; the kernels still need memory to point at.
        student = teacher = torch.zeros(n_rows, 1, dtype=student.dtype, device=device)
        grad = None if grad is None else student
    div = DIVERGENCES[config.divergence]
    block, num_warps = launch_table._lookup(launch_table.MULTI_PASS_TABLE, max(V, 1))
    chunk = max(triton.cdiv(V, block), 1) * block
    has_labels = labels is not None
    if has_labels:
        labels = labels.contiguous()
    w = config.mix_weight
    mix = dict(w=w, one_minus_w=1.0 - w, log_w=math.log(w), log_1mw=math.log1p(-w))
    row = dict(
        s_ptr=student, s_row_stride=student.stride(0), t_ptr=teacher,
        t_row_stride=teacher.stride(0), labels_ptr=labels if has_labels else kd_per_row, V=V,
        chunk=chunk, inv_t=1.0 / config.temperature,
        softcap=config.softcap if config.softcap is not None else 1.0,
        ignore_index=config.ignore_index, offset=offset,
    )  # fmt: skip
    flags = dict(DIV=div.name, HAS_LABELS=has_labels, SOFTCAP=config.softcap is not None,
                 BLOCK=block, num_warps=num_warps)  # fmt: skip
    has_ce = has_labels and config.has_ce

    stats = torch.empty((n_rows, 1, kd_split.STATS), dtype=torch.float32, device=device)
    with _launch_device(student):
        kd_split.kd_split_stats_kernel[(n_rows, 1)](**row, stats_ptr=stats, HAS_CE=has_ce,
                                                     **flags)  # fmt: skip
    stats = _by_row(gather(stats, "statistics"))
    world = stats.shape[1]
    KP = triton.next_power_of_2(world)
    terms = stats  # unread by the one-pass divergences
    if not div.one_pass_loss:
        terms = torch.empty((n_rows, 1, kd_split.TERMS), dtype=torch.float32, device=device)
        with _launch_device(student):
            kd_split.kd_split_terms_kernel[(n_rows, 1)](
                **row, stats_ptr=stats, terms_ptr=terms, K=world, **mix, KP=KP, **flags
            )
        terms = _by_row(gather(terms, "divergence_terms"))
    with _launch_device(student):
        kd_split.kd_split_finish_kernel[(n_rows, 1)](
            **row, grad_ptr=grad if grad is not None else student,
            grad_row_stride=grad.stride(0) if grad is not None else 0,
            kd_per_row_ptr=kd_per_row, ce_per_row_ptr=ce_per_row,
            reduction_factor_ptr=reduction_factor, stats_ptr=stats, terms_ptr=terms, K=world,
            **mix, kd_grad_coef=config.kd_grad_coef, ce_weight=config.ce_weight,
            ONE_PASS_LOSS=div.one_pass_loss, HAS_CE=has_ce, COMPUTE_GRAD=grad is not None,
            KP=KP, **flags,
        )  # fmt: skip
    return RowLosses(kd_per_row, ce_per_row)
