"""KDLoss as torch ops: ``fastkd::kd_loss`` and its in-place twin, with autograd.

The forward runs a row kernel that computes the loss and, when the student needs a
gradient, the gradient already scaled by the reduction's factor (design.md §3; float16
gradients get it in the backward, see _defers_factor). The backward only multiplies that
stored gradient by grad_output (skipped on the device where it is 1).
The ops are opaque to torch.compile (fake implementations give their shapes), so a compiled
model calls the same kernels with no graph break. Their schemas take the loss's options as
:class:`KDConfig`'s fields (``KDConfig.op_schema``): a new option is a new field there, and
only ``KDConfig.to_op_args`` / ``KDConfig.from_op_args`` cross this boundary.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from . import _backends, _rows
from ._config import KDConfig
from ._rows import RowArgs
from .topk import TopKTeacher

_LIB = torch.library.Library("fastkd", "FRAGMENT")
_INPUTS = "Tensor teacher, Tensor? labels, Tensor? num_items_in_batch"
# (loss, kd, ce, grad, reduction_factor): grad is dloss/dstudent shaped like the student (or
# empty), short of the 0-d reduction_factor when _defers_factor.
_LIB.define(
    f"kd_loss(Tensor student, {_INPUTS}, bool compute_grad, {KDConfig.op_schema()}) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)
# (loss, kd, ce, reduction_factor), with dloss/dstudent written over the student logits.
_LIB.define(
    f"kd_loss_inplace(Tensor(a!) student, {_INPUTS}, {KDConfig.op_schema()}) "
    "-> (Tensor, Tensor, Tensor, Tensor)"
)
# The same with a top-k teacher (design.md §4) in place of the teacher logits: its (..., K)
# token ids, log-probabilities and optional mask (fastkd.TopKTeacher's fields).
_TOPK_INPUTS = "Tensor token_ids, Tensor logprobs, Tensor? mask, Tensor? labels, " \
    "Tensor? num_items_in_batch"  # fmt: skip
_LIB.define(
    f"topk_kd_loss(Tensor student, {_TOPK_INPUTS}, bool compute_grad, {KDConfig.op_schema()}) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)
_LIB.define(
    f"topk_kd_loss_inplace(Tensor(a!) student, {_TOPK_INPUTS}, {KDConfig.op_schema()}) "
    "-> (Tensor, Tensor, Tensor, Tensor)"
)
# grad *= grad_output (a scalar, or one value per leading index), in place.
_LIB.define("scale_grad_(Tensor(a!) grad, Tensor grad_output, str backend) -> ()")


def _defers_factor(student: Tensor, config: KDConfig) -> bool:
    """A float16 gradient gets the reduction's factor in the backward, with grad_output:
    stored as (q - p) / N it would flush to zero (below 6e-8) before a GradScaler's
    grad_output of 2^16 could lift it. bfloat16 has float32's range."""
    return student.dtype == torch.float16 and config.reduction in ("mean", "batchmean")


def _loss_shape(student: Tensor, config: KDConfig) -> torch.Size:
    return student.shape[:-1] if config.reduction == "none" else torch.Size([])


def _kd_forward(
    student: Tensor,
    teacher: Tensor | TopKTeacher,
    labels: Tensor | None,
    num_items_in_batch: Tensor | None,
    config: KDConfig,
    grad: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Runs the row kernel (gradient into ``grad`` when given) and reduces: (loss, kd, ce,
    the reduction's factor); the gradient lacks that factor when :func:`_defers_factor`.

    ``student`` and ``grad`` have the logits' full width: with ``vocab_size`` the kernel reads
    and writes the first V columns through strided views, and the padding columns of
    ``grad`` (the student's own, in place) are set to their gradient, 0, here.
    """
    topk = isinstance(teacher, TopKTeacher)
    padding = 0 if config.vocab_size is None else student.shape[-1] - config.vocab_size
    if grad is not None and padding > 0:
        grad.narrow(-1, config.vocab_size, padding).zero_()
    student = config.vocab_view(student)
    if grad is not None:
        grad = config.vocab_view(grad)
    if not topk:
        teacher = config.vocab_view(teacher)
    V = student.shape[-1]
    student_rows = _rows.as_rows(student, V)
    labels_rows = labels.reshape(-1) if labels is not None else None
    n_rows = student_rows.shape[0]
    size0 = student.shape[0] if student.dim() > 1 else V
    reduction_factor = _rows.reduction_factor(
        config, n_rows, size0, labels_rows, num_items_in_batch, student.device
    )
    row_kernel, _ = _backends.row_kernel(config.backend, topk=topk)
    rows = RowArgs(
        student=student_rows,
        teacher=teacher.as_rows() if topk else _rows.as_rows(teacher, V),
        labels=labels_rows,
        grad=None if grad is None else grad.view(n_rows, V),
        reduction_factor=torch.ones_like(reduction_factor)
        if _defers_factor(student, config)
        else reduction_factor,
        config=config,
    )
    losses = _rows.run_rows(row_kernel, rows)
    loss, kd, ce = _rows.reduce_rows(config, losses, reduction_factor, student.shape[:-1])
    return loss, kd, ce, reduction_factor


def _kd_loss(student, teacher, labels, num_items_in_batch, compute_grad, *config_args):
    config = KDConfig.from_op_args(config_args)
    grad = (
        torch.empty(student.shape, dtype=student.dtype, device=student.device)
        if compute_grad
        else None
    )
    loss, kd, ce, reduction_factor = _kd_forward(
        student, teacher, labels, num_items_in_batch, config, grad
    )
    return loss, kd, ce, student.new_empty(0) if grad is None else grad, reduction_factor


def _kd_loss_fake(student, teacher, labels, num_items_in_batch, compute_grad, *config_args):
    shape = _loss_shape(student, KDConfig.from_op_args(config_args))
    out = [student.new_empty(shape, dtype=torch.float32) for _ in range(3)]
    grad = student.new_empty(student.shape) if compute_grad else student.new_empty(0)
    return out[0], out[1], out[2], grad, student.new_empty((), dtype=torch.float32)


def _kd_loss_inplace(student, teacher, labels, num_items_in_batch, *config_args):
    config = KDConfig.from_op_args(config_args)
    _check_inplace_memory(student, teacher)
    return _kd_forward(student, teacher, labels, num_items_in_batch, config, student)


def _topk_kd_loss(student, token_ids, logprobs, mask, labels, num_items_in_batch, compute_grad,
                  *config_args):  # fmt: skip
    return _kd_loss(student, TopKTeacher(token_ids, logprobs, mask), labels, num_items_in_batch,
                    compute_grad, *config_args)  # fmt: skip


def _topk_kd_loss_fake(student, token_ids, logprobs, mask, labels, num_items_in_batch,
                       compute_grad, *config_args):  # fmt: skip
    return _kd_loss_fake(student, None, labels, num_items_in_batch, compute_grad, *config_args)


def _topk_kd_loss_inplace(student, token_ids, logprobs, mask, labels, num_items_in_batch,
                          *config_args):  # fmt: skip
    teacher = TopKTeacher(token_ids, logprobs, mask)
    return _kd_loss_inplace(student, teacher, labels, num_items_in_batch, *config_args)


def _topk_kd_loss_inplace_fake(student, token_ids, logprobs, mask, labels, num_items_in_batch,
                               *config_args):  # fmt: skip
    return _kd_loss_inplace_fake(student, None, labels, num_items_in_batch, *config_args)


def _check_inplace_memory(student: Tensor, teacher: Tensor | TopKTeacher) -> None:
    """The layouts the in-place op can write over, checked in the op with the tensors it is
    given (eagerly, or at run time inside a compiled graph), before the kernel runs."""
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
    if isinstance(teacher, TopKTeacher):
        if _memory_overlaps(student, teacher.logprobs):
            raise ValueError(
                "inplace_backward=True would overwrite the teacher's logprobs while the kernel "
                "reads them: they share memory with student_logits; pass a copy"
            )
        return
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


def _kd_loss_inplace_fake(student, teacher, labels, num_items_in_batch, *config_args):
    shape = _loss_shape(student, KDConfig.from_op_args(config_args))
    out = tuple(student.new_empty(shape, dtype=torch.float32) for _ in range(3))
    return out + (student.new_empty((), dtype=torch.float32),)


# (register_kernel and register_fake return None as decorators: the functions above call
# each other, so they are registered here.)
for _op, _kernel, _fake in (
    ("fastkd::kd_loss", _kd_loss, _kd_loss_fake),
    ("fastkd::kd_loss_inplace", _kd_loss_inplace, _kd_loss_inplace_fake),
    ("fastkd::topk_kd_loss", _topk_kd_loss, _topk_kd_loss_fake),
    ("fastkd::topk_kd_loss_inplace", _topk_kd_loss_inplace, _topk_kd_loss_inplace_fake),
):
    torch.library.register_kernel(_op, None, _kernel, lib=_LIB)
    torch.library.register_fake(_op, _fake, lib=_LIB)


@torch.library.register_kernel("fastkd::scale_grad_", None, lib=_LIB)
def _scale_grad(grad: Tensor, grad_output: Tensor, backend: str) -> None:
    V = grad.shape[-1]
    per_row = grad_output.reshape(-1) if grad_output.dim() > 0 else grad_output
    _, scale_rows_ = _backends.row_kernel(backend)
    scale_rows_(grad.view(-1, V), per_row)


@torch.library.register_fake("fastkd::scale_grad_", lib=_LIB)
def _scale_grad_fake(grad, grad_output, backend):
    return None


def _scale_stored_grad(ctx, d_loss: Tensor) -> Tensor:
    """The stored gradient times grad_output (and the deferred reduction factor), in place."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            "fastkd: KDLoss has no double backward (create_graph=True): its gradient is "
            "computed in the forward; use backend='torch' for higher-order gradients"
        )
    if ctx.backward_done:
        raise RuntimeError(
            "fastkd: a second backward through one KDLoss call (retain_graph=True): the first "
            "already scaled the stored gradient in place; compute the loss again instead"
        )
    ctx.backward_done = True
    grad, reduction_factor = ctx.saved_tensors
    grad_output = d_loss * reduction_factor if ctx.defers_factor else d_loss
    torch.ops.fastkd.scale_grad_(grad, grad_output, ctx.config.backend)
    return grad


_N_CONFIG_ARGS = len(dataclasses.fields(KDConfig))


def _setup_context(ctx, inputs, output):
    # Both ops: the student first, the config's fields last.
    student, config_args = inputs[0], inputs[-_N_CONFIG_ARGS:]
    _loss, kd, ce, grad, reduction_factor = output
    ctx.config = KDConfig.from_op_args(config_args)
    ctx.n_inputs = len(inputs)
    ctx.defers_factor = _defers_factor(student, ctx.config)
    ctx.backward_done = False
    ctx.save_for_backward(grad, reduction_factor)
    # kd and ce are for logging and grad is the stored gradient: none of them gets a
    # gradient, and the backward takes None for them. Else autograd hands it zeros for each,
    # an N x V tensor for grad: memory, and a memset the size of the gradient itself.
    ctx.mark_non_differentiable(kd, ce, grad, reduction_factor)
    ctx.set_materialize_grads(False)


def _backward(ctx, d_loss, d_kd, d_ce, d_grad, d_factor):
    if d_loss is None:
        return (None,) * ctx.n_inputs
    return (_scale_stored_grad(ctx, d_loss),) + (None,) * (ctx.n_inputs - 1)


for _op in ("fastkd::kd_loss", "fastkd::topk_kd_loss"):
    torch.library.register_autograd(_op, _backward, setup_context=_setup_context, lib=_LIB)


def _teacher_args(teacher: Tensor | TopKTeacher) -> tuple:
    """The op's teacher arguments: the logits, or a TopKTeacher's three fields."""
    if isinstance(teacher, TopKTeacher):
        return teacher.token_ids, teacher.logprobs, teacher.mask
    return (teacher,)


class _KDLossInplace(torch.autograd.Function):
    """The in-place ops under autograd: the student logits hold the gradient afterwards."""

    @staticmethod
    def forward(ctx, student, labels, num_items_in_batch, config, *teacher_args):
        op = torch.ops.fastkd.kd_loss_inplace
        if len(teacher_args) == 3:
            op = torch.ops.fastkd.topk_kd_loss_inplace
        loss, kd, ce, reduction_factor = op(
            student, *teacher_args, labels, num_items_in_batch, *config.to_op_args()
        )
        ctx.n_teacher_args = len(teacher_args)
        ctx.config = config
        ctx.defers_factor = _defers_factor(student, config)
        ctx.backward_done = False
        ctx.save_for_backward(student, reduction_factor)
        ctx.mark_non_differentiable(kd, ce)
        return loss, kd, ce

    @staticmethod
    def backward(ctx, d_loss, d_kd, d_ce):
        return (_scale_stored_grad(ctx, d_loss), None, None, None) + (None,) * ctx.n_teacher_args


def kd_loss_through_kernels(
    student: Tensor,
    teacher: Tensor | TopKTeacher,
    labels: Tensor | None,
    num_items_in_batch: Tensor | None,
    config: KDConfig,
) -> tuple[Tensor, Tensor, Tensor]:
    """Validated arguments and a config with a kernel backend in, (loss, kd, ce) out."""
    compute_grad = torch.is_grad_enabled() and student.requires_grad
    teacher_args = _teacher_args(teacher)
    if compute_grad and config.inplace_backward:
        return _KDLossInplace.apply(student, labels, num_items_in_batch, config, *teacher_args)
    op = torch.ops.fastkd.topk_kd_loss if len(teacher_args) == 3 else torch.ops.fastkd.kd_loss
    loss, kd, ce, _, _ = op(
        student, *teacher_args, labels, num_items_in_batch, compute_grad, *config.to_op_args()
    )
    return loss, kd.detach(), ce.detach()
