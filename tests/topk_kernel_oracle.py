"""The float64 oracle of the two top-k row functions every kernel backend implements
(``topk_row_stats`` and ``topk_grad_rows``; their contract is fastkd/_topk_rows.py's
docstring). Plain PyTorch, materialising, written from the formulas, not from a kernel."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def capped(x: Tensor, softcap: float | None) -> Tensor:
    x = x.double()
    return x if softcap is None else softcap * torch.tanh(x / softcap)


def support_mask(ids: Tensor, V: int) -> Tensor:
    """(n, V) bool: the entries named by a pair (ids >= 0)."""
    live = ids.cpu() >= 0
    # scatter_add: padding is sent to entry 0 and must not unmark it.
    counts = torch.zeros(ids.shape[0], V, dtype=torch.int32)
    return counts.scatter_add_(1, torch.where(live, ids.cpu(), 0), live.to(torch.int32)) > 0


def _max_and_log_z(x: Tensor, keep: Tensor | None = None) -> tuple[Tensor, Tensor]:
    if keep is not None:
        x = torch.where(keep, x, -math.inf)
    m = x.max(-1).values
    m_safe = torch.where(m == -math.inf, 0.0, m)
    return m_safe, torch.log(torch.exp(x - m_safe.unsqueeze(-1)).sum(-1))


def row_stats(student, ids, labels, *, temperature, softcap, tail, ce, ignore_index):
    """(n, 5) float64: m_a, log_z_a, log_z_out, m_s, log_z_s (see fastkd/_topk_rows.py)."""
    s = student.detach().cpu()
    ids = ids.cpu()
    x = capped(s, softcap)
    a = x * float(torch.tensor(1.0 / temperature, dtype=torch.float32))
    stats = torch.zeros(s.shape[0], 5, dtype=torch.float64)
    m_a, log_z_a = _max_and_log_z(a)
    stats[:, 0], stats[:, 1] = m_a, log_z_a
    if tail:
        outside = ~support_mask(ids, s.shape[1])
        kept = torch.where(outside, a - m_a.unsqueeze(-1), -math.inf)
        stats[:, 2] = torch.logsumexp(kept, -1)
    if ce:
        stats[:, 3], stats[:, 4] = _max_and_log_z(x)
    if labels is not None:
        stats[labels.cpu() == ignore_index] = 0.0
    return stats


def grad_rows(student, ids, student_at_ids, labels, stats, row_coefs, pair_grads, *,
              temperature, softcap, ignore_index):  # fmt: skip
    """(n, V) float64: the gradient topk_grad_rows writes."""
    s = student.detach().cpu()
    ids, stats = ids.cpu(), stats.cpu().double()
    coefs, d = row_coefs.cpu().double(), pair_grads.cpu().double()
    inv_t = float(torch.tensor(1.0 / temperature, dtype=torch.float32))
    n, V = s.shape
    m_a, log_z_a, _, m_s, log_z_s = (stats[:, k : k + 1] for k in range(5))
    c_q, c_ce = coefs[:, 0:1], coefs[:, 1:2]

    def entry(x, cols, pair_term):
        """The gradient at logits x (soft-capped) in columns cols; pair_term is d (pairs)
        or None (the dense formula)."""
        a = x * inv_t
        # A term whose coefficient is 0 contributes exactly 0.
        if pair_term is None:
            g = torch.where(c_q != 0, c_q * torch.exp((a - m_a) - log_z_a), 0.0)
        else:
            g = pair_term.clone()
        if labels is not None:
            onehot = (cols == labels.cpu().unsqueeze(-1)).double()
            sm = torch.exp((x - m_s) - log_z_s)
            g = g + torch.where(c_ce != 0, c_ce * (sm - onehot), 0.0)
        if softcap is not None:
            g = g * (1.0 - (x / softcap) ** 2)
        return g

    grad = entry(capped(s, softcap), torch.arange(V).expand(n, V), None)
    fix = entry(capped(student_at_ids.detach().cpu(), softcap), ids, d)
    live = ids >= 0
    rows = torch.arange(n).unsqueeze(-1).expand_as(ids)
    grad[rows[live], ids[live]] = fix[live]
    if labels is not None:
        grad[labels.cpu() == ignore_index] = 0.0
    return grad
