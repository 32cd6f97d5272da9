"""The public losses: :class:`KDLoss` and its functional twin :func:`kd_loss`.

This module checks every argument (a clear error naming it, before any kernel runs), picks
the backend, and hands over to the kernels (``_ops``) or the reference (``reference``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from . import _backends, _ops
from .divergences import DIVERGENCES, REDUCTIONS
from .reference import kd_loss_reference


class KDLossOutput(NamedTuple):
    """``loss == kd_weight * kd_loss + ce_weight * ce_loss`` (ce_loss is None without CE).

    ``kd_loss`` (T^2 * D, or D without T^2 scaling) and ``ce_loss`` are reduced like
    ``loss`` and detached: they are for logging.
    """

    loss: Tensor
    kd_loss: Tensor
    ce_loss: Tensor | None


def _check_number(name: str, value, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    # Comparisons rather than math.isfinite, which torch.compile(dynamic=True) cannot trace
    # on a symbolic float; NaN fails them too.
    if not (-math.inf < value < math.inf) or (positive and value <= 0):
        rule = "a finite number > 0" if positive else "a finite number"
        raise ValueError(f"{name} must be {rule}, got {value!r}")
    return float(value)


def _check_flags(**flags) -> None:
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {value!r}")


def _check_options(
    divergence,
    temperature,
    beta,
    alpha,
    softcap,
    kd_weight,
    ce_weight,
    ignore_index,
    reduction,
    backend,
) -> float:
    """Validates the options that do not depend on the tensors; returns beta/alpha in use."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {sorted(DIVERGENCES)}, got {divergence!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {list(REDUCTIONS)}, got {reduction!r}")
    if backend not in _backends.BACKENDS:
        raise ValueError(f"backend must be one of {list(_backends.BACKENDS)}, got {backend!r}")
    _check_number("temperature", temperature, positive=True)
    if softcap is not None:
        _check_number("softcap", softcap, positive=True)
    _check_number("kd_weight", kd_weight)
    _check_number("ce_weight", ce_weight)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    param_name = DIVERGENCES[divergence].param
    if param_name is None:
        return 0.5
    value = beta if param_name == "beta" else alpha
    _check_number(param_name, value)
    if not 0.0 < value < 1.0:
        raise ValueError(
            f"{param_name} must lie strictly between 0 and 1 for {divergence}, got {value!r}"
        )
    return float(value)


def _check_logits(student: Tensor, teacher: Tensor) -> None:
    for name, x in (("student_logits", student), ("teacher_logits", teacher)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
        if x.dim() == 0:
            raise ValueError(f"{name} must have a vocabulary dimension, got a 0-d tensor")
    if student.device != teacher.device:
        raise ValueError(
            f"student_logits and teacher_logits must be on one device, got {student.device} "
            f"and {teacher.device}"
        )
    if student.shape[-1] != teacher.shape[-1]:
        raise ValueError(
            f"student_logits and teacher_logits must share the vocabulary size (last dim), "
            f"got {student.shape[-1]} and {teacher.shape[-1]}"
        )
    if student.shape != teacher.shape:
        raise ValueError(
            f"student_logits and teacher_logits must have the same leading shape, got "
            f"{tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    if student.shape[-1] == 0:
        raise ValueError("student_logits has an empty vocabulary dimension (V = 0)")


def _check_labels(labels, student: Tensor, ignore_index: int) -> None:
    _check_labels_for(labels, student.shape[:-1], student.shape[-1], student.device, ignore_index)


def _check_labels_for(
    labels, lead_shape: torch.Size, V: int, device: torch.device, ignore_index: int
) -> None:
    """Labels for logits of shape (*lead_shape, V) on ``device`` (FusedLinearKDLoss has no
    logits to show, only their shape)."""
    if labels is None:
        return
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor or None, got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    if labels.shape != lead_shape:
        raise ValueError(
            f"labels must have the leading shape of the logits {tuple(lead_shape)}, "
            f"got {tuple(labels.shape)}"
        )
    if labels.device != device:
        raise ValueError(f"labels must be on the logits' device {device}, got {labels.device}")
    valid = (labels == ignore_index) | ((labels >= 0) & (labels < V))
    _check_values(valid, f"labels must lie in [0, {V}) or equal ignore_index={ignore_index}")


def _check_values(valid: Tensor, message: str) -> None:
    """ValueError unless ``valid`` is all true: at once on CPU, else with the kernels."""
    if valid.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(valid.all()):
            raise ValueError(message)
    else:
        # No host sync on accelerators, and no data-dependent branch (a graph break) under
        # torch.compile: an assert that runs with the op, as torch's cross_entropy does.
        torch._assert_async(valid.all(), message)


def _check_ce_labels(ce_weight: float, labels) -> None:
    if ce_weight != 0 and labels is None:
        raise ValueError("ce_weight != 0 mixes in hard-label cross-entropy and needs labels")


def _check_num_items(num_items_in_batch, device: torch.device) -> Tensor | None:
    if num_items_in_batch is None:
        return None
    if isinstance(num_items_in_batch, Tensor):
        if num_items_in_batch.dtype == torch.bool or num_items_in_batch.is_complex():
            raise TypeError(
                f"num_items_in_batch must hold a real number, got dtype {num_items_in_batch.dtype}"
            )
        if num_items_in_batch.numel() != 1:
            raise ValueError(
                f"num_items_in_batch must hold one number, got shape "
                f"{tuple(num_items_in_batch.shape)}"
            )
        count = num_items_in_batch.reshape(())
        # 0 is let through (and counts as 1): a trainer hands it over when every label of the
        # accumulated batch is ignored, and the loss is then 0.
        _check_values(
            torch.isfinite(count) & (count >= 0),
            "num_items_in_batch must be a finite number >= 0",
        )
        return count
    if _check_number("num_items_in_batch", num_items_in_batch) <= 0:
        raise ValueError(f"num_items_in_batch must be > 0, got {num_items_in_batch!r}")
    return torch.full((), float(num_items_in_batch), device=device)


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None = None,
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
    num_items_in_batch: int | float | Tensor | None = None,
    inplace_backward: bool = False,
    backend: str = "auto",
    return_components: bool = False,
) -> Tensor | KDLossOutput:
    """Knowledge-distillation loss between student and teacher logits of shape (..., V).

    Per row: ``kd_weight * T^2 * D(softmax(t/T), softmax(s/T)) + ce_weight * CE(s, label)``;
    see :class:`KDLoss` for every argument. The teacher logits are detached: no gradient
    ever flows to them. Returns the reduced loss (float32), or a :class:`KDLossOutput` with
    ``return_components=True``.
    """
    param = _check_options(
        divergence,
        temperature,
        beta,
        alpha,
        softcap,
        kd_weight,
        ce_weight,
        ignore_index,
        reduction,
        backend,
    )
    _check_flags(
        scale_by_temperature_squared=scale_by_temperature_squared,
        inplace_backward=inplace_backward,
        return_components=return_components,
    )
    _check_logits(student_logits, teacher_logits)
    _check_labels(labels, student_logits, ignore_index)
    _check_ce_labels(ce_weight, labels)
    num_items = _check_num_items(num_items_in_batch, student_logits.device)
    dtype = torch.promote_types(student_logits.dtype, teacher_logits.dtype)
    chosen = _backends.resolve(backend, student_logits.device, dtype)
    teacher = teacher_logits.detach()

    if chosen == "torch":
        loss, kd, ce = kd_loss_reference(
            student_logits,
            teacher,
            labels,
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
            num_items_in_batch=num_items,
        )
        kd, ce = kd.detach(), None if ce is None else ce.detach()
    else:
        if inplace_backward and student_logits.requires_grad:
            _check_inplace(student_logits, teacher)
        loss, kd, ce = _ops.kd_loss_kernel(
            student_logits,
            teacher,
            labels,
            num_items,
            divergence=divergence,
            temperature=temperature,
            param=param,
            softcap=softcap,
            scale_t2=scale_by_temperature_squared,
            kd_weight=kd_weight,
            ce_weight=ce_weight,
            ignore_index=ignore_index,
            reduction=reduction,
            backend=chosen,
            inplace_backward=inplace_backward,
        )
        if ce_weight == 0:
            ce = None
    if return_components:
        return KDLossOutput(loss, kd, ce)
    return loss


def _check_inplace(student: Tensor, teacher: Tensor) -> None:
    V = student.shape[-1]
    try:
        rows = student.view(-1, V)
    except RuntimeError:
        rows = None
    if rows is None or (rows.stride(1) != 1 and V > 1):
        raise ValueError(
            "inplace_backward=True writes the gradient over student_logits, whose rows must "
            f"then be viewable as (N, V) with unit stride along V; got shape "
            f"{tuple(student.shape)} and strides {student.stride()}"
        )
    # The kernels read a row and write its gradient in one program: memory that two rows
    # share, or that the teacher reads elsewhere, would be read after it was overwritten.
    if rows.shape[0] > 1 and rows.stride(0) < V:
        raise ValueError(
            "inplace_backward=True cannot write over student_logits whose rows overlap in "
            f"memory (strides {student.stride()}, e.g. an expanded tensor); pass a copy or "
            "inplace_backward=False"
        )
    if _memory_overlaps(student, teacher) and not _same_view(student, teacher):
        raise ValueError(
            "inplace_backward=True would overwrite teacher_logits while the kernel reads it: "
            "student_logits and teacher_logits share memory without being the same view; "
            "pass a copy of the teacher or inplace_backward=False"
        )


def _byte_range(x: Tensor) -> tuple[int, int]:
    """[start, end) of the bytes x can touch in its storage."""
    start = x.storage_offset() * x.element_size()
    if x.numel() == 0:
        return start, start
    last = sum((size - 1) * stride for size, stride in zip(x.shape, x.stride(), strict=True))
    return start, start + (last + 1) * x.element_size()


def _memory_overlaps(a: Tensor, b: Tensor) -> bool:
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    (a0, a1), (b0, b1) = _byte_range(a), _byte_range(b)
    return a0 < b1 and b0 < a1


def _same_view(a: Tensor, b: Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.storage_offset() == b.storage_offset()
        and a.shape == b.shape
        and a.stride() == b.stride()
    )


class KDLoss(nn.Module):
    """Fused knowledge-distillation loss on logits, a drop-in for the F.kl_div formula.

    ``KDLoss(divergence="forward_kl", temperature=2.0)(s, t)`` equals
    ``F.kl_div(F.log_softmax(s/2, -1), F.softmax(t/2, -1), reduction="batchmean") * 4`` on
    2-D logits with ``reduction="batchmean"`` (the default ``"mean"`` averages over the rows
    not ignored), without holding any float32 copy of the N x V logits.

    Args:
        divergence: ``"forward_kl"`` KL(p||q), ``"soft_ce"`` -sum p log q, ``"reverse_kl"``
            KL(q||p), ``"jsd"`` (generalised, weight ``beta``), ``"skew_forward_kl"`` and
            ``"skew_reverse_kl"`` (mixture weight ``alpha``), ``"tvd"``; p is the teacher's
            distribution, q the student's, both at temperature T.
        temperature: T > 0; both logits are divided by it before the softmax.
        beta: the JSD weight, 0 < beta < 1 (TRL's meaning: m = beta p + (1 - beta) q).
        alpha: the skew weight, 0 < alpha < 1 (DistiLLM's meaning: KL(p || alpha p +
            (1 - alpha) q) and KL(q || alpha q + (1 - alpha) p)).
        softcap: if set, ``c * tanh(x / c)`` is applied to both logits before anything else.
        scale_by_temperature_squared: multiply the divergence by T^2 (Hinton; on by default).
        kd_weight, ce_weight: per-row loss ``kd_weight * T^2 * D + ce_weight * CE``, where CE
            is the hard-label cross-entropy of the (soft-capped) student logits at T = 1.
        ignore_index: rows whose label equals it have zero loss and zero gradient.
        reduction: ``"mean"`` (over the rows not ignored, or over ``num_items_in_batch``),
            ``"sum"``, ``"batchmean"`` (sum / student_logits.size(0), torch's KLDivLoss
            meaning) or ``"none"`` (one loss per row, shaped like the leading dims).
        inplace_backward: write the gradient over the student logits instead of a new
            N x V buffer (the student logits' values are gone after the forward). Kernel
            backends only: the ``"torch"`` reference materialises anyway and ignores it.
        backend: ``"auto"`` (the C++ kernel for CPU tensors, Triton for CUDA tensors, the
            PyTorch reference for float64 or when neither is available; the environment
            variable ``FASTKD_BACKEND`` replaces it), ``"triton"``, ``"cuda"`` (the CUDA
            kernel of fastkd._C), ``"cpu"`` (its C++ CPU kernel) or ``"torch"``.

    Forward: ``(student_logits, teacher_logits, labels=None, *, num_items_in_batch=None,
    return_components=False)``. Logits are (..., V), float32/bfloat16/float16; labels are
    integers shaped like the leading dims. The teacher logits are detached.
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
        inplace_backward: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        _check_options(
            divergence,
            temperature,
            beta,
            alpha,
            softcap,
            kd_weight,
            ce_weight,
            ignore_index,
            reduction,
            backend,
        )
        _check_flags(
            scale_by_temperature_squared=scale_by_temperature_squared,
            inplace_backward=inplace_backward,
        )
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
            inplace_backward=inplace_backward,
            backend=backend,
        )

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor,
        labels: Tensor | None = None,
        *,
        num_items_in_batch: int | float | Tensor | None = None,
        return_components: bool = False,
    ) -> Tensor | KDLossOutput:
        return kd_loss(
            student_logits,
            teacher_logits,
            labels,
            num_items_in_batch=num_items_in_batch,
            return_components=return_components,
            **self.options,
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
