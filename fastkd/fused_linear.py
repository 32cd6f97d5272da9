"""FusedLinearKDLoss: distillation straight from hidden states and LM-head weights.

design.md §3 "Fused linear": the value and gradients are those of :class:`fastkd.KDLoss` on
``hidden @ weight.T (+ bias)`` for both models, but the N x V logits are never held. Rows
are processed in chunks sized by a memory budget; per chunk:

1. student and teacher logits, float32 accumulation and a float32 result (no rounding to
   bf16/fp16 before the softmax);
2. the row kernel (KDLoss's, ``_backends.row_kernel``) writes dL/ds, already scaled by the
   reduction's factor (``_ops._grad_scale``), over the chunk's student logits;
3. grad_hidden for the chunk, and grad_weight / grad_bias accumulated in float32 (cast to
   the parameters' dtype at the end).

The gradients are computed in the forward; the backward only multiplies them by
grad_output. ``reduction="none"`` is the exception: a per-row grad_output scales the rows
of dL/ds before they are summed into grad_weight, which no afterwards-rescaling can do, so
for "none" the forward computes only the loss and the backward recomputes the chunks with
the rows scaled (two more matmuls per chunk, and no gradient held between the passes).

Rows whose label is ``ignore_index`` are dropped before any matmul. Finding them
(``nonzero``) needs the count on the host: one synchronisation per call, before the loop,
and only when labels are given; nothing inside the loop synchronises.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import _backends, _ops, _reference_rows
from .losses import (
    KDLossOutput,
    _check_ce_labels,
    _check_labels_for,
    _check_num_items,
    _check_options,
)

# Default budget for a chunk's working set when neither chunk_size nor memory_budget is
# given: on CPU a fixed one (RAM is not a device to ask). 256 MiB is a few hundred rows at
# V = 32000 on the kernel path, enough for the CPU matmuls' full speed: at N=2048, H=1024,
# V=32000 it measured as fast as 1 GiB (within noise) with 0.5 GB less peak RSS. On CUDA
# this fraction of the free memory (the driver's, plus what torch's allocator holds unused).
CPU_MEMORY_BUDGET = 256 << 20
CUDA_FREE_FRACTION = 0.25

# Floats per element of a chunk's (rows, V) logits that the kernel path holds: student and
# teacher logits, plus room for the gradient's cast to a low-precision weight dtype.
KERNEL_ROW_FLOATS = 3


@dataclass(frozen=True)
class _Config:
    """The validated options of one call, as the chunk loop needs them."""

    divergence: str
    temperature: float
    param: float
    softcap: float | None
    scale_t2: bool
    kd_weight: float
    ce_weight: float
    ignore_index: int
    reduction: str
    backend: str  # concrete: a kernel backend, or "torch" for the chunked reference
    chunk_rows: int

    def run_rows(self, rows_fn, s, t, labels, grad, scale):
        return _ops._run_rows(
            rows_fn, s, t, labels, grad, scale, self.divergence, self.temperature,
            self.param, self.softcap, self.scale_t2, self.kd_weight, self.ce_weight,
            self.ignore_index,
        )  # fmt: skip

    def row_fns(self):
        """(kd_rows, scale_rows_): the kernel's, or the reference behind the same interface."""
        if self.backend in _backends.KERNEL_BACKENDS:
            return _backends.row_kernel(self.backend)
        return _reference_rows.kd_rows, _reference_rows.scale_rows_


# --- matmuls with float32 accumulation and results --------------------------------------


def _wide(dtype: torch.dtype) -> torch.dtype:
    """The logits' dtype: float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@functools.cache
def _cuda_out_dtype(kind: str) -> bool:
    """Whether this torch's CUDA mm / in-place addmm take bf16 operands with float32 output
    (``out_dtype``, torch >= 2.8; addmm into a float32 accumulator in later versions).
    Probed once on tiny tensors, checked against the float32 product."""
    a = torch.ones(2, 2, device="cuda", dtype=torch.bfloat16)
    try:
        if kind == "mm":
            out = torch.mm(a, a, out_dtype=torch.float32)
        else:
            out = torch.ones(2, 2, device="cuda", dtype=torch.float32)
            torch.addmm(out, a, a, out_dtype=torch.float32, out=out)
    except (TypeError, RuntimeError, NotImplementedError):
        return False
    expected = 2.0 if kind == "mm" else 3.0
    return out.dtype == torch.float32 and bool((out == expected).all())


class _Head:
    """One model's LM head for one call: (N, H) hidden rows, weight (V, H), bias (V,)."""

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Tensor | None) -> None:
        self.hidden = hidden.reshape(-1, hidden.shape[-1])
        self.weight = weight
        self.wide = _wide(weight.dtype)
        low = weight.dtype != self.wide
        # bf16/fp16: on CUDA the matmul writes float32 from low-precision operands; elsewhere
        # (CPU) the weight is upcast once per call: V x H x 4 more bytes, never per chunk.
        self.native_low = low and weight.is_cuda and _cuda_out_dtype("mm")
        self.weight_op = weight.to(self.wide) if low and not self.native_low else weight
        self.bias = None if bias is None else bias.to(self.wide)

    def rows(self, index) -> Tensor:
        return self.hidden[index].to(self.weight_op.dtype)

    def logits(self, h: Tensor) -> Tensor:
        """(rows, V) logits of hidden rows h (already in weight_op's dtype)."""
        w_t = self.weight_op.t()
        if self.native_low:
            out = torch.mm(h, w_t, out_dtype=torch.float32)
            return out if self.bias is None else out.add_(self.bias)
        if self.bias is None:
            return torch.mm(h, w_t)
        return torch.addmm(self.bias, h, w_t)

    def grad_hidden(self, g: Tensor) -> Tensor:
        """g (rows, V) @ weight, in the hidden's dtype (low-precision operands on CUDA)."""
        if self.native_low:
            return torch.mm(g.to(self.weight.dtype), self.weight)
        return torch.mm(g, self.weight_op).to(self.hidden.dtype)

    def accumulate_grad_weight_(self, acc: Tensor, g: Tensor, h: Tensor) -> None:
        """acc (V, H, float32) += g.T @ h."""
        if not self.native_low:
            acc.addmm_(g.t(), h)
            return
        g_low = g.to(self.weight.dtype).t()
        if _cuda_out_dtype("addmm"):
            torch.addmm(acc, g_low, h, out_dtype=torch.float32, out=acc)
        else:
            # Older torch: a float32 product per chunk (a transient V x H float32 buffer).
            acc.add_(torch.mm(g_low, h, out_dtype=torch.float32))


# --- the chunk loop ----------------------------------------------------------------------


@dataclass
class _Grads:
    """Gradients filled by the loop: None where not wanted. Weight and bias are float32
    accumulators until ``finish``."""

    hidden: Tensor | None
    weight: Tensor | None
    bias: Tensor | None

    @classmethod
    def allocate(cls, student: _Head, needs: tuple[bool, bool, bool], all_rows_kept: bool):
        h, w = student.hidden, student.weight
        # Ignored rows are never visited: their gradient rows must start at zero.
        new = torch.empty if all_rows_kept else torch.zeros
        return cls(
            new(h.shape, dtype=h.dtype, device=h.device) if needs[0] else None,
            torch.zeros(w.shape, dtype=student.wide, device=w.device) if needs[1] else None,
            torch.zeros(w.shape[0], dtype=student.wide, device=w.device) if needs[2] else None,
        )

    def finish(self, hidden_shape, weight_dtype, bias_dtype) -> tuple:
        return (
            None if self.hidden is None else self.hidden.view(hidden_shape),
            None if self.weight is None else self.weight.to(weight_dtype),
            None if self.bias is None else self.bias.to(bias_dtype),
        )


def _kept_rows(labels1: Tensor | None, ignore_index: int, n_rows: int):
    """(index of the rows not ignored, or None for all of them; their count).

    ``nonzero`` synchronises with the device once, here, so that the loop knows its bounds.
    """
    if labels1 is None:
        return None, n_rows
    kept = torch.nonzero(labels1 != ignore_index).squeeze(1)
    n_kept = kept.numel()
    return (None if n_kept == n_rows else kept), n_kept


def _chunk_loop(
    cfg: _Config,
    student: _Head,
    teacher: _Head,
    labels1: Tensor | None,
    kept: Tensor | None,
    n_kept: int,
    scale: Tensor,
    grads: _Grads | None,
    row_factor: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Runs every chunk of the kept rows; returns (kd, ce) per row (zeros for ignored rows),
    filling ``grads`` when given.

    ``row_factor`` (one value per row) multiplies each row's gradient before the gradient
    matmuls: the backward of reduction="none".
    """
    n_rows = student.hidden.shape[0]
    kd_rows_fn, scale_rows_ = cfg.row_fns()
    wide = student.wide
    kd_all = torch.zeros(n_rows, dtype=wide, device=student.hidden.device)
    ce_all = torch.zeros_like(kd_all)
    for start in range(0, n_kept, cfg.chunk_rows):
        index = slice(start, min(start + cfg.chunk_rows, n_kept))
        if kept is not None:
            index = kept[index]
        # One call per chunk, so that its buffers are freed before the next is allocated.
        kd_all[index], ce_all[index] = _run_chunk(
            cfg, kd_rows_fn, scale_rows_, student, teacher, labels1, index, scale, grads,
            row_factor,
        )  # fmt: skip
    return kd_all, ce_all


def _run_chunk(
    cfg, kd_rows_fn, scale_rows_, student, teacher, labels1, index, scale, grads, row_factor
) -> tuple[Tensor, Tensor]:
    """The rows ``index`` (a slice or an index tensor): (kd, ce) per row, grads accumulated."""
    h_s = student.rows(index)
    s = student.logits(h_s)
    t = teacher.logits(teacher.rows(index)).to(s.dtype)
    labels_c = labels1[index] if (labels1 is not None and cfg.ce_weight != 0) else None
    grad = s if grads is not None else None  # the kernel writes dL/ds over the logits
    kd_c, ce_c = cfg.run_rows(kd_rows_fn, s, t, labels_c, grad, scale)
    del t
    if grad is not None:
        if row_factor is not None:
            scale_rows_(grad, row_factor[index].to(grad.dtype))
        if grads.hidden is not None:
            grads.hidden[index] = student.grad_hidden(grad)
        if grads.weight is not None:
            student.accumulate_grad_weight_(grads.weight, grad, h_s)
        if grads.bias is not None:
            grads.bias.add_(grad.sum(0))
    return kd_c.to(student.wide), ce_c.to(student.wide)


def _prepare(cfg: _Config, s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, labels,
             num_items):  # fmt: skip
    """Everything the loop needs: (student, teacher, labels1, scale, kept, n_kept)."""
    student = _Head(s_hidden, s_weight, s_bias)
    teacher = _Head(t_hidden, t_weight, t_bias)
    labels1 = None if labels is None else labels.reshape(-1)
    n_rows = student.hidden.shape[0]
    size0 = s_hidden.shape[0] if s_hidden.dim() > 1 else s_weight.shape[0]
    scale = _ops._grad_scale(
        cfg.reduction, n_rows, size0, labels1, num_items, cfg.ignore_index, s_hidden.device,
        student.wide,
    )  # fmt: skip
    kept, n_kept = _kept_rows(labels1, cfg.ignore_index, n_rows)
    return student, teacher, labels1, scale, kept, n_kept


def _forward(cfg: _Config, inputs: tuple, needs: tuple[bool, bool, bool]):
    """(loss, kd, ce, grads): grads is None unless ``needs`` asks for any, and then holds
    the gradients for a grad_output of 1."""
    s_hidden = inputs[0]
    with torch.autocast(s_hidden.device.type, enabled=False):
        student, teacher, labels1, scale, kept, n_kept = _prepare(cfg, *inputs)
        grads = _Grads.allocate(student, needs, kept is None) if any(needs) else None
        kd_rows, ce_rows = _chunk_loop(cfg, student, teacher, labels1, kept, n_kept, scale, grads)
        loss, kd, ce = _ops._reduce_rows(
            kd_rows, ce_rows, scale, cfg.reduction, s_hidden.shape[:-1], cfg.kd_weight,
            cfg.ce_weight,
        )  # fmt: skip
    return loss, kd, ce, grads


def _backward_none(cfg: _Config, inputs: tuple, needs, row_factor: Tensor) -> _Grads:
    """reduction="none": recompute the chunks with each row's gradient times its
    grad_output (the loss per row is recomputed too, and dropped)."""
    with torch.autocast(inputs[0].device.type, enabled=False):
        student, teacher, labels1, scale, kept, n_kept = _prepare(cfg, *inputs)
        grads = _Grads.allocate(student, needs, kept is None)
        _chunk_loop(
            cfg, student, teacher, labels1, kept, n_kept, scale, grads,
            row_factor=row_factor.reshape(-1),
        )  # fmt: skip
    return grads


class _FusedLinearKD(torch.autograd.Function):
    """Autograd for the fused loss: the forward computes the gradients, the backward scales
    them by grad_output (or, for reduction="none", recomputes them row-scaled)."""

    @staticmethod
    def forward(ctx, s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, labels,
                num_items, cfg, needs):  # fmt: skip
        inputs = (s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, labels, num_items)
        deferred = cfg.reduction == "none"
        loss, kd, ce, grads = _forward(cfg, inputs, (False,) * 3 if deferred else needs)
        ctx.cfg, ctx.needs = cfg, needs
        ctx.shapes = (s_hidden.shape, s_weight.dtype, None if s_bias is None else s_bias.dtype)
        if deferred:
            ctx.save_for_backward(*inputs)
        else:
            ctx.grads = grads.finish(*ctx.shapes)
        ctx.mark_non_differentiable(kd, ce)
        return loss, kd, ce

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_loss, d_kd, d_ce):
        if d_loss is None:
            return (None,) * 10
        if ctx.cfg.reduction == "none":
            grads = _backward_none(ctx.cfg, ctx.saved_tensors, ctx.needs, d_loss)
            g_hidden, g_weight, g_bias = grads.finish(*ctx.shapes)
        else:
            if ctx.grads is None:
                raise RuntimeError(
                    "FusedLinearKDLoss: backward through the same loss a second time; its "
                    "gradients are computed in the forward and handed over by the first "
                    "backward (compute the loss again instead of retain_graph=True)"
                )
            g_hidden, g_weight, g_bias = ctx.grads
            ctx.grads = None
            for g in (g_hidden, g_weight, g_bias):
                if g is not None:
                    g.mul_(d_loss)
        return (g_hidden, g_weight, g_bias) + (None,) * 7


# --- the public API ----------------------------------------------------------------------


def _check_head(which: str, hidden, weight, bias) -> None:
    """One model's (hidden, weight, bias): types and shapes; dtypes are checked later,
    after autocast has had its say."""
    names = (f"{which}_hidden", f"{which}_weight", f"{which}_bias")
    for name, x in zip(names, (hidden, weight, bias), strict=True):
        if x is None and name.endswith("_bias"):
            continue
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if hidden.dim() == 0:
        raise ValueError(f"{names[0]} must have a hidden dimension, got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"{names[1]} must be (V, H), got shape {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{names[1]} has hidden size {weight.shape[1]} (dim 1) but {names[0]} has "
            f"{hidden.shape[-1]} (last dim)"
        )
    for name, x in zip(names[1:], (weight, bias), strict=True):
        if x is not None and x.device != hidden.device:
            raise ValueError(
                f"{name} must be on {names[0]}'s device {hidden.device}, got {x.device}"
            )


def _check_bias(which: str, weight, bias) -> None:
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(
            f"{which}_bias must have shape ({weight.shape[0]},) (the vocabulary of "
            f"{which}_weight), got {tuple(bias.shape)}"
        )


def _check_head_dtypes(which: str, hidden, weight, bias) -> None:
    # nn.Linear's rule: the input, weight and bias share a dtype (outside autocast).
    for name, x in ((f"{which}_weight", weight), (f"{which}_bias", bias)):
        if x is not None and x.dtype != hidden.dtype:
            raise TypeError(
                f"{name} has dtype {x.dtype} but {which}_hidden has {hidden.dtype}; they must "
                "match, as for nn.Linear (or run under torch.autocast)"
            )


def _check_pair(s_hidden, s_weight, t_hidden, t_weight) -> None:
    if s_weight.shape[0] != t_weight.shape[0]:
        raise ValueError(
            f"student_weight and teacher_weight must share the vocabulary size (dim 0), got "
            f"{s_weight.shape[0]} and {t_weight.shape[0]}"
        )
    if s_weight.shape[0] == 0:
        raise ValueError("student_weight has an empty vocabulary dimension (V = 0)")
    if s_hidden.shape[:-1] != t_hidden.shape[:-1]:
        raise ValueError(
            f"student_hidden and teacher_hidden must have the same leading shape (one row per "
            f"token), got {tuple(s_hidden.shape)} and {tuple(t_hidden.shape)}"
        )
    if s_hidden.device != t_hidden.device:
        raise ValueError(
            f"student_hidden and teacher_hidden must be on one device, got {s_hidden.device} "
            f"and {t_hidden.device}"
        )


def _check_chunking(chunk_size, memory_budget) -> None:
    for name, value in (("chunk_size", chunk_size), ("memory_budget", memory_budget)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int or None, got {type(value).__name__}")
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def _default_budget(device: torch.device) -> int:
    """Bytes a chunk's working set may take when the caller gives no budget."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int((free + cached) * CUDA_FREE_FRACTION)
    return CPU_MEMORY_BUDGET


def _chunk_rows(n_rows, V, logits_dtype, backend, chunk_size, memory_budget, device) -> int:
    """Rows per chunk: ``chunk_size`` and ``memory_budget`` each cap it; with neither, the
    device's default budget does. The budget covers the chunk's logits-sized buffers."""
    if chunk_size is None and memory_budget is None:
        memory_budget = _default_budget(device)
    rows = max(n_rows, 1)
    if memory_budget is not None:
        per_elem = (
            KERNEL_ROW_FLOATS
            if backend in _backends.KERNEL_BACKENDS
            else _reference_rows.REFERENCE_ROW_FLOATS
        )
        per_row = V * per_elem * torch.finfo(logits_dtype).bits // 8
        rows = min(rows, max(memory_budget // per_row, 1))
        if rows >= 64:
            rows -= rows % 64  # whole tiles for the matmuls
    if chunk_size is not None:
        rows = min(rows, chunk_size)
    return rows


def _autocast_cast(device: torch.device, tensors: tuple) -> tuple:
    """nn.Linear under autocast: floating inputs (not float64) cast to the autocast dtype."""
    if not torch.is_autocast_enabled(device.type):
        return tensors
    dtype = torch.get_autocast_dtype(device.type)
    return tuple(x.to(dtype) if x is not None and x.dtype != torch.float64 else x for x in tensors)


# A Python loop over data-dependent chunks: torch.compile runs it eagerly (a graph break)
# rather than tracing it.
@torch.compiler.disable
def fused_linear_kd_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    labels: Tensor | None = None,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    num_items_in_batch: int | float | Tensor | None = None,
    *,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    softcap: float | None = None,
    scale_by_temperature_squared: bool = True,
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    backend: str = "auto",
    return_components: bool = False,
) -> Tensor | KDLossOutput:
    """KDLoss on ``hidden @ weight.T (+ bias)`` of both models, without the N x V logits.

    Equals ``fastkd.kd_loss(student_hidden @ student_weight.T + student_bias, teacher_hidden
    @ teacher_weight.T + teacher_bias, labels, ...)`` in value and gradients (for the student
    hidden states, weight and bias; the teacher is constant). See :class:`FusedLinearKDLoss`.
    """
    param = _check_options(
        divergence, temperature, beta, alpha, softcap, kd_weight, ce_weight, ignore_index,
        reduction, backend,
    )  # fmt: skip
    _check_chunking(chunk_size, memory_budget)
    _check_head("student", student_hidden, student_weight, student_bias)
    _check_head("teacher", teacher_hidden, teacher_weight, teacher_bias)
    _check_pair(student_hidden, student_weight, teacher_hidden, teacher_weight)
    _check_bias("student", student_weight, student_bias)
    _check_bias("teacher", teacher_weight, teacher_bias)
    device = student_hidden.device
    s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias = _autocast_cast(
        device,
        (student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
         teacher_bias),
    )  # fmt: skip
    _check_head_dtypes("student", s_hidden, s_weight, s_bias)
    _check_head_dtypes("teacher", t_hidden, t_weight, t_bias)
    V = s_weight.shape[0]
    _check_labels_for(labels, s_hidden.shape[:-1], V, device, ignore_index)
    _check_ce_labels(ce_weight, labels)
    num_items = _check_num_items(num_items_in_batch, device)
    logits_dtype = torch.promote_types(_wide(s_hidden.dtype), _wide(t_hidden.dtype))
    chosen = _backends.resolve(backend, device, logits_dtype)
    n_rows = s_hidden.numel() // s_hidden.shape[-1] if s_hidden.shape[-1] else 0
    cfg = _Config(
        divergence, float(temperature), param, softcap, bool(scale_by_temperature_squared),
        float(kd_weight), float(ce_weight), int(ignore_index), reduction, chosen,
        _chunk_rows(n_rows, V, logits_dtype, chosen, chunk_size, memory_budget, device),
    )  # fmt: skip
    teacher = tuple(None if x is None else x.detach() for x in (t_hidden, t_weight, t_bias))
    grad_on = torch.is_grad_enabled()
    needs = tuple(
        grad_on and x is not None and x.requires_grad for x in (s_hidden, s_weight, s_bias)
    )
    if any(needs):
        loss, kd, ce = _FusedLinearKD.apply(
            s_hidden, s_weight, s_bias, *teacher, labels, num_items, cfg, needs
        )
    else:
        loss, kd, ce, _ = _forward(
            cfg, (s_hidden, s_weight, s_bias, *teacher, labels, num_items), needs
        )
    if return_components:
        return KDLossOutput(loss, kd.detach(), ce.detach() if ce_weight != 0 else None)
    return loss


class FusedLinearKDLoss(nn.Module):
    """KDLoss from hidden states and LM-head weights: the logits are never held whole.

    ``FusedLinearKDLoss(**opts)(h_s, W_s, h_t, W_t, labels)`` equals
    ``KDLoss(**opts)(h_s @ W_s.T, h_t @ W_t.T, labels)`` in value and in the gradients for
    ``h_s`` and ``W_s`` (and ``student_bias``); the teacher's tensors are constants. Rows go
    through in chunks: per chunk the student's and teacher's logits are computed with float32
    accumulation into float32, the row kernel turns the student's into their gradient in
    place, and grad_hidden / grad_weight (float32 accumulator) are taken from it.

    Args:
        divergence, temperature, beta, alpha, softcap, scale_by_temperature_squared,
        kd_weight, ce_weight, ignore_index, reduction, backend: exactly as for
            :class:`fastkd.KDLoss` (``backend="auto"``: the Triton kernel on CUDA; on CPU the
            C++ kernel once built, else the reference chunk by chunk).
        chunk_size: at most this many rows (tokens) per chunk.
        memory_budget: bytes a chunk's logits-sized buffers may take (both models' logits,
            in float32); sets the chunk's rows. With neither option, the budget is a quarter
            of the free CUDA memory, or 256 MiB on CPU.

    Forward: ``(student_hidden (..., H_s), student_weight (V, H_s), teacher_hidden
    (..., H_t), teacher_weight (V, H_t), labels=None, student_bias=None, teacher_bias=None,
    num_items_in_batch=None, *, return_components=False)``. H_s and H_t may differ; V must
    match. Hidden, weight and bias of one model share a dtype (as for nn.Linear); under
    torch.autocast they are cast like nn.Linear's. KDLoss's ``inplace_backward`` has no
    counterpart: the chunk's logits are always overwritten by their gradient.

    Memory beyond the inputs: grad_hidden, a float32 grad_weight accumulator (plus its cast
    when the weight is bf16/fp16), one chunk's buffers, O(N) per-row losses; on CPU, bf16/fp16
    weights are also upcast to float32 once per call. ``reduction="none"`` computes the
    gradients in the backward (a per-row grad_output cannot be applied to grad_weight
    afterwards), running the matmuls of the forward again.
    """

    def __init__(
        self,
        divergence: str = "forward_kl",
        *,
        temperature: float = 1.0,
        beta: float = 0.5,
        alpha: float = 0.1,
        softcap: float | None = None,
        scale_by_temperature_squared: bool = True,
        kd_weight: float = 1.0,
        ce_weight: float = 0.0,
        ignore_index: int = -100,
        reduction: str = "mean",
        chunk_size: int | None = None,
        memory_budget: int | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        _check_options(
            divergence, temperature, beta, alpha, softcap, kd_weight, ce_weight,
            ignore_index, reduction, backend,
        )  # fmt: skip
        _check_chunking(chunk_size, memory_budget)
        self.options = dict(
            divergence=divergence,
            temperature=temperature,
            beta=beta,
            alpha=alpha,
            softcap=softcap,
            scale_by_temperature_squared=scale_by_temperature_squared,
            kd_weight=kd_weight,
            ce_weight=ce_weight,
            ignore_index=ignore_index,
            reduction=reduction,
            chunk_size=chunk_size,
            memory_budget=memory_budget,
            backend=backend,
        )

    def forward(
        self,
        student_hidden: Tensor,
        student_weight: Tensor,
        teacher_hidden: Tensor,
        teacher_weight: Tensor,
        labels: Tensor | None = None,
        student_bias: Tensor | None = None,
        teacher_bias: Tensor | None = None,
        num_items_in_batch: int | float | Tensor | None = None,
        *,
        return_components: bool = False,
    ) -> Tensor | KDLossOutput:
        return fused_linear_kd_loss(
            student_hidden,
            student_weight,
            teacher_hidden,
            teacher_weight,
            labels,
            student_bias,
            teacher_bias,
            num_items_in_batch,
            return_components=return_components,
            **self.options,
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
