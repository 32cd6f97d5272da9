"""The top-k row-kernel interface (design.md §4): two passes over the student per row.

A top-k teacher is read as K (id, log-probability) pairs per row, so everything on the
teacher's side and every formula of the divergence table is O(K) per row: ``row_kernel``
below computes them in PyTorch on (n, K) float64 tensors (fastkd.reference's table and its
gradient column). What is O(V) per row is two kernels, the same for every divergence, which
every kernel backend implements as module-level functions ``topk_row_stats`` and
``topk_grad_rows`` (fastkd/_compiled_rows.py for "cpu"/"cuda", fastkd/triton/topk_kernels.py
for "triton"); tests/topk_kernel_oracle.py is their float64 oracle.

Rows: ``student`` (n, V) float32/bfloat16/float16, unit stride along V; ``ids`` (n, K) int64,
the support's token ids, an entry < 0 meaning "no pair here" (padding: skipped, the student
is never read there); the ids >= 0 of a row are distinct and lie in [0, V) (checked by the
caller). ``labels`` (n,) int64 or None; a row whose label equals ``ignore_index`` is ignored.
With x = softcap * tanh(s / softcap) (or s), a = x * float32(1 / T), S the row's ids >= 0:

``topk_row_stats(student, ids, labels, *, temperature, softcap, tail, ce, ignore_index)``
-> stats (n, 5) float32, the columns ``STATS``:

- ``m_a`` = max_j a_j (0 when it is -inf), ``log_z_a`` = log sum_j exp(a_j - m_a): lse(a) =
  m_a + log_z_a, kept apart so that log q = (a - m_a) - log_z_a keeps its digits for large
  logits (as torch's log_softmax);
- ``log_z_out`` = log sum_{j not in S} exp(a_j - m_a) when ``tail`` (else 0): summed over the
  entries outside S, never as z_a - sum_S (that cancels when S holds nearly all the mass);
  -inf when nothing outside S has mass;
- ``m_s``, ``log_z_s``: the same for x at temperature 1 when ``ce`` (hard-label CE), else 0.

Ignored rows: all 0, and the row is not read. A NaN or +inf logit makes log_z_a NaN; a row of
-inf only gives log_z_a = -inf.

``topk_grad_rows(student, ids, student_at_ids, labels, stats, row_coefs, pair_grads, grad, *,
temperature, softcap, ignore_index)`` writes ``grad`` (n, V) in the student's dtype, which
may be ``student`` itself (in-place backward: an entry is read before it is written;
``student_at_ids`` (n, K), gathered before the call, holds the student's logits at ids).
``row_coefs`` (n, 2) float32 are (c_q, c_ce) and ``pair_grads`` (n, K) float32 are d_i, both
already multiplied by the reduction's factor and the loss's weights. For every j::

    g_j = (c_q q_j + c_ce (sm_j - [j == label])) * cap'(x_j)
    q_j = exp((a_j - m_a) - log_z_a), sm_j = exp((x_j - m_s) - log_z_s),
    cap'(x) = 1 - (x / softcap)^2 (1 without softcap)

then, after the row's dense writes, for every pair i with ids_i >= 0 (x_i from student_at_ids)::

    g_{ids_i} = (d_i + c_ce (sm_i - [ids_i == label])) * cap'(x_i)

A term whose coefficient is exactly 0 is skipped (exactly 0, even where its exp is inf or
NaN), the CE term also without labels. Ignored rows get g = 0.

Why this split: design.md §4's gradient is q_j (h_j - Σ) with h constant outside S (g_tail,
or 0 without the tail), so every entry outside S is c_q q_j with one constant per row, and
the K entries of S take their own values d_i. Both are formed on the O(K) side in float64
(``row_kernel`` below), so that neither cancels in the kernels' float32: the pairs' value is
written whole, never as c_q q_i plus a correction (with a student leaving 1e-9 outside S,
c_q is 1e6 and that sum would cancel to nothing).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _backends
from ._rows import RowArgs, RowLosses
from .reference import divergence_log_q_grad, divergence_per_row
from .topk_reference import student_support_log_probs, teacher_support

STATS = ("m_a", "log_z_a", "log_z_out", "m_s", "log_z_s")
ROW_COEFS = ("c_q", "c_ce")


def _capped_scaled(x: Tensor, config) -> tuple[Tensor, Tensor]:
    """(x soft-capped, a = x / T) in float32, as the kernels form them (a = x * float32(1/T))."""
    x = x.float()
    if config.softcap is not None:
        x = config.softcap * torch.tanh(x / config.softcap)
    return x, x * (1.0 / config.temperature)


def row_kernel(rows: RowArgs) -> RowLosses:
    """The fastkd._rows interface for a TopKTeacher's rows on a kernel backend: D and CE per
    row; ``rows.grad`` receives reduction_factor * dL/ds (design.md §4's gradient)."""
    config = rows.config
    student, teacher, labels = rows.student, rows.teacher, rows.labels
    n, V = student.shape
    if n == 0:
        empty = student.new_zeros(0, dtype=torch.float32)
        return RowLosses(empty, empty)
    row_stats, grad_rows = _backends.topk_kernels(config.backend)
    keep = None if labels is None else labels != config.ignore_index
    # The O(K) side runs in float64: it costs O(n K), and the teacher's tail mass
    # 1 - sum_S e^l of float32 log-probabilities is only exact there (a teacher holding all
    # but 1e-9 would otherwise get a tail of float32 rounding noise).
    wide = torch.float64
    support = teacher_support(teacher, V, config, keep, wide)
    # Pairs outside the support (padding, ignored rows) are -1: the kernels skip them.
    ids = torch.where(support.live, teacher.token_ids.long(), -1)
    tail = config.topk_tail == "bucket"
    has_ce = labels is not None and config.has_ce
    stats = row_stats(student, ids, labels, temperature=config.temperature,
                      softcap=config.softcap, tail=tail, ce=has_ce,
                      ignore_index=config.ignore_index)  # fmt: skip
    # Gathered before the gradient kernel, which may write over the student.
    student_at_ids = student.gather(1, ids.clamp(min=0))
    x_label = None
    if has_ce:
        safe_labels = torch.where(keep, labels, 0).long().unsqueeze(1)
        x_label = student.gather(1, safe_labels).squeeze(1)
    kd_per_row, ce_per_row, row_coefs, pair_grads = support_side(
        stats.to(wide), student_at_ids, x_label, support, keep, config, tail,
        None if rows.grad is None else rows.reduction_factor,
    )  # fmt: skip
    if rows.grad is not None:
        grad_rows(student, ids, student_at_ids, labels, stats, row_coefs, pair_grads,
                  rows.grad, temperature=config.temperature, softcap=config.softcap,
                  ignore_index=config.ignore_index)  # fmt: skip
    return RowLosses(kd_per_row.float(), ce_per_row.float())


def support_side(stats, student_at_ids, x_label, support, keep, config, tail: bool,
                 reduction_factor):  # fmt: skip
    """The O(K) side of a row (float64): (kd_per_row, ce_per_row, row_coefs, pair_grads), the
    last two None without ``reduction_factor`` (no gradient wanted). ``stats`` (n, 5) are the
    rows' STATS (from topk_row_stats, or combined over the ranks of a vocab-parallel group),
    ``student_at_ids`` (n, K) the student's logits at the support's ids, ``x_label`` (n,) its
    logit at the label (None without CE)."""
    wide = torch.float64
    n = stats.shape[0]
    want_grad = reduction_factor is not None
    has_ce = x_label is not None
    m_a, log_z_a, log_z_out, m_s, log_z_s = stats.unbind(1)
    _, a_S = _capped_scaled(student_at_ids, config)

    # The O(K) side: the table over the support, in float64, and the gradient's constants.
    # With qg = q g (g = dD/dq, the table's gradient column) and Σ = sum_S qg + qg_tail,
    # "full" gives the pairs d_i = qg_i - q_i Σ and the rest c_q q_j, c_q = g_tail - Σ,
    # written g_tail q_S - sum_S qg with q_S = sum_S q (1 - q_tail, summed: no cancellation
    # when q_tail is near 1). "topk" normalises q over S: d_i = qg_i - q_i sum_S qg, c_q = 0.
    a_rel = a_S.to(wide) - m_a.unsqueeze(1)
    log_q, log_q_tail, bad_student = student_support_log_probs(
        a_rel, log_z_a, log_z_out if tail else None, support, config
    )
    log_p_all = torch.cat([support.log_p, support.log_p_tail.unsqueeze(1)], 1)
    log_q_all = torch.cat([log_q, log_q_tail.unsqueeze(1)], 1)
    kd_per_row = divergence_per_row(log_p_all, log_q_all, config.divergence, config.mix_weight,
                                    config.mix_weight)  # fmt: skip
    if want_grad:
        qg = divergence_log_q_grad(log_p_all, log_q_all, config.divergence, config.mix_weight,
                                   config.mix_weight)  # fmt: skip
        qg_S, qg_tail = qg[:, :-1], qg[:, -1]
        q_pairs = log_q.exp()
        sum_qg_S = qg_S.sum(1)
        if config.student_normalization == "topk":
            c_q = torch.zeros_like(sum_qg_S)
            d_pairs = qg_S - q_pairs * sum_qg_S.unsqueeze(1)
        else:
            q_tail = log_q_tail.exp()
            g_tail = torch.where(q_tail > 0, qg_tail / q_tail, 0.0)
            # q_tail = 0 with tail mass (D = +inf): the limit autograd gives through the spec.
            c_q = torch.where(q_tail > 0, g_tail * q_pairs.sum(1), -qg_tail) - sum_qg_S
            d_pairs = qg_S - q_pairs * (sum_qg_S + qg_tail).unsqueeze(1)
    bad = support.bad | bad_student
    nan_rows = torch.where(bad, math.nan, 0.0)
    kd_per_row = kd_per_row + nan_rows
    if keep is not None:
        kd_per_row = torch.where(keep, kd_per_row, 0.0)

    ce_per_row = torch.zeros(n, dtype=wide, device=stats.device)
    if has_ce:
        x_label, _ = _capped_scaled(x_label, config)
        ce_per_row = torch.where(keep, (m_s - x_label) + log_z_s, 0.0)

    if want_grad:
        kd_coef = reduction_factor.to(wide) * config.kd_grad_coef
        c_q = (c_q + nan_rows) * kd_coef
        c_ce = torch.full_like(c_q, config.ce_weight if has_ce else 0.0)
        c_ce = c_ce * reduction_factor.to(wide)
        pair_grads = (d_pairs * kd_coef).float()
        row_coefs = torch.stack([c_q, c_ce], 1).float()
        return kd_per_row.float(), ce_per_row.float(), row_coefs, pair_grads
    return kd_per_row.float(), ce_per_row.float(), None, None
