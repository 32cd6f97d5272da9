"""The baseline: the distillation loss as people write it in plain PyTorch, once.

Every benchmark, example and memory test that compares fastkd with "the formula" calls this
module. Where the ecosystem has a standard form it is used: the ``F.kl_div`` one-liner
``F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1))`` for ``forward_kl``, ``F.kl_div``
on log-probs for the other KLs, torch's cross-entropy with probability targets for
``soft_ce``, TRL's ``generalized_jsd_loss`` for ``jsd``. The logits are upcast to float32
first (a no-op on float32; float64 stays float64, so the formula can be checked against the
float64 reference), so the baseline is as accurate as fastkd and pays the memory that
accuracy costs when nothing is fused: every step below is a full N x V tensor.

A top-k teacher (design.md §4), :func:`topk_formula`: the student's ``log_softmax`` over the
vocabulary gathered at the teacher's ids, against the teacher's stored log-probabilities,
with the tail bucket as TRL writes it (``log(-expm1(logsumexp(...)))`` of both sides' top-k
mass) and the same divergence table on the K (+1) entries.

The number is fastkd's ``reduction="mean"`` on (N, V) logits: per row
``kd_weight * T^2 * D + ce_weight * CE`` (T^2 only with ``scale_by_temperature_squared``),
averaged over the rows, or with ``labels`` over the rows whose label is not
``ignore_index`` (0 when there are none, as in fastkd). Without labels and with the default
weights that is ``batchmean`` times T^2.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from typing_extensions import Unpack

from .._config import KDConfig, KDOptions


def _wide(x: Tensor) -> Tensor:
    """float32 for float32/bfloat16/float16, float64 for float64 (as fastkd's reference)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def divergence_rows(
    student: Tensor, teacher: Tensor, divergence: str, temperature: float, beta: float, alpha: float
) -> Tensor:
    """D(softmax(t/T), softmax(s/T)) of each row of (N, V) logits: shape (N,), float32
    (float64 for float64 logits)."""
    T = temperature
    log_q = F.log_softmax(_wide(student) / T, dim=-1)
    if divergence == "forward_kl":  # the one-liner fastkd's README starts from
        return F.kl_div(log_q, F.softmax(_wide(teacher) / T, dim=-1), reduction="none").sum(-1)
    log_p = F.log_softmax(_wide(teacher) / T, dim=-1)
    if divergence == "soft_ce":
        return F.cross_entropy(_wide(student) / T, log_p.exp(), reduction="none")
    return log_prob_divergence_rows(log_q, log_p, divergence, beta, alpha)


def log_prob_divergence_rows(
    log_q: Tensor, log_p: Tensor, divergence: str, beta: float, alpha: float
) -> Tensor:
    """D(p, q) of each row from the student's and the teacher's log-probabilities (..., K)."""
    if divergence == "forward_kl":
        return F.kl_div(log_q, log_p.exp(), reduction="none").sum(-1)
    if divergence == "soft_ce":
        return -(log_p.exp() * log_q).sum(-1)
    if divergence == "reverse_kl":
        return F.kl_div(log_p, log_q, reduction="none", log_target=True).sum(-1)
    if divergence == "jsd":
        # TRL's generalized_jsd_loss, beta on the teacher: m = beta p + (1 - beta) q.
        log_m = torch.logsumexp(
            torch.stack([log_q + math.log1p(-beta), log_p + math.log(beta)]), dim=0
        )
        kl_teacher = F.kl_div(log_m, log_p, reduction="none", log_target=True)
        kl_student = F.kl_div(log_m, log_q, reduction="none", log_target=True)
        return (beta * kl_teacher + (1 - beta) * kl_student).sum(-1)
    if divergence == "skew_forward_kl":
        log_m = torch.logaddexp(log_p + math.log(alpha), log_q + math.log1p(-alpha))
        return F.kl_div(log_m, log_p, reduction="none", log_target=True).sum(-1)
    if divergence == "skew_reverse_kl":
        log_m = torch.logaddexp(log_q + math.log(alpha), log_p + math.log1p(-alpha))
        return F.kl_div(log_m, log_q, reduction="none", log_target=True).sum(-1)
    if divergence == "tvd":
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
    if divergence == "hellinger":
        return 0.5 * (log_p.exp().sqrt() - log_q.exp().sqrt()).pow(2).sum(-1)
    raise ValueError(f"no plain-PyTorch formula for divergence {divergence!r}")


def kd_formula(
    student: Tensor,
    teacher: Tensor,
    labels: Tensor | None = None,
    *,
    divergence: str = "forward_kl",
    **options: Unpack[KDOptions],
) -> Tensor:
    """fastkd.kd_loss(..., reduction="mean") on (N, V) logits, in plain PyTorch (see above).

    The options are fastkd's (softcap, reduction and backend are not the formula's: left at
    their defaults). The teacher gets no gradient. ``ce_weight`` needs ``labels``: the
    hard-label cross-entropy of the student's logits at temperature 1.
    """
    config = KDConfig.from_options(divergence, **options)
    T, w = config.temperature, config.mix_weight
    rows = divergence_rows(student, teacher.detach(), divergence, T, w, w)
    return _mean_loss(rows, student, labels, config)


def topk_formula(
    student: Tensor,
    token_ids: Tensor,
    logprobs: Tensor,
    labels: Tensor | None = None,
    *,
    divergence: str = "forward_kl",
    **options: Unpack[KDOptions],
) -> Tensor:
    """fastkd.kd_loss(student, fastkd.TopKTeacher(token_ids, logprobs), ...,
    reduction="mean") on (N, V) logits and (N, K) pairs, in plain PyTorch: what people write.

    The student: ``log_softmax(s / T)`` over the vocabulary (N x V), gathered at the ids
    (``student_normalization="topk"``: ``log_softmax`` of the gathered logits). The teacher:
    the stored log-probabilities (times T_g / T with ``teacher_temperature``), or their
    ``log_softmax`` over K with ``teacher_normalization="renormalize"``. The tail bucket
    (TRL's): ``log(1 - sum exp(.))`` of each side's K log-probabilities as
    ``log(-expm1(logsumexp(.)))`` (the teacher's sum clamped to 1). Unlike fastkd, the
    student's tail comes from its top-k mass, so it cancels when the student holds nearly
    all its mass on the K ids (the benchmark's random logits are far from that), and a tail
    whose teacher mass is 0 is not dropped. No padding (every pair is real), no soft cap.
    """
    config = KDConfig.from_options(divergence, **options)
    a = _wide(student) / config.temperature
    ids = token_ids.long()
    ell = _wide(logprobs.detach()) * config.teacher_logprob_scale
    log_p = ell.log_softmax(-1) if config.teacher_normalization == "renormalize" else ell
    if config.student_normalization == "topk":
        log_q = a.gather(-1, ids).log_softmax(-1)
    else:
        log_q = a.log_softmax(-1).gather(-1, ids)
    if config.topk_tail == "bucket":
        log_p_tail = torch.log(-torch.expm1(torch.logsumexp(log_p, -1).clamp(max=0.0)))
        log_q_tail = torch.log(-torch.expm1(torch.logsumexp(log_q, -1)))
        log_p = torch.cat([log_p, log_p_tail.unsqueeze(-1)], -1)
        log_q = torch.cat([log_q, log_q_tail.unsqueeze(-1)], -1)
    w = config.mix_weight
    rows = log_prob_divergence_rows(log_q, log_p, divergence, w, w)
    return _mean_loss(rows, student, labels, config)


def _mean_loss(rows: Tensor, student: Tensor, labels: Tensor | None, config: KDConfig) -> Tensor:
    """The per-row divergences ``rows`` (N,) as fastkd's loss, reduction="mean" (see above)."""
    scale = config.kd_weight * config.t_squared
    ce_weight, ignore_index = config.ce_weight, config.ignore_index
    if labels is None:
        if ce_weight:
            raise ValueError("ce_weight needs labels")
        return scale * rows.mean()
    keep = labels.reshape(-1) != ignore_index
    count = keep.sum().clamp_min(1)
    loss = scale * torch.where(keep, rows, 0.0).sum() / count
    if ce_weight:
        ce = F.cross_entropy(
            _wide(student), labels.reshape(-1), ignore_index=ignore_index, reduction="sum"
        )
        loss = loss + ce_weight * ce / count
    return loss


def fused_linear_formula(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    labels: Tensor | None = None,
    **options,
) -> Tensor:
    """The same loss on full logits: ``hidden @ weight.T`` for both models (N x V each)."""
    student = F.linear(student_hidden, student_weight)
    with torch.no_grad():
        teacher = F.linear(teacher_hidden, teacher_weight)
    return kd_formula(student, teacher, labels, **options)


def fused_linear_topk_formula(
    student_hidden: Tensor,
    student_weight: Tensor,
    token_ids: Tensor,
    logprobs: Tensor,
    labels: Tensor | None = None,
    **options,
) -> Tensor:
    """:func:`topk_formula` on the student's full logits ``hidden @ weight.T`` (N x V)."""
    student = F.linear(student_hidden, student_weight)
    return topk_formula(student, token_ids, logprobs, labels, **options)
