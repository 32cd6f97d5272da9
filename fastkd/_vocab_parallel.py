"""Vocab-parallel KD (design.md §5): each rank of a process group holds a contiguous shard of
the vocabulary of both logits; the ranks exchange O(N) floats per call, never O(N·V).

The phases, each a walk over the local shard in chunks of rows (so that no float32 copy of the
shard's N x V_r logits is ever held):

1. local statistics per row: the running max and rescaled sum of a = s/T and b = t/T, of s at
   T = 1 with CE, the label's logit where the label lies in this shard, and for forward_kl,
   soft_ce and reverse_kl the cross term (Σ e^(b-m_b)(b-a), or its twin), rescaled like the
   sums. One all_gather of an (N, k) tensor; every rank combines the same gathered tensor in
   rank order, so every rank holds the same log-sum-exps and the same loss, bit for bit.
2. for the mixture divergences, TVD and Hellinger only: with the global log-probabilities,
   the shard's part of D and of S = Σ_k q_k g_k (design.md §1's table, reference.py's two
   functions: the formulas live there once). A second all_gather of (N, 2).
3. the shard's gradient, dL/ds_j = factor · (kd_grad_coef (q_j g_j - q_j S) + ce_weight
   (softmax(s)_j - [j == y])) · cap'(s_j), written into a buffer of the shard's shape (or
   over the student logits with inplace_backward), and handed to autograd as in _ops.py: the
   backward only multiplies it by grad_output.

Before phase 1 one all_gather of 8 int64 per rank (the handshake) compares what every rank
must agree on — the rows, the labels, the options — and gives each rank its shard's offset;
a disagreement is a ValueError on every rank (the same gathered table decides), never a hang.
A rank whose own inputs fail their checks says so in the handshake instead of raising before
it, so that the others do not wait for it in a collective.

These phases run in PyTorch on the shard, in float64 chunks: element-wise PyTorch in float32
lost a decade against the kernels' fused formulas (jsd gradients 3e-5 off the float64 spec,
where design.md §2 allows 1e-5), and float64 costs this memory-bound walk little. The loss is
returned in float32, the gradient in the logits' dtype. That is the spec of the walks, and
what the `torch` and `cuda` backends run. The kernel backends walk the shard themselves:
`cpu` with csrc/kd_shard_cpu.cpp (_cpu_phases_loss: the same statistics, in float32, combined
here in float64), `triton` with the split-V kernels (fastkd/triton/kd_vocab_parallel.py,
_kernel_phases_loss: float32 partials of 7 floats a row, combined in the kernels).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from ._config import KDConfig, check_labels
from ._ops import _defers_factor
from .reference import divergence_log_q_grad, divergence_per_row, reduce_reference

# Who walks the dense shards: the Triton kernels (backend "triton"), the CPU kernels ("cpu"),
# or PyTorch in float64 (the others); the ranks must agree, since what they gather differs.
KERNEL_PHASES, CPU_KERNEL_PHASES, FLOAT64_PHASES = "triton-kernels", "cpu-kernels", "float64"
# The divergences whose loss comes out of phase 1 (their cross term), design.md §3.
ONE_ROUND = ("forward_kl", "soft_ce", "reverse_kl")
# Entries of one float64 temporary per chunk of rows: 2^20 (8 MiB).
CHUNK_ENTRIES = 1 << 20

_HANDSHAKE_FIELDS = (
    "refused",
    "rows",
    "width",
    "has_labels",
    "labels",
    "options",
    "vocab_size",
    "dtype",
)


@dataclass(frozen=True)
class ShardLayout:
    """Where this rank's shard lies in the vocabulary: columns [offset, offset + used) of
    ``total``; ``used`` < the shard's width where vocab_size cuts padding off."""

    group: object
    rank: int
    world: int
    offset: int
    used: int
    total: int


# --- collectives: every exchange goes through these two, so that they can be counted ----


class CollectiveLog:
    """What this rank handed to collectives: one entry (name, bytes) per call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    @property
    def bytes(self) -> int:
        return sum(n for _, n in self.calls)

    def bytes_of(self, name: str) -> int:
        return sum(n for call, n in self.calls if call == name)


_LOGS: list[CollectiveLog] = []


def all_gather(x: Tensor, group, name: str) -> Tensor:
    """(world, *x.shape): x from every rank of ``group``, in rank order."""
    x = x.contiguous()
    for log in _LOGS:
        log.calls.append((name, x.numel() * x.element_size()))
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x, group=group)
    return torch.stack(parts)


# --- the handshake ------------------------------------------------------------------------


def _options_code(config: KDConfig, phases: str, num_items: Tensor | None) -> int:
    # The backend and inplace_backward may differ between ranks; nothing else may, nor the
    # phases' implementation (what the ranks gather differs between them), nor
    # num_items_in_batch (the mean's denominator).
    items = None if num_items is None else float(num_items)
    text = config.describe(backend=None, inplace_backward=None, phases=phases, items=items)
    return zlib.crc32(text.encode())


def _labels_code(labels: Tensor | None, teacher=None) -> int:
    """A checksum of the global inputs every rank must hold alike: the labels and, for a
    top-k teacher, its ids and log-probabilities."""
    parts = [] if labels is None else [labels.reshape(-1).long()]
    if teacher is not None:
        parts.append(teacher.token_ids.reshape(-1).long())
        parts.append(teacher.logprobs.detach().float().reshape(-1).view(torch.int32).long())
    if not parts or sum(p.numel() for p in parts) == 0:
        return 0
    flat = torch.cat([p.to(parts[0].device) for p in parts])
    weights = torch.arange(1, flat.numel() + 1, device=flat.device, dtype=torch.long)
    return int(((flat + 7) * weights).sum())  # int64 wraps: still one value on every rank


def shard_layout(
    student: Tensor,
    labels: Tensor | None,
    config: KDConfig,
    vocab_size: int | None,
    group,
    refused: BaseException | None = None,
    teacher=None,
    phases: str = "",
    num_items: Tensor | None = None,
) -> ShardLayout:
    """The handshake: every rank's rows, width, labels and options, checked to agree.
    ``refused``: this rank's own inputs failed their checks; it raises that error, and every
    other rank raises one that names it, after the one collective they all reach."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if not isinstance(labels, Tensor):
        labels = None
    mine = torch.tensor(
        [
            refused is not None,
            zlib.crc32(repr(tuple(student.shape[:-1])).encode()),  # the leading shape
            student.shape[-1],
            labels is not None,
            _labels_code(labels, teacher),
            _options_code(config, phases, num_items),
            -1 if vocab_size is None else vocab_size,
            zlib.crc32(str(student.dtype).encode()),
        ],
        dtype=torch.long,
    )
    table = all_gather(mine.to(student.device), group, "handshake").cpu()
    if refused is not None:
        raise refused
    if table[:, 0].any():
        ranks = table[:, 0].nonzero().flatten().tolist()
        raise ValueError(
            f"vocab-parallel KD: the inputs of rank(s) {ranks} of process_group were refused "
            "(their own error says why); no rank computed the loss"
        )
    for column, name in enumerate(_HANDSHAKE_FIELDS):
        if name in ("refused", "width"):
            continue
        values = table[:, column].tolist()
        if len(set(values)) > 1:
            raise ValueError(_disagreement(name, values, table))
    widths = table[:, 2].tolist()
    offset, total = sum(widths[:rank]), sum(widths)
    used = widths[rank]
    if vocab_size is not None:
        if vocab_size > total:
            raise ValueError(
                f"vocab_size={vocab_size} is larger than the shards' widths {widths} summed "
                f"({total})"
            )
        used = max(0, min(used, vocab_size - offset))
        total = vocab_size
    return ShardLayout(group, rank, world, offset, used, total)


def _disagreement(name: str, values: list, table: Tensor) -> str:
    what = {
        "rows": "the logits' leading shape (rows: every rank holds every row of its shard)",
        "has_labels": "whether labels are given",
        "labels": "the labels or the top-k teacher (they are global: every rank passes the same)",
        "options": "the loss's options (divergence, temperature, weights, reduction, ...), "
        "num_items_in_batch, or the phases' implementation (backend=: Triton kernels, CPU "
        "kernels or float64 PyTorch, the same on every rank)",
        "vocab_size": "vocab_size",
        "dtype": "the logits' dtype",
    }[name]
    shown = values if name == "vocab_size" else "differs"
    return (
        f"vocab-parallel KD: the ranks of process_group disagree on {what}: {shown} (by rank; "
        f"shard widths {table[:, 2].tolist()})"
    )


# --- the phases ---------------------------------------------------------------------------


def _chunks(n_rows: int, width: int):
    step = max(1, CHUNK_ENTRIES // max(width, 1))
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


@dataclass
class _Chunk:
    s: Tensor  # soft-capped student logits (compute dtype), ignored rows zeroed
    a: Tensor
    b: Tensor


def _prepare(s: Tensor, t: Tensor, keep: Tensor, config: KDConfig, dtype) -> _Chunk:
    s, t = s.to(dtype), t.to(dtype)
    # An ignored row is 0 with a zero gradient whatever it holds (as in reference.py).
    s = torch.where(keep.unsqueeze(-1), s, 0.0)
    t = torch.where(keep.unsqueeze(-1), t, 0.0)
    if config.softcap is not None:
        s = config.softcap * torch.tanh(s / config.softcap)
        t = config.softcap * torch.tanh(t / config.softcap)
    return _Chunk(s, s / config.temperature, t / config.temperature)


def _safe(m: Tensor) -> Tensor:
    """A max to shift by: 0 where it is -inf (an empty shard row), so exp gives 0, not NaN."""
    return torch.where(m == -math.inf, 0.0, m)


def _max_and_sum(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    m = x.amax(-1) if x.shape[-1] else x.new_full(x.shape[:-1], -math.inf)
    e = torch.exp(x - _safe(m).unsqueeze(-1))
    return m, e.sum(-1), e


def _combine(m: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
    """(world, N) maxima and rescaled sums -> the global max and each rank's rescale."""
    top = m.amax(0)
    scale = torch.exp(m - _safe(top))
    return top, scale


def _lse_parts(m: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
    """(world, N) maxima and rescaled sums -> the row's (finite) maximum and log-sum, the
    log-sum-exp being their sum: the kernels take them apart (kd_math.h: log_softmax)."""
    top, scale = _combine(m, z)
    return _safe(top), torch.log((z * scale).sum(0))


@dataclass
class _RowStats:
    lse_a: Tensor
    lse_b: Tensor
    lse_s: Tensor | None
    s_label: Tensor | None
    cross: Tensor | None  # Σ p (b - a), Σ p (-a) or Σ q (a - b): phase 1's cross term
    parts: dict  # "a", "b", "s": (maximum, log-sum) of each log-sum-exp, for the kernels


def _local_label(labels: Tensor, keep: Tensor, layout: ShardLayout):
    local = labels.long() - layout.offset
    here = keep & (local >= 0) & (local < layout.used)
    return torch.where(here, local, 0), here


def _phase1(s_rows, t_rows, labels, keep, config, layout, dtype) -> _RowStats:
    n = s_rows.shape[0]
    div, has_ce = config.divergence, config.has_ce
    columns = 4 + (1 if div in ONE_ROUND else 0) + (3 if has_ce else 0)
    stats = torch.empty(n, columns, dtype=dtype, device=s_rows.device)
    for rows in _chunks(n, layout.used):
        c = _prepare(s_rows[rows], t_rows[rows], keep[rows], config, dtype)
        m_a, z_a, e_a = _max_and_sum(c.a)
        m_b, z_b, e_b = _max_and_sum(c.b)
        out = [m_a, z_a, m_b, z_b]
        if div in ("forward_kl", "soft_ce"):
            diff = c.b - c.a if div == "forward_kl" else -c.a
            out.append(torch.where(e_b > 0, e_b * diff, 0.0).sum(-1))
        elif div == "reverse_kl":
            out.append(torch.where(e_a > 0, e_a * (c.a - c.b), 0.0).sum(-1))
        if has_ce:
            m_s, z_s, _ = _max_and_sum(c.s)
            local, here = _local_label(labels[rows], keep[rows], layout)
            s_y = torch.zeros_like(m_s)
            if layout.used:  # an empty shard holds no label
                s_y = torch.where(here, c.s.gather(-1, local.unsqueeze(-1)).squeeze(-1), 0.0)
            out += [m_s, z_s, s_y]
        stats[rows] = torch.stack(out, -1)
    return _combine_stats(stats, config, layout)


def _combine_stats(stats: Tensor, config: KDConfig, layout: ShardLayout) -> _RowStats:
    """Phase 1's exchange: every rank's (n, columns) shard statistics (m_a, z_a, m_b, z_b,
    the one-round divergences' cross term Σ e^(b-m_b)(b - a) or its twin, then with CE m_s,
    z_s and the label's logit) gathered and combined, in rank order, into the rows'."""
    every = all_gather(stats, layout.group, "statistics")  # (world, n, columns)
    m_a, z_a, m_b, z_b = every[..., 0], every[..., 1], every[..., 2], every[..., 3]
    parts = {"a": _lse_parts(m_a, z_a), "b": _lse_parts(m_b, z_b)}
    cross = lse_s = s_label = None
    if config.divergence in ONE_ROUND:
        m, z = (m_a, z_a) if config.divergence == "reverse_kl" else (m_b, z_b)
        top, scale = _combine(m, z)
        weighted = torch.where(scale > 0, every[..., 4] * scale, 0.0).sum(0)
        cross = weighted / (z * scale).sum(0)
    if config.has_ce:
        k = stats.shape[-1] - 3
        parts["s"] = _lse_parts(every[..., k], every[..., k + 1])
        lse_s = _added(parts["s"])
        s_label = every[..., k + 2].sum(0)
    return _RowStats(_added(parts["a"]), _added(parts["b"]), lse_s, s_label, cross, parts)


def _added(parts: tuple[Tensor, Tensor]) -> Tensor:
    return parts[0] + parts[1]


def _log_probs(c: _Chunk, st: _RowStats, rows) -> tuple[Tensor, Tensor]:
    return c.b - st.lse_b[rows].unsqueeze(-1), c.a - st.lse_a[rows].unsqueeze(-1)


def _phase2(s_rows, t_rows, keep, config, layout, st, dtype) -> tuple[Tensor, Tensor]:
    """(D, S) per row, for the divergences without a one-round form."""
    n = s_rows.shape[0]
    parts = torch.zeros(n, 2, dtype=dtype, device=s_rows.device)
    for rows in _chunks(n, layout.used):
        c = _prepare(s_rows[rows], t_rows[rows], keep[rows], config, dtype)
        log_p, log_q = _log_probs(c, st, rows)
        w = config.mix_weight
        parts[rows, 0] = divergence_per_row(log_p, log_q, config.divergence, w, w)
        parts[rows, 1] = divergence_log_q_grad(log_p, log_q, config.divergence, w, w).sum(-1)
    total = all_gather(parts, layout.group, "divergence_terms").sum(0)
    return total[:, 0], total[:, 1]


def _divergence_and_s(s_rows, t_rows, keep, config, layout, st, dtype):
    div = config.divergence
    if div == "forward_kl":
        d = st.cross - st.lse_b + st.lse_a
        return d, torch.full_like(d, -1.0)
    if div == "soft_ce":
        d = st.cross + st.lse_a
        return d, torch.full_like(d, -1.0)
    if div == "reverse_kl":
        d = st.cross - st.lse_a + st.lse_b
        return d, d + 1.0
    return _phase2(s_rows, t_rows, keep, config, layout, st, dtype)


def _phase3(s_rows, t_rows, labels, keep, config, layout, st, s_sum, row_factor, grad, dtype):
    """The shard's gradient into ``grad`` (n, width): 0 past ``used`` (vocab_size padding)."""
    n = s_rows.shape[0]
    w = config.mix_weight
    for rows in _chunks(n if layout.used else 0, layout.used):
        c = _prepare(s_rows[rows], t_rows[rows], keep[rows], config, dtype)
        log_p, log_q = _log_probs(c, st, rows)
        qg = divergence_log_q_grad(log_p, log_q, config.divergence, w, w)
        g = config.kd_grad_coef * (qg - log_q.exp() * s_sum[rows].unsqueeze(-1))
        if config.has_ce:
            sm = torch.exp(c.s - st.lse_s[rows].unsqueeze(-1))
            local, here = _local_label(labels[rows], keep[rows], layout)
            onehot = torch.zeros_like(sm).scatter_(
                -1, local.unsqueeze(-1), here.unsqueeze(-1).to(dtype)
            )
            g = g + config.ce_weight * (sm - onehot)
        if config.softcap is not None:
            g = g * (1.0 - (c.s / config.softcap) ** 2)
        g = g * row_factor[rows].unsqueeze(-1)
        grad[rows, : layout.used] = g.to(grad.dtype)
    if layout.used < grad.shape[-1]:
        grad[:, layout.used :] = 0


# --- the loss -------------------------------------------------------------------------------


def _batch_size(student: Tensor, layout: ShardLayout) -> int:
    """batchmean's divisor: the logits' first dimension, which for 1-D logits is the whole
    vocabulary's width, not the shard's (as one process divides)."""
    return layout.total if student.dim() == 1 else (student.shape[0] if student.dim() else 1)


def _reduce_rows(student, kd_rows, ce_rows, keep, num_items, config, layout):
    """(loss, kd, ce) in float32 from the rows' T^2 D and CE (n,) and which rows count."""
    lead = student.shape[:-1]
    loss, kd, ce = reduce_reference(
        student, kd_rows.reshape(lead), None if ce_rows is None else ce_rows.reshape(lead),
        keep.reshape(lead), num_items, config, batch_size=_batch_size(student, layout),
    )  # fmt: skip
    return loss.float(), kd.float(), None if ce is None else ce.float()


def _unit_stride(rows: Tensor) -> Tensor:
    """(n, V_r) rows as the kernels take them: unit stride along V_r (a copy only if not)."""
    return rows if rows.stride(-1) == 1 or rows.shape[-1] <= 1 else rows.contiguous()


def _grad_buffer(student: Tensor, config: KDConfig) -> Tensor:
    """(n, width) rows for the shard's gradient: the student's own with inplace_backward."""
    n, width = student.shape[:-1].numel(), student.shape[-1]
    if config.inplace_backward:
        return student.detach().reshape(n, width)
    return torch.empty(n, width, dtype=student.dtype, device=student.device)


def _reduction_factor(config: KDConfig, keep: Tensor, num_items: Tensor | None, size0: int, dtype):
    if config.reduction in ("sum", "none"):
        return torch.ones((), dtype=dtype, device=keep.device)
    if config.reduction == "batchmean":
        return torch.full((), 1.0 / max(size0, 1), dtype=dtype, device=keep.device)
    count = num_items if num_items is not None else keep.sum()
    count = count.to(dtype)
    return 1.0 / torch.where(count == 0, 1.0, count)


class _StoredGrad(torch.autograd.Function):
    """The loss with its gradient computed in the forward (design.md §3): the backward
    multiplies the stored shard gradient by grad_output (and the deferred factor)."""

    @staticmethod
    def forward(ctx, student, loss, grad, deferred_factor):
        ctx.save_for_backward(grad, deferred_factor)
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_output):
        grad, deferred_factor = ctx.saved_tensors
        scale = grad_output * deferred_factor
        scale = scale.reshape(*scale.shape, 1) if scale.dim() else scale
        return grad.mul_(scale), None, None, None


def vocab_parallel_loss(student, teacher, labels, config: KDConfig, group, check_this_rank):
    """(loss, kd, ce) of design.md §5, on this rank's shards ``student`` and ``teacher``
    (..., V_r); labels global. ``check_this_rank()`` validates this rank's inputs and returns
    num_items_in_batch as a tensor. The loss is the whole loss, the same on every rank; its
    backward gives this rank's shard of the gradient."""
    from . import _backends

    refused, num_items, phases = None, None, FLOAT64_PHASES
    try:
        num_items = check_this_rank()
        backend = _backends.resolve(config.backend, student.device, student.dtype)
        phases = {"triton": KERNEL_PHASES, "cpu": CPU_KERNEL_PHASES}.get(backend, phases)
    except Exception as error:  # any: the other ranks must not wait in the handshake
        refused = error
    layout = shard_layout(student, labels, config, config.vocab_size, group, refused,
                          phases=phases, num_items=num_items)  # fmt: skip
    lead = student.shape[:-1]
    check_labels(labels, lead, layout.total, student.device, config)
    teacher = teacher.detach()
    width = student.shape[-1]
    s_rows = student.detach().reshape(lead.numel(), width)[:, : layout.used]
    t_rows = teacher.detach().reshape(lead.numel(), width)[:, : layout.used]
    n = s_rows.shape[0]
    flat_labels = None if labels is None else labels.reshape(-1)
    keep = torch.ones(n, dtype=torch.bool, device=student.device)
    if flat_labels is not None:
        keep = flat_labels != config.ignore_index
    if phases != FLOAT64_PHASES:
        run = _kernel_phases_loss if phases == KERNEL_PHASES else _cpu_phases_loss
        return run(student, _unit_stride(s_rows), _unit_stride(t_rows), flat_labels, keep,
                   num_items, config, layout)  # fmt: skip
    # float64: the phases are PyTorch element-wise code, whose float32 q g - q S lost a decade
    # of accuracy against the kernels' fused formulas (jsd gradients 1e-5 off); see the docstring.
    dtype = torch.float64

    st = _phase1(s_rows, t_rows, flat_labels, keep, config, layout, dtype)
    d, s_sum = _divergence_and_s(s_rows, t_rows, keep, config, layout, st, dtype)
    # A row without distributions (a NaN or +inf logit, or only -inf ones) is NaN, in its
    # loss and its gradient, as in the reference.
    no_dist = keep & ~(torch.isfinite(st.lse_a) & torch.isfinite(st.lse_b))
    d = torch.where(no_dist, math.nan, d)
    s_sum = torch.where(no_dist, math.nan, s_sum)
    kd_rows = torch.where(keep, config.t_squared * d, 0.0)
    ce_rows = None
    if config.has_ce:
        ce_rows = torch.where(keep, st.lse_s - st.s_label, 0.0)
    loss, kd, ce = _reduce_rows(student, kd_rows, ce_rows, keep, num_items, config, layout)
    if not (student.requires_grad and torch.is_grad_enabled()):
        return loss, kd, ce

    size0 = _batch_size(student, layout)
    factor = _reduction_factor(config, keep, num_items, size0, dtype)
    defer = _defers_factor(student, config)
    row_factor = torch.where(keep, 1.0 if defer else factor, 0.0).to(dtype)
    grad = _grad_buffer(student, config)
    _phase3(s_rows, t_rows, flat_labels, keep, config, layout, st, s_sum, row_factor, grad,
            dtype)  # fmt: skip
    deferred = factor if defer else torch.ones_like(factor)
    loss = _StoredGrad.apply(student, loss, grad.view(student.shape), deferred)
    return loss, kd, ce


def _kernel_phases_loss(student, s_rows, t_rows, flat_labels, keep, num_items, config, layout):
    """vocab_parallel_loss with the phases as Triton kernels (fastkd/triton/kd_vocab_parallel.py):
    float32 partials and gradient, as the one-process split kernels."""
    from .triton.kd_vocab_parallel import shard_rows

    width = student.shape[-1]
    wants_grad = student.requires_grad and torch.is_grad_enabled()
    size0 = _batch_size(student, layout)
    factor = _reduction_factor(config, keep, num_items, size0, torch.float32)
    defer = _defers_factor(student, config)
    grad = None
    if wants_grad:
        grad = _grad_buffer(student, config)
        if layout.used < width:
            grad[:, layout.used :] = 0  # vocab_size's padding
    rows = shard_rows(
        s_rows, t_rows, flat_labels, None if grad is None else grad[:, : layout.used],
        torch.ones_like(factor) if defer else factor, config, layout.offset,
        lambda x, name: all_gather(x, layout.group, name),
    )  # fmt: skip
    kd_rows = torch.where(keep, config.t_squared * rows.kd_per_row.double(), 0.0)
    ce_rows = None
    if config.has_ce and flat_labels is not None:
        ce_rows = torch.where(keep, rows.ce_per_row.double(), 0.0)
    loss, kd, ce = _reduce_rows(student, kd_rows, ce_rows, keep, num_items, config, layout)
    if grad is None:
        return loss, kd, ce
    deferred = factor if defer else torch.ones_like(factor)
    loss = _StoredGrad.apply(student, loss, grad.view(student.shape), deferred)
    return loss, kd, ce


# The CPU kernel's statistics with an empty shard (kd_params.h: ShardStat's columns).
_EMPTY_SHARD = (-math.inf, 0.0, -math.inf, 0.0, 0.0, -math.inf, 0.0, 0.0)


def _cpu_phases_loss(student, s_rows, t_rows, flat_labels, keep, num_items, config, layout):
    """vocab_parallel_loss with the shard walks as the CPU kernel's (csrc/kd_shard_cpu.cpp,
    float32): the exchanges and their combination as in the float64 phases."""
    from . import _compiled_rows as ops

    width, n = student.shape[-1], s_rows.shape[0]
    div, used, device = config.divergence, layout.used, student.device
    f64 = dict(dtype=torch.float64, device=device)

    def shard(phase, grad=None, consts=None):
        return ops.shard_rows(s_rows, t_rows, flat_labels, grad, consts, phase, layout.offset,
                              config)  # fmt: skip

    if used:
        local = shard(ops.SHARD_STATS).double()
    else:
        local = torch.tensor(_EMPTY_SHARD, **f64).expand(n, -1)
    m_a, z_a, m_b, z_b, cross, m_s, z_s, s_y = local.unbind(-1)
    columns = [m_a, z_a, m_b, z_b]
    if div in ONE_ROUND:
        # The kernel's cross term is relative to both maxima (kd_math.h: cross_term); the
        # float64 phases' is not.
        sa, sb = _safe(m_a), _safe(m_b)
        moved = {"forward_kl": z_b * (sb - sa), "soft_ce": -z_b * sa, "reverse_kl": z_a * (sa - sb)}
        columns.append(cross + moved[div])
    if config.has_ce:
        columns += [m_s, z_s, s_y]
    st = _combine_stats(torch.stack(columns, -1), config, layout)
    (max_a, log_z_a), (max_b, log_z_b) = st.parts["a"], st.parts["b"]
    max_s, log_z_s = st.parts.get("s", (torch.zeros(n, **f64), torch.zeros(n, **f64)))

    def constants(*columns):
        """(n, kNumShardConsts) float32 (kd_params.h: ShardConst), the rest 0."""
        rest = [torch.zeros(n, **f64)] * (11 - len(columns))
        return torch.stack([*columns, *rest], -1).float()

    q_above = q_below = torch.zeros(n, **f64)
    if div in ONE_ROUND:
        d, _ = _divergence_and_s(s_rows, t_rows, keep, config, layout, st, torch.float64)
        # S in pointwise's h (kd_math.h): -p/q, or reverse_kl's (a - m_a) - (b - m_b).
        s_sum = st.cross - (max_a - max_b) if div == "reverse_kl" else torch.full_like(d, -1.0)
    else:
        consts = constants(max_a, log_z_a, max_b, log_z_b)
        terms = shard(ops.SHARD_TERMS, consts=consts) if used else torch.zeros(n, 4, device=device)
        every = all_gather(terms, layout.group, "divergence_terms").double()
        d, s_sum, q_above, q_below = every.sum(0).unbind(-1)
    no_dist = keep & ~(torch.isfinite(st.lse_a) & torch.isfinite(st.lse_b))
    d = torch.where(no_dist, math.nan, d)
    kd_rows = torch.where(keep, config.t_squared * d, 0.0)
    ce_rows = torch.where(keep, st.lse_s - st.s_label, 0.0) if config.has_ce else None
    loss, kd, ce = _reduce_rows(student, kd_rows, ce_rows, keep, num_items, config, layout)
    if not (student.requires_grad and torch.is_grad_enabled()):
        return loss, kd, ce

    size0 = _batch_size(student, layout)
    factor = _reduction_factor(config, keep, num_items, size0, torch.float64)
    defer = _defers_factor(student, config)
    row_factor = torch.where(keep, 1.0 if defer else factor, 0.0)
    kd_coef = torch.where(no_dist, math.nan, config.kd_grad_coef * row_factor)
    grad = _grad_buffer(student, config)
    if used:
        consts = constants(max_a, log_z_a, max_b, log_z_b, max_s, log_z_s, s_sum, q_above,
                           q_below, kd_coef, config.ce_weight * row_factor)  # fmt: skip
        shard(ops.SHARD_GRAD, grad=grad[:, :used], consts=consts)
    if used < width:
        grad[:, used:] = 0  # vocab_size's padding
    deferred = factor if defer else torch.ones_like(factor)
    loss = _StoredGrad.apply(student, loss, grad.view(student.shape), deferred)
    return loss, kd, ce


# --- top-k teachers (design.md §4 over §5's shards) -------------------------------------------

# What each rank gathers per row for a top-k teacher: _topk_rows.STATS of its shard, then
# the student's logits at the support ids it holds (0 elsewhere: each id has one owner),
# then its logit at the label (0 unless the label lies in the shard).
_EMPTY_STATS = (0.0, -math.inf, -math.inf, 0.0, -math.inf)


def _local_ids(ids: Tensor, layout: ShardLayout) -> Tensor:
    """Global support ids (-1: none) -> this shard's column, or -1 (the kernels skip it)."""
    mine = (ids >= layout.offset) & (ids < layout.offset + layout.used)
    return torch.where(mine, ids - layout.offset, -1)


# The ignore_index the top-k kernels get on a shard: no local column is negative, so -1 never
# mistakes a kept row for an ignored one (the global ignore_index may be a column: a pad id).
_LOCAL_IGNORE = -1


def _local_labels(labels: Tensor | None, layout: ShardLayout, ignore_index: int):
    """Global labels -> this shard's column, or ``used`` (a column no row has) for a label
    held elsewhere, or _LOCAL_IGNORE for an ignored row."""
    if labels is None:
        return None
    local = labels.long() - layout.offset
    held = (local >= 0) & (local < layout.used)
    return torch.where(labels == ignore_index, _LOCAL_IGNORE,
                       torch.where(held, local, layout.used))  # fmt: skip


def _combine_topk_stats(every: Tensor) -> Tensor:
    """(world, n, 5) shard STATS -> the row's (n, 5), in float64: each log-sum-exp rebased on
    the largest shard maximum among the shards that hold mass."""
    m_a, log_z_a, log_z_out, m_s, log_z_s = every.unbind(-1)

    def rebase(m, *log_zs):
        held = log_zs[0] > -math.inf
        top = torch.where(held, m, -math.inf).amax(0)
        top = torch.where(top == -math.inf, 0.0, top)
        return top, [torch.logsumexp(m - top + log_z, 0) for log_z in log_zs]

    top_a, (lz_a, lz_out) = rebase(m_a, log_z_a, log_z_out)
    top_s, (lz_s,) = rebase(m_s, log_z_s)
    return torch.stack([top_a, lz_a, lz_out, top_s, lz_s], -1)


def topk_vocab_parallel_loss(student, teacher, labels, config: KDConfig, group, check_this_rank):
    """design.md §4 on §5's shards: the O(V) kernels (fastkd/_topk_rows.py) run on this rank's
    shard with the support ids it holds; one all_gather of (N, 6 + K) float32 gives every rank
    the row statistics and the student's logits at the support; the O(K) side
    (_topk_rows.support_side) then runs on every rank alike, and the gradient kernel writes
    this shard's gradient."""
    from . import _backends, _topk_rows
    from .topk_reference import check_topk_teacher, teacher_support

    refused, num_items, backend = None, None, None
    try:
        num_items = check_this_rank()
        backend = _backends.resolve(config.backend, student.device, student.dtype)
        if not _backends.REGISTRY[backend].is_kernel:
            raise ValueError(
                "vocab-parallel top-k runs on fastkd's kernels: float32, bfloat16 or float16 "
                f"student logits and a kernel backend (cpu, triton, cuda), got {backend!r} for "
                f"{student.dtype} logits"
            )
    except Exception as error:  # any: the other ranks must not wait in the handshake
        refused = error
    layout = shard_layout(student, labels, config, config.vocab_size, group, refused, teacher,
                          num_items=num_items)  # fmt: skip
    lead = student.shape[:-1]
    check_labels(labels, lead, layout.total, student.device, config)
    check_topk_teacher(teacher, lead, layout.total, student.device)

    width = student.shape[-1]
    n = lead.numel()
    rows = _unit_stride(student.detach().reshape(n, width)[:, : layout.used])
    pairs = teacher.detach().as_rows()
    flat_labels = None if labels is None else labels.reshape(-1)
    keep = None if flat_labels is None else flat_labels != config.ignore_index
    support = teacher_support(pairs, layout.total, config, keep, torch.float64)
    ids = _local_ids(torch.where(support.live, pairs.token_ids.long(), -1), layout)
    local_labels = _local_labels(flat_labels, layout, config.ignore_index)
    has_ce = flat_labels is not None and config.has_ce
    tail = config.topk_tail == "bucket"
    row_stats, grad_rows = _backends.topk_kernels(backend)

    k = ids.shape[1]
    mine = torch.zeros(n, 6 + k, dtype=torch.float32, device=student.device)
    mine[:, :5] = torch.tensor(_EMPTY_STATS, device=student.device)
    if layout.used and n:
        mine[:, :5] = row_stats(rows, ids, local_labels, temperature=config.temperature,
                                softcap=config.softcap, tail=tail, ce=has_ce,
                                ignore_index=_LOCAL_IGNORE)  # fmt: skip
        at_ids = rows.gather(1, ids.clamp(min=0)).float()
        mine[:, 5 : 5 + k] = torch.where(ids >= 0, at_ids, 0.0)
        if has_ce:
            held = (local_labels >= 0) & (local_labels < layout.used) & keep
            x_label = rows.gather(1, torch.where(held, local_labels, 0).unsqueeze(1)).squeeze(1)
            mine[:, 5 + k] = torch.where(held, x_label.float(), 0.0)
    every = all_gather(mine, group, "statistics").double()
    stats = _combine_topk_stats(every[..., :5])
    student_at_ids = every[..., 5 : 5 + k].sum(0)
    x_label = every[..., 5 + k].sum(0) if has_ce else None

    wants_grad = student.requires_grad and torch.is_grad_enabled()
    keep_all = torch.ones(n, dtype=torch.bool, device=student.device) if keep is None else keep
    size0 = _batch_size(student, layout)
    factor = _reduction_factor(config, keep_all, num_items, size0, torch.float32)
    defer = _defers_factor(student, config)
    row_factor = torch.ones_like(factor) if defer else factor
    kd_rows, ce_rows, row_coefs, pair_grads = _topk_rows.support_side(
        stats, student_at_ids, x_label, support, keep, config, tail,
        row_factor if wants_grad else None,
    )  # fmt: skip
    loss, kd, ce = reduce_reference(
        student,
        (kd_rows * config.t_squared).reshape(lead),
        ce_rows.reshape(lead) if has_ce else None,
        keep_all.reshape(lead),
        num_items,
        config,
        batch_size=_batch_size(student, layout),
    )
    if not wants_grad:
        return loss, kd, ce
    grad = _grad_buffer(student, config)
    if layout.used and n:
        grad_rows(rows, ids, rows.gather(1, ids.clamp(min=0)), local_labels, stats.float(),
                  row_coefs, pair_grads, grad[:, : layout.used], temperature=config.temperature,
                  softcap=config.softcap, ignore_index=_LOCAL_IGNORE)  # fmt: skip
    if layout.used < width:
        grad[:, layout.used :] = 0
    deferred = factor if defer else torch.ones_like(factor)
    loss = _StoredGrad.apply(student, loss, grad.view(student.shape), deferred)
    return loss, kd, ce
