"""The spec of fastkd in plain PyTorch (design.md §1): readable, materialising, autograd.

This is the oracle the tests compare every kernel against (run it on float64 inputs) and the
``backend="torch"`` fallback. It computes in float32 for float32/bfloat16/float16 logits and
in float64 for float64 logits; the gradient comes from autograd.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from typing_extensions import Unpack

from ._config import KDConfig, KDOptions


def _xlogratio(w: Tensor, log_w: Tensor, log_v: Tensor) -> Tensor:
    """w * (log_w - log_v), taken as 0 wherever w == 0 (0 log 0 = 0; masked entries).

    The inputs are cleaned before the product as well as after it: a plain ``where`` would
    still send NaN gradients through the -inf - (-inf) of masked entries.
    """
    live = w > 0
    log_w = torch.where(live, log_w, 0.0)
    log_v = torch.where(live, log_v, 0.0)
    return torch.where(live, w * (log_w - log_v), 0.0)


def _log_mixture(log_x: Tensor, log_y: Tensor, weight_x: float) -> Tensor:
    """log(weight_x * x + (1 - weight_x) * y) in log space, never via the probabilities.

    Entries where x = y = 0 are -inf, kept out of logaddexp, whose gradient there is NaN.
    """
    live = (log_x > -math.inf) | (log_y > -math.inf)
    log_x = torch.where(live, log_x, 0.0) + math.log(weight_x)
    log_y = torch.where(live, log_y, 0.0) + math.log1p(-weight_x)
    return torch.where(live, torch.logaddexp(log_x, log_y), -math.inf)


def divergence_per_row(
    log_p: Tensor, log_q: Tensor, divergence: str, beta: float = 0.5, alpha: float = 0.1
) -> Tensor:
    """D(p, q) per row, from teacher log-probs ``log_p`` and student log-probs ``log_q``."""
    p, q = log_p.exp(), log_q.exp()
    if divergence == "forward_kl":
        terms = _xlogratio(p, log_p, log_q)
    elif divergence == "soft_ce":
        terms = -torch.where(p > 0, p * torch.where(p > 0, log_q, 0.0), 0.0)
    elif divergence == "reverse_kl":
        terms = _xlogratio(q, log_q, log_p)
    elif divergence == "jsd":
        log_m = _log_mixture(log_p, log_q, beta)
        terms = beta * _xlogratio(p, log_p, log_m) + (1 - beta) * _xlogratio(q, log_q, log_m)
    elif divergence == "skew_forward_kl":
        terms = _xlogratio(p, log_p, _log_mixture(log_p, log_q, alpha))
    elif divergence == "skew_reverse_kl":
        terms = _xlogratio(q, log_q, _log_mixture(log_q, log_p, alpha))
    elif divergence == "tvd":
        terms = 0.5 * (p - q).abs()
    elif divergence == "hellinger":
        # Squared Hellinger: the square roots as exp(log / 2), 0 for masked entries and
        # finite in the gradient (no log of 0, no -inf - -inf); the sum of squares, never
        # 1 - sum sqrt(p q), which cancels where p and q are close.
        terms = 0.5 * ((0.5 * log_p).exp() - (0.5 * log_q).exp()) ** 2
    else:
        raise ValueError(f"unknown divergence {divergence!r}")
    return terms.sum(-1)


def divergence_log_q_grad(
    log_p: Tensor, log_q: Tensor, divergence: str, beta: float = 0.5, alpha: float = 0.1
) -> Tensor:
    """dD/d(log q_k) = q_k g_k per entry, g = dD/dq the design.md §1 table's gradient column:
    the derivative of :func:`divergence_per_row` (the top-k path's O(K) side spreads it over
    the vocabulary; autograd through divergence_per_row is its oracle in the tests). 0 where
    q = 0."""
    p, q = log_p.exp(), log_q.exp()
    zero = torch.zeros_like(q)

    def where_q(value: Tensor) -> Tensor:
        return torch.where(q > 0, value, zero)

    def finite(log_x: Tensor) -> Tensor:  # masked entries' -inf, out of the arithmetic
        return torch.where(q > 0, log_x, 0.0)

    if divergence in ("forward_kl", "soft_ce"):
        return -p  # g = -p/q
    if divergence == "reverse_kl":  # g = log q - log p + 1
        return where_q(q * (finite(log_q) - finite(log_p) + 1.0))
    if divergence == "jsd":  # g = (1 - beta) log(q/m)
        log_m = finite(_log_mixture(log_p, log_q, beta))
        return where_q((1 - beta) * q * (finite(log_q) - log_m))
    if divergence == "skew_forward_kl":  # g = -(1 - alpha) p/m
        log_m = finite(_log_mixture(log_p, log_q, alpha))
        return where_q(-(1 - alpha) * torch.exp(finite(log_p) + finite(log_q) - log_m))
    if divergence == "skew_reverse_kl":  # g = log(q/m) + 1 - alpha q/m, m = alpha q + (1-alpha) p
        log_q_over_m = finite(log_q) - finite(_log_mixture(log_q, log_p, alpha))
        return where_q(q * (log_q_over_m + 1.0 - alpha * torch.exp(log_q_over_m)))
    if divergence == "tvd":  # g = sign(q - p) / 2
        return 0.5 * q * torch.sign(q - p)
    if divergence == "hellinger":  # g = (1 - sqrt(p/q)) / 2
        return where_q(0.5 * (q - torch.exp(0.5 * (log_p + finite(log_q)))))
    raise ValueError(f"unknown divergence {divergence!r}")


def kd_loss_reference(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None = None,
    *,
    divergence: str = "forward_kl",
    num_items_in_batch: int | float | Tensor | None = None,
    **options: Unpack[KDOptions],
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Returns (loss, kd, ce) with loss = kd_weight * kd + ce_weight * ce, each reduced.

    kd is T^2 * D (or D when scale_by_temperature_squared is False); ce is None when
    ce_weight is 0. The options mean what they mean in :class:`fastkd.KDLoss` (``backend``
    and ``inplace_backward`` are ignored); the tensors are not validated here.
    """
    config = KDConfig.from_options(divergence, **options)
    return reference_loss(student_logits, teacher_logits, labels, num_items_in_batch, config)


def reference_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None,
    num_items_in_batch: int | float | Tensor | None,
    config: KDConfig,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """:func:`kd_loss_reference` with its options in a config: the spec itself."""
    # Only the first vocab_size columns are the vocabulary (design.md §5): the padding ones are
    # left out of both softmaxes, as if -inf, and autograd gives them a zero gradient.
    student_logits = config.vocab_view(student_logits)
    teacher_logits = config.vocab_view(teacher_logits)
    temperature, softcap = config.temperature, config.softcap
    compute_dtype = torch.promote_types(student_logits.dtype, torch.float32)
    s = student_logits.to(compute_dtype)
    t = teacher_logits.detach().to(compute_dtype)
    lead_shape = s.shape[:-1]
    keep = torch.ones(lead_shape, dtype=torch.bool, device=s.device)
    if labels is not None:
        keep = labels != config.ignore_index
        # An ignored row is 0 with a zero gradient whatever it holds: its logits are set
        # aside here, so that a NaN in them cannot reach the gradient through the softmax.
        s = torch.where(keep.unsqueeze(-1), s, 0.0)
        t = torch.where(keep.unsqueeze(-1), t, 0.0)
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
        t = softcap * torch.tanh(t / softcap)

    log_q = F.log_softmax(s / temperature, dim=-1)
    log_p = F.log_softmax(t / temperature, dim=-1)
    kd_per_row = config.t_squared * divergence_per_row(
        log_p, log_q, config.divergence, config.mix_weight, config.mix_weight
    )
    # A row with a NaN or +inf logit, or only -inf ones, has no distribution: its divergence
    # and its gradient are NaN, whatever the masked sums above make of them. The NaN enters
    # through a term that is 0 on every other row and depends on each finite student logit,
    # so that the gradient gets it too (a masked sum would hand that row zeros).
    has_distributions = (
        torch.logsumexp(s / temperature, -1).isfinite()
        & torch.logsumexp(t / temperature, -1).isfinite()
    )
    nan_rows = torch.where(has_distributions, 0.0, math.nan).unsqueeze(-1)
    kd_per_row = kd_per_row + (nan_rows * torch.where(s.isfinite(), s, 0.0)).sum(-1)

    ce_per_row = None
    if config.has_ce:
        safe_labels = torch.where(keep, labels, 0).long().unsqueeze(-1)
        ce_per_row = torch.logsumexp(s, dim=-1) - s.gather(-1, safe_labels).squeeze(-1)

    return reduce_reference(
        student_logits, kd_per_row, ce_per_row, keep, num_items_in_batch, config
    )


def reduce_reference(
    student_logits: Tensor,
    kd_per_row: Tensor,
    ce_per_row: Tensor | None,
    keep: Tensor,
    num_items_in_batch: int | float | Tensor | None,
    config: KDConfig,
    batch_size: int | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(loss, kd, ce) from the rows' losses: design.md §1's reductions over the kept rows.
    ``batch_size``: batchmean's divisor when the logits at hand are not the whole (a
    vocab-parallel shard of 1-D logits); their first dimension otherwise."""
    compute_dtype = kd_per_row.dtype

    def reduce(rows: Tensor) -> Tensor:
        rows = torch.where(keep, rows, 0.0)
        if config.reduction == "none":
            return rows
        total = rows.sum()
        if config.reduction == "sum":
            return total
        if config.reduction == "batchmean":
            size0 = student_logits.shape[0] if student_logits.dim() > 0 else 1
            size0 = size0 if batch_size is None else batch_size
            return total / max(size0, 1)
        if num_items_in_batch is not None:
            denominator = torch.as_tensor(num_items_in_batch, device=rows.device)
        else:
            denominator = keep.sum()
        denominator = denominator.to(compute_dtype)
        # An exact 0 (no row kept, so a sum of 0) divides by 1; every other count as given.
        return total / torch.where(denominator == 0, 1.0, denominator)

    kd = reduce(kd_per_row)
    ce = None if ce_per_row is None else reduce(ce_per_row)
    loss = config.kd_weight * kd + (config.ce_weight * ce if ce is not None else 0.0)
    return loss, kd, ce
