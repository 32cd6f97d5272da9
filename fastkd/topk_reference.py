"""The spec of the top-k loss (design.md §4) in plain PyTorch: readable, materialising, autograd.

A teacher seen only through its top-k (token id, log-probability) pairs, a :class:`TopKTeacher`,
against a student's full logits. This is the oracle the top-k kernels are tested against (run
it on float64 inputs); autograd through it is the gradient oracle. Like
:func:`fastkd.kd_loss_reference` it computes in float32 for float32/bfloat16/float16 student
logits and in float64 for float64 ones (the teacher's log-probabilities are cast to that).

Per row, with S the row's support (its unpadded ids) and ℓ its stored log-probabilities:

1. teacher over S: ℓ ← ℓ·T_g/T when ``teacher_temperature`` T_g differs from T; then
   ``raw``: log p_i = ℓ_i, or ``renormalize``: log p_i = ℓ_i − lse_S(ℓ);
   ``topk_tail="bucket"`` (raw only) adds log p_tail = log(−expm1(lse_S(ℓ))), 0 mass when
   lse_S(ℓ) ≥ 0;
2. student, a = softcap(s)/T: ``full``: log q_i = a_{id_i} − lse_V(a), and the tail entry
   log q_tail = lse_{j∉S}(a_j) − lse_V(a) from the entries outside S; ``topk``:
   log q_i = a_{id_i} − lse_S(a_S);
3. D = the divergence table of :func:`fastkd.reference.divergence_per_row` over those
   vectors (padding enters both as −inf, which the table drops), and
   L = kd_weight·T²·D + ce_weight·CE, reduced as in :func:`fastkd.kd_loss_reference`.

Choices where design.md §4 is silent (the kernels must match them):

- A tail entry whose teacher mass is 0 is absent from D (its q_tail too), for every
  divergence: "an entry with p = 0 contributes 0". That happens when lse_S(ℓ) ≥ 0, and when
  S covers the whole vocabulary (there is nothing outside S, whatever rounding leaves of
  1 − Σ e^ℓ). Without it reverse_kl, jsd, tvd... would charge the student's q_tail against a
  teacher mass that rounding, not the teacher, set to 0.
- A row whose support is empty (every pair padding) has D = 0 and no KD gradient: the
  teacher says nothing about it. It still counts in ``mean`` (its CE, if any, is kept) like
  any row whose label is not ignored. With the bucket tail this is what the formulas give
  anyway (p_tail = q_tail = 1); the kernels get it by accumulating over no pairs.
- A row "has no distribution" (D and its gradient NaN, as in kd_loss_reference) when the
  student's normaliser is not finite (lse_V(a) for ``full``; lse_S(a_S) for ``topk`` with
  a non-empty support), or when one of its real pairs has a NaN or +inf log-probability. A
  NaN log-probability is a real pair here, not padding: only ``mask`` False and −inf pad.
- The ids of padding pairs are never read: they may hold anything (−1, repeats). The ids of
  real pairs are checked on every row, ignored ones included (they are the input's
  contract, not the loss's).
- The teacher's log-probabilities are not soft-capped (``softcap`` applies to the student;
  a producer soft-caps before its top-k, as design.md §4's ``topk_logprobs`` does).
- Nothing is smoothed: a tail mass p_tail > 0 (even a rounding residue of 1e-16) against a
  student with nothing outside S (−inf logits there) is D = +inf for forward_kl and soft_ce,
  as the dense loss is where the student has −inf and the teacher mass; the gradient stays
  finite. Student ``topk`` with a raw teacher is allowed (design.md lists no rule against
  it; MaxText issue 4056 is the pitfall it invites).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from typing_extensions import Unpack

from ._config import (
    KDConfig,
    KDOptions,
    check_float_tensor,
    check_labels,
    check_num_items,
    check_values,
    check_vocab_widths,
)
from .reference import divergence_per_row, reduce_reference
from .topk import TopKTeacher


def topk_loss_reference(
    student_logits: Tensor,
    teacher: TopKTeacher,
    labels: Tensor | None = None,
    *,
    divergence: str = "forward_kl",
    num_items_in_batch: int | float | Tensor | None = None,
    **options: Unpack[KDOptions],
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Returns (loss, kd, ce), each reduced, with loss = kd_weight * kd + ce_weight * ce.

    kd is T^2 * D (or D when scale_by_temperature_squared is False) with D over the top-k
    support (design.md §4); ce is None when ce_weight is 0. ``options`` are the KDOptions,
    the top-k ones included (``backend`` and ``inplace_backward`` are accepted and ignored).
    Every argument is checked: a clear error naming it.
    """
    config = KDConfig.from_options(divergence, **options)
    V = check_topk_inputs(student_logits, teacher, config.vocab_size)
    check_labels(labels, student_logits.shape[:-1], V, student_logits.device, config)
    num_items = check_num_items(num_items_in_batch, student_logits.device)
    return topk_reference_loss(student_logits, teacher, labels, num_items, config)


def check_topk_inputs(
    student_logits: Tensor, teacher: TopKTeacher, vocab_size: int | None = None
) -> int:
    """The student logits (..., V) and a TopKTeacher (..., K) that fits them: K <= V, real
    ids in [0, V) and distinct within their row (at once on CPU, with the op elsewhere).
    V is ``vocab_size`` when given (the student may be wider), and is returned."""
    check_float_tensor("student_logits", student_logits)
    if student_logits.dim() == 0:
        raise ValueError("student_logits must have a vocabulary dimension, got a 0-d tensor")
    V = check_vocab_widths(vocab_size, "columns", student_logits=student_logits.shape[-1])
    check_topk_teacher(teacher, student_logits.shape[:-1], V, student_logits.device)
    return V


def check_topk_teacher(
    teacher: TopKTeacher, lead_shape: torch.Size, V: int | None, device: torch.device
) -> None:
    """A TopKTeacher (..., K) for student logits of shape (*lead_shape, V) on ``device``
    (FusedLinearKDLoss has no logits to show, only their shape). V None: its shapes only (a
    vocab-parallel rank before the ranks agree on the vocabulary)."""
    if not isinstance(teacher, TopKTeacher):
        raise TypeError(f"teacher must be a fastkd TopKTeacher, got {type(teacher).__name__}")
    if teacher.lead_shape != lead_shape:
        raise ValueError(
            f"teacher.token_ids (..., K) must have the student logits' leading shape "
            f"{tuple(lead_shape)}, got {tuple(teacher.token_ids.shape)}"
        )
    if teacher.token_ids.device != device:
        raise ValueError(
            f"teacher and the student must be on one device, got "
            f"{teacher.token_ids.device} and {device}"
        )
    if V is None:
        return
    if teacher.k > V:
        raise ValueError(
            f"teacher has K = {teacher.k} pairs per row, more than the vocabulary V = {V}"
        )
    live = live_pairs(teacher)
    ids = teacher.token_ids
    check_values(
        ~live | ((ids >= 0) & (ids < V)),
        f"teacher.token_ids must lie in [0, {V}) (the student's vocabulary, or vocab_size) "
        f"on every pair that is not padding",
    )
    check_values(
        _distinct_in_rows(ids, live),
        "teacher.token_ids must be distinct within a row (among unpadded pairs)",
    )


def live_pairs(teacher: TopKTeacher) -> Tensor:
    """(..., K) bool: the real pairs. Padding is mask False or a logprob of −inf; a NaN
    logprob is a real pair (its row is then NaN), unlike TopKTeacher.valid()."""
    live = teacher.logprobs != -math.inf
    return live if teacher.mask is None else live & teacher.mask


def _distinct_in_rows(ids: Tensor, live: Tensor) -> Tensor:
    """(...) bool: no two real pairs of a row share an id. Sorted, O(K log K) a row: nothing
    of size V."""
    # Padding gets ids below any real one, each its own: -1, -2, ...
    k = ids.shape[-1]
    pad = -torch.arange(1, k + 1, device=ids.device, dtype=torch.int64)
    keyed = torch.where(live, ids.long(), pad.expand(ids.shape))
    ordered = keyed.sort(-1).values
    return (ordered[..., 1:] != ordered[..., :-1]).all(-1)


def _support_mask(ids: Tensor, live: Tensor, V: int) -> Tensor:
    """(..., V) bool: the entries a real pair of the row names (the reference materialises).
    Counted with scatter_add: padding pairs are sent to entry 0 and must not unmark it."""
    safe_ids = torch.where(live, ids, 0).long()
    counts = torch.zeros((*ids.shape[:-1], V), dtype=torch.int32, device=ids.device)
    return counts.scatter_add(-1, safe_ids, live.to(torch.int32)) > 0


def _masked_lse(x: Tensor, keep: Tensor) -> Tensor:
    """lse over the entries where ``keep``; -inf where none is kept or all of them are -inf.

    Its gradient reaches no entry of ``x`` that is not kept or is -inf, finite or not: the
    logsumexp of only -inf has a NaN gradient, and it stays on the constants of the where.
    """
    return torch.logsumexp(torch.where(keep & (x != -math.inf), x, -math.inf), -1)


@dataclass(frozen=True)
class TeacherSupport:
    """A top-k teacher over its support (design.md §4, "Teacher over S"), in the compute dtype.

    ``live`` (..., K): the real pairs of kept rows; ``log_p`` (..., K), −inf on padding;
    ``log_p_tail`` (...), the tail entry, −inf where it is absent (no tail option, a teacher
    mass of 0 outside S, or S covering the vocabulary); ``bad`` (...): a real pair with a NaN
    or +inf log-probability."""

    live: Tensor
    log_p: Tensor
    log_p_tail: Tensor
    bad: Tensor


def teacher_support(
    teacher: TopKTeacher, V: int, config: KDConfig, keep: Tensor | None, dtype: torch.dtype
) -> TeacherSupport:
    live = live_pairs(teacher)
    if keep is not None:
        live = live & keep.unsqueeze(-1)
    ell = teacher.logprobs.detach().to(dtype)
    bad = (live & ~ell.isfinite()).any(-1)
    ell = torch.where(live, ell * config.teacher_logprob_scale, -math.inf)
    lse_ell = _masked_lse(ell, live)
    if config.teacher_normalization == "renormalize":
        log_p = torch.where(live, ell - lse_ell.unsqueeze(-1), -math.inf)
    else:
        log_p = ell
    log_p_tail = torch.full_like(lse_ell, -math.inf)
    if config.topk_tail == "bucket":
        # p_tail = 1 - sum_S e^l, in log space without the cancellation; 0 once rounding
        # pushes the sum to 1 or past it, and when S is the whole vocabulary.
        log_p_tail = torch.log(-torch.expm1(lse_ell.clamp(max=0.0)))
        covers_vocab = live.sum(-1) == V
        log_p_tail = torch.where(covers_vocab, -math.inf, log_p_tail)
    return TeacherSupport(live, log_p, log_p_tail, bad)


def student_support_log_probs(
    a_S: Tensor, lse_a: Tensor, lse_out: Tensor | None, support: TeacherSupport,
    config: KDConfig,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """(log_q (..., K), log_q_tail (...), bad (...)): the student over the support.

    ``a_S`` (..., K) are a = softcap(s)/T at the pairs' ids, ``lse_a`` (...) the lse of a over
    the vocabulary and ``lse_out`` (...) over the entries outside S (None without the tail);
    any constant shared by the three may be taken out of them (the kernels pass them relative
    to a's maximum). ``bad`` marks rows whose normaliser is not finite."""
    live = support.live
    if config.student_normalization == "topk":
        lse_q = _masked_lse(a_S, live)
        bad = ~lse_q.isfinite() & live.any(-1)
        lse_q = torch.where(lse_q.isfinite(), lse_q, 0.0)
    else:
        lse_q = lse_a
        bad = ~lse_q.isfinite()
        lse_q = torch.where(bad, 0.0, lse_q)
    log_q = torch.where(live, a_S - lse_q.unsqueeze(-1), -math.inf)
    log_q_tail = torch.full_like(lse_q, -math.inf)
    if lse_out is not None:
        # q_tail from the entries outside S, never 1 - sum_S q (it cancels to 0 or below).
        has_tail = support.log_p_tail > -math.inf
        log_q_tail = torch.where(has_tail, lse_out - lse_q, -math.inf)
    return log_q, log_q_tail, bad


def support_divergence(
    support: TeacherSupport, log_q: Tensor, log_q_tail: Tensor, config: KDConfig
) -> Tensor:
    """D per row (...): design.md §1's table over the support and the tail entry (padding and
    an absent tail enter both sides as −inf, which the table drops)."""
    log_p = torch.cat([support.log_p, support.log_p_tail.unsqueeze(-1)], -1)
    log_q = torch.cat([log_q, log_q_tail.unsqueeze(-1)], -1)
    return divergence_per_row(log_p, log_q, config.divergence, config.mix_weight,
                              config.mix_weight)  # fmt: skip


def topk_support_log_probs(
    student_logits: Tensor,
    teacher: TopKTeacher,
    config: KDConfig,
    keep: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(log_p, log_q, nan_rows): the teacher's and the student's log-probabilities over the
    support, (..., K + 1) with the tail last; padding (and an absent tail) is −inf in both.
    ``nan_rows`` (...) is True on rows without a distribution. Rows where ``keep`` is False
    are set aside (no pair, student logits 0)."""
    compute_dtype = torch.promote_types(student_logits.dtype, torch.float32)
    s = student_logits.to(compute_dtype)
    V = s.shape[-1]
    if keep is not None:
        s = torch.where(keep.unsqueeze(-1), s, 0.0)
    if config.softcap is not None:
        s = config.softcap * torch.tanh(s / config.softcap)
    a = s / config.temperature
    support = teacher_support(teacher, V, config, keep, compute_dtype)
    live = support.live
    # The student at the support's ids (padding ids are never read).
    a_S = a.gather(-1, torch.where(live, teacher.token_ids, 0).long())
    lse_out = None
    if config.topk_tail == "bucket":
        lse_out = _masked_lse(a, ~_support_mask(teacher.token_ids, live, V))
    log_q, log_q_tail, bad = student_support_log_probs(
        a_S, torch.logsumexp(a, -1), lse_out, support, config
    )
    log_p = torch.cat([support.log_p, support.log_p_tail.unsqueeze(-1)], -1)
    log_q = torch.cat([log_q, log_q_tail.unsqueeze(-1)], -1)
    return log_p, log_q, support.bad | bad


def topk_reference_loss(
    student_logits: Tensor,
    teacher: TopKTeacher,
    labels: Tensor | None,
    num_items_in_batch: Tensor | None,
    config: KDConfig,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """:func:`topk_loss_reference` with its options in a config and its inputs checked
    (``num_items_in_batch`` as :func:`fastkd._config.check_num_items` returns it)."""
    # Padding columns past vocab_size (design.md §5) are not part of the student's softmax.
    student_logits = config.vocab_view(student_logits)
    compute_dtype = torch.promote_types(student_logits.dtype, torch.float32)
    s = student_logits.to(compute_dtype)
    lead_shape = s.shape[:-1]
    keep = torch.ones(lead_shape, dtype=torch.bool, device=s.device)
    if labels is not None:
        keep = labels != config.ignore_index
        # An ignored row is 0 with a zero gradient whatever it holds (kd_loss_reference).
        s = torch.where(keep.unsqueeze(-1), s, 0.0)

    log_p, log_q, nan_rows = topk_support_log_probs(s, teacher, config, keep)
    kd_per_row = config.t_squared * divergence_per_row(
        log_p, log_q, config.divergence, config.mix_weight, config.mix_weight
    )
    # A row without a distribution: NaN in D and in the gradient of each finite logit, as in
    # kd_loss_reference (a term that is 0 on every other row).
    nan_term = torch.where(nan_rows, math.nan, 0.0).unsqueeze(-1)
    kd_per_row = kd_per_row + (nan_term * torch.where(s.isfinite(), s, 0.0)).sum(-1)

    ce_per_row = None
    if config.has_ce:
        if config.softcap is not None:
            s = config.softcap * torch.tanh(s / config.softcap)
        safe_labels = torch.where(keep, labels, 0).long().unsqueeze(-1)
        ce_per_row = torch.logsumexp(s, dim=-1) - s.gather(-1, safe_labels).squeeze(-1)

    return reduce_reference(
        student_logits, kd_per_row, ce_per_row, keep, num_items_in_batch, config
    )
