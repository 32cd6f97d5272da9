"""FusedLinearKDLoss over a vocab-parallel LM head (design.md §5): each rank of the group holds
its contiguous rows of both LM-head weights (Megatron's ColumnParallelLinear with
gather_output=False) and the whole hidden states.

Rows go through in chunks, the same chunks on every rank (the ranks first agree on the rows
and the chunk size, the smallest any rank asks for). Per chunk, the shard's logits of both
models are computed and the vocab-parallel loss (fastkd/_vocab_parallel.py) runs on them
with reduction "sum".

- mean, sum, batchmean: each chunk's gradient is taken in the forward, as soon as its loss is
  known, and turned into grad_hidden rows and grad_weight (and bias) sums; the backward only
  multiplies them by grad_output. The hidden states' gradient is summed over the ranks there,
  in the forward (one all_reduce of N x H), as ColumnParallelLinear's input does: the loss
  owns the head, so it owns that sum.
- none: a per-row grad_output reaches grad_weight only through each row, so
  torch.utils.checkpoint keeps only each chunk's inputs and the backward computes the chunk's
  logits and loss again (twice the forward's matmuls and collectives); the hidden states'
  gradient is summed over the ranks in the backward.

Each rank's weight (and bias) gets the gradient of its own rows.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from . import _vocab_parallel
from ._config import KDConfig
from .topk import TopKTeacher


class _SumGradOverRanks(torch.autograd.Function):
    """Identity forward; the backward all-reduces the gradient (a column-parallel input)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        for log in _vocab_parallel._LOGS:
            log.calls.append(("hidden_grad", grad.numel() * grad.element_size()))
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def _agreed_chunk_rows(chunk_rows: int, n_rows: int, head_rows: int, device, group,
                       refused) -> tuple[int, int]:  # fmt: skip
    """The chunk size every rank uses (the smallest asked for), once the ranks agree on the
    rows (they go through in the same chunks), and the heads' rows summed over the ranks (the
    whole vocabulary); and the refusals: a rank whose inputs failed their checks raises its
    error, every other rank one naming it."""
    mine = torch.tensor([chunk_rows, refused is not None, n_rows, head_rows], dtype=torch.long,
                        device=device)  # fmt: skip
    table = _vocab_parallel.all_gather(mine, group, "chunking").cpu()
    if refused is not None:
        raise refused
    if table[:, 1].any():
        ranks = table[:, 1].nonzero().flatten().tolist()
        raise ValueError(
            f"vocab-parallel FusedLinearKDLoss: the inputs of rank(s) {ranks} of process_group "
            "were refused (their own error says why); no rank computed the loss"
        )
    if len(set(table[:, 2].tolist())) > 1:
        raise ValueError(
            "vocab-parallel FusedLinearKDLoss: the ranks of process_group disagree on the "
            f"rows of student_hidden (tokens): {table[:, 2].tolist()} by rank; every rank "
            "holds every row"
        )
    return int(table[:, 0].min()), int(table[:, 3].sum())


def _chunk_loss(config, group, s_hidden, s_weight, s_bias, *teacher_and_labels):
    """(loss, kd, ce) of one chunk's rows, stacked, from the student's hidden states."""
    return _chunk_on_logits(config, group, F.linear(s_hidden, s_weight, s_bias),
                            teacher_and_labels)  # fmt: skip


def _chunk_on_logits(config, group, student, teacher_and_labels):
    """(loss, kd, ce) of one chunk's rows, stacked: the teacher's shard of logits (or its
    top-k pairs), then the vocab-parallel loss."""
    from .losses import _kd_loss

    t_hidden, t_weight, t_bias, pairs, labels = teacher_and_labels
    teacher = pairs if pairs is not None else F.linear(t_hidden, t_weight, t_bias)
    out = _kd_loss(student, teacher, labels, None, config, True, group)
    ce = out.ce_loss if out.ce_loss is not None else torch.zeros_like(out.kd_loss)
    return torch.stack([out.loss, out.kd_loss, ce])


class _GradsInForward(torch.autograd.Function):
    """The reductions with a scalar loss: each chunk's gradient is taken in the forward, as
    soon as its loss is known, and turned into grad_hidden rows and grad_weight (and bias)
    sums; the backward only multiplies them by grad_output (design.md §3)."""

    @staticmethod
    def forward(ctx, s_hidden, s_weight, s_bias, run):
        total, grads = run()
        ctx.save_for_backward(*grads)
        ctx.has_bias = s_bias is not None
        return total[0], total[1], total[2]

    @staticmethod
    def backward(ctx, d_loss, d_kd, d_ce):
        grad_h, grad_w, *grad_b = ctx.saved_tensors
        scaled = [g * d_loss.to(g.dtype) if g.numel() else None for g in (grad_h, grad_w)]
        bias = grad_b[0] * d_loss.to(grad_b[0].dtype) if ctx.has_bias else None
        return scaled[0], scaled[1], bias, None


def _chunks(n: int, chunk: int):
    for start in range(0, n, chunk):
        yield slice(start, min(start + chunk, n))


def fused_linear_vocab_parallel(
    config: KDConfig, group, chunk_rows: int, s_hidden: Tensor, s_weight: Tensor,
    s_bias: Tensor | None, t_hidden: Tensor | None, t_weight: Tensor | None,
    t_bias: Tensor | None, teacher: TopKTeacher | None, labels: Tensor | None,
    num_items: Tensor | None, refused: BaseException | None = None,
):  # fmt: skip
    """(loss, kd, ce) of the whole vocabulary, the same on every rank. ``refused``: this
    rank's inputs failed their checks (raised on every rank, after the first collective)."""
    device = s_hidden.device if isinstance(s_hidden, Tensor) else torch.device("cpu")
    n_rows = s_hidden.shape[:-1].numel() if isinstance(s_hidden, Tensor) else -1
    head_rows = s_weight.shape[0] if isinstance(s_weight, Tensor) and s_weight.dim() else 0
    chunk, vocab_rows = _agreed_chunk_rows(chunk_rows, n_rows, head_rows, device, group, refused)
    chunk = max(1, chunk)
    lead = s_hidden.shape[:-1]
    n = lead.numel()
    th = None if t_hidden is None else t_hidden.detach().reshape(n, t_hidden.shape[-1])
    t_weight = None if t_weight is None else t_weight.detach()
    t_bias = None if t_bias is None else t_bias.detach()
    pairs = None if teacher is None else teacher.detach().as_rows()
    flat_labels = None if labels is None else labels.reshape(n)

    def inputs(rows):
        return (
            None if th is None else th[rows], t_weight, t_bias,
            None if pairs is None else pairs.rows(rows.start, rows.stop),
            None if flat_labels is None else flat_labels[rows],
        )  # fmt: skip

    if config.reduction == "none":
        # A per-row grad_output reaches grad_weight only through each row: the chunks are
        # checkpointed and their gradients taken in the backward.
        h = _SumGradOverRanks.apply(s_hidden, group).reshape(n, s_hidden.shape[-1])
        parts = [
            checkpoint(
                _chunk_loss,
                config,
                group,
                h[rows],
                s_weight,
                s_bias,
                *inputs(rows),
                use_reentrant=False,
            )  # fmt: skip
            for rows in _chunks(n, chunk)
        ]
        loss, kd, ce = torch.cat(parts, -1).reshape(3, *lead).unbind(0)
        return loss, kd.detach(), ce.detach() if config.has_ce else None

    keep = (
        torch.ones(n, dtype=torch.bool, device=s_hidden.device)
        if flat_labels is None
        else flat_labels != config.ignore_index
    )
    # batchmean's divisor: the logits' first dimension, the whole vocabulary for one row of
    # hidden states (as one process divides).
    size0 = s_hidden.shape[0] if s_hidden.dim() > 1 else vocab_rows
    factor = _vocab_parallel._reduction_factor(config, keep, num_items, size0, torch.float32)
    sum_config = dataclasses.replace(config, reduction="sum")
    needs = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (s_hidden, s_weight, s_bias)
    )
    hidden = s_hidden.detach().reshape(n, s_hidden.shape[-1])
    weight = s_weight.detach()
    bias = None if s_bias is None else s_bias.detach()

    def run():
        total = torch.zeros(3, dtype=torch.float32, device=s_hidden.device)
        grad_h = torch.zeros_like(hidden, dtype=torch.float32) if needs else hidden.new_empty(0)
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if needs else weight.new_empty(0)
        grad_b = None if bias is None else torch.zeros_like(bias, dtype=torch.float32)
        for rows in _chunks(n, chunk):
            with torch.enable_grad():
                logits = F.linear(hidden[rows], weight, bias).requires_grad_(needs)
                part = _chunk_on_logits(sum_config, group, logits, inputs(rows))
                total += part.detach()
                if needs:
                    (g,) = torch.autograd.grad(part[0], logits)
            if needs:
                g32 = g.float()
                grad_h[rows] = g32 @ weight.float()
                grad_w += g32.T @ hidden[rows].float()
                if grad_b is not None:
                    grad_b += g32.sum(0)
        total = total * factor
        if not needs:
            return total, ()
        grad_h *= factor
        grad_w *= factor
        for log in _vocab_parallel._LOGS:
            log.calls.append(("hidden_grad", grad_h.numel() * grad_h.element_size()))
        # The column-parallel input's sum over the ranks (see the module docstring).
        dist.all_reduce(grad_h, group=group)
        grads = [grad_h.to(s_hidden.dtype).view(s_hidden.shape), grad_w.to(s_weight.dtype)]
        if grad_b is not None:
            grads.append((grad_b * factor).to(s_bias.dtype))
        return total, grads

    loss, kd, ce = _GradsInForward.apply(s_hidden, s_weight, s_bias, run)
    return loss, kd.detach(), ce.detach() if config.has_ce else None
