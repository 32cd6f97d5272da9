"""The baseline: the distillation loss as people write it in plain PyTorch.

Where the ecosystem has a standard form we use it (``F.kl_div`` for the KLs, torch's
cross-entropy with probability targets for ``soft_ce``, TRL's ``generalized_jsd_loss`` for
``jsd``), on float32 log-probs: the logits are upcast first, so the baseline is as accurate
as fastkd and pays the memory that accuracy costs when nothing is fused. The result matches
fastkd's ``reduction="mean"`` on 2-D logits with no labels: a mean over the rows, times T^2.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _log_probs(logits: Tensor, temperature: float) -> Tensor:
    return F.log_softmax(logits.float() / temperature, dim=-1)


def kd_formula(
    student: Tensor,
    teacher: Tensor,
    *,
    divergence: str,
    temperature: float,
    beta: float,
    alpha: float,
) -> Tensor:
    """T^2 * D(softmax(t/T), softmax(s/T)) averaged over the N rows of (N, V) logits."""
    T = temperature
    log_q = _log_probs(student, T)
    log_p = _log_probs(teacher.detach(), T)
    n = student.shape[0]
    if divergence == "forward_kl":
        loss = F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)
    elif divergence == "reverse_kl":
        loss = F.kl_div(log_p, log_q, reduction="batchmean", log_target=True)
    elif divergence == "soft_ce":
        loss = F.cross_entropy(student.float() / T, log_p.exp())
    elif divergence == "jsd":
        # TRL's generalized_jsd_loss, beta on the teacher: m = beta p + (1 - beta) q.
        log_m = torch.logsumexp(
            torch.stack([log_q + math.log1p(-beta), log_p + math.log(beta)]), dim=0
        )
        kl_teacher = F.kl_div(log_m, log_p, reduction="none", log_target=True)
        kl_student = F.kl_div(log_m, log_q, reduction="none", log_target=True)
        loss = (beta * kl_teacher + (1 - beta) * kl_student).sum() / n
    elif divergence == "skew_forward_kl":
        log_m = torch.logaddexp(log_p + math.log(alpha), log_q + math.log1p(-alpha))
        loss = F.kl_div(log_m, log_p, reduction="batchmean", log_target=True)
    elif divergence == "skew_reverse_kl":
        log_m = torch.logaddexp(log_q + math.log(alpha), log_p + math.log1p(-alpha))
        loss = F.kl_div(log_m, log_q, reduction="batchmean", log_target=True)
    elif divergence == "tvd":
        loss = 0.5 * (log_p.exp() - log_q.exp()).abs().sum() / n
    else:
        raise ValueError(f"no plain-PyTorch formula for divergence {divergence!r}")
    return loss * T**2


def fused_linear_formula(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    **options,
) -> Tensor:
    """The same loss on full logits: ``hidden @ weight.T`` for both models (N x V each)."""
    student = F.linear(student_hidden, student_weight)
    with torch.no_grad():
        teacher = F.linear(teacher_hidden, teacher_weight)
    return kd_formula(student, teacher, **options)
