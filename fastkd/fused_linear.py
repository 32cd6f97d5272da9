"""The public fused-linear loss: :class:`FusedLinearKDLoss` and :func:`fused_linear_kd_loss`.

KDLoss from hidden states and LM-head weights, never holding the N x V logits (design.md §3
"Fused linear"). This module checks the arguments (KDLoss's checks from ``losses``, plus the
hidden/weight/bias ones here), applies autocast as nn.Linear would, and hands over to the
chunk loop in ``_fused_linear_ops``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from typing_extensions import Unpack

from . import _backends
from ._config import (
    KDConfig,
    KDOptions,
    check_flags,
    check_labels,
    check_num_items,
    check_vocab_widths,
)
from ._fused_linear_ops import fused_linear_kd, loss_chunk_rows
from ._linear_heads import (
    autocast_cast,
    check_bias,
    check_chunking,
    check_head,
    check_head_dtypes,
    wide_dtype,
)
from ._vocab_parallel_linear import fused_linear_vocab_parallel
from .losses import KDLossOutput, check_dense_options
from .topk import TopKTeacher
from .topk_reference import check_topk_teacher


def _check_pair(s_hidden, s_weight, t_hidden, t_weight, vocab_size: int | None) -> int:
    """The two heads of one loss; returns the vocabulary V it reads (their first V rows)."""
    V = check_vocab_widths(
        vocab_size, "rows", student_weight=s_weight.shape[0], teacher_weight=t_weight.shape[0]
    )
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
    return V


def _config(divergence: str, options: KDOptions) -> KDConfig:
    if "inplace_backward" in options:
        raise TypeError(
            "FusedLinearKDLoss has no inplace_backward option: each chunk's logits are always "
            "overwritten by their gradient"
        )
    return KDConfig.from_options(divergence, **options)


def fused_linear_kd_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor | None = None,
    teacher_weight: Tensor | None = None,
    labels: Tensor | None = None,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    num_items_in_batch: int | float | Tensor | None = None,
    *,
    teacher: TopKTeacher | None = None,
    divergence: str = "forward_kl",
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    return_components: bool = False,
    process_group=None,
    **options: Unpack[KDOptions],
) -> Tensor | KDLossOutput:
    """KDLoss on ``hidden @ weight.T (+ bias)`` of both models, without the N x V logits.

    Equals ``fastkd.kd_loss(student_hidden @ student_weight.T + student_bias, teacher_hidden
    @ teacher_weight.T + teacher_bias, labels, ...)`` in value and gradients (for the student
    hidden states, weight and bias; the teacher is constant); with ``teacher=`` a
    :class:`fastkd.TopKTeacher` instead of the teacher's tensors. See
    :class:`FusedLinearKDLoss`.
    """
    config = _config(divergence, options)
    check_flags(return_components=return_components)
    check_chunking(chunk_size, memory_budget)
    return _fused_linear_kd_loss(
        student_hidden, student_weight, teacher_hidden, teacher_weight, labels, student_bias,
        teacher_bias, num_items_in_batch, teacher, config, chunk_size, memory_budget,
        return_components, process_group,
    )  # fmt: skip


def _check_teacher_given(teacher_hidden, teacher_weight, teacher_bias, teacher) -> None:
    """Either the teacher's hidden states and weight, or a TopKTeacher as ``teacher=``."""
    dense = [
        name
        for name, x in (("teacher_hidden", teacher_hidden), ("teacher_weight", teacher_weight),
                        ("teacher_bias", teacher_bias))
        if x is not None
    ]  # fmt: skip
    if teacher is not None:
        if dense:
            raise ValueError(
                f"teacher= (a TopKTeacher) replaces the teacher's hidden states and weight; "
                f"got {dense[0]} too"
            )
        if not isinstance(teacher, TopKTeacher):
            raise TypeError(
                f"teacher must be a fastkd TopKTeacher, got {type(teacher).__name__} (pass a "
                "dense teacher as teacher_hidden and teacher_weight)"
            )
        return
    if teacher_hidden is None or teacher_weight is None:
        raise TypeError(
            "FusedLinearKDLoss needs the teacher: teacher_hidden and teacher_weight, or "
            "teacher= a fastkd.TopKTeacher"
        )


def _vocab_rows(config: KDConfig, weight: Tensor, bias: Tensor | None) -> tuple:
    """An LM head's first vocab_size rows (design.md §5), as views: the chunks' logits are
    then V wide, and autograd gives the padding rows of grad_weight and grad_bias exactly 0
    (a zero-filled (V_s, H) gradient, the parameter's own shape, that the V rows are copied
    into; the chunk loop's float32 accumulator stays (V, H))."""
    return config.vocab_view(weight, 0), None if bias is None else config.vocab_view(bias, 0)


# A Python loop over data-dependent chunks: torch.compile runs it eagerly (a graph break)
# rather than tracing it.
@torch.compiler.disable
def _fused_linear_kd_loss(
    student_hidden, student_weight, teacher_hidden, teacher_weight, labels, student_bias,
    teacher_bias, num_items_in_batch, teacher, config: KDConfig, chunk_size, memory_budget,
    return_components, process_group=None,
):  # fmt: skip
    """fused_linear_kd_loss with its options already in a validated config."""
    if process_group is not None:
        return _fused_linear_vocab_parallel(
            student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
            student_bias, teacher_bias, num_items_in_batch, teacher, config, chunk_size,
            memory_budget, return_components, process_group,
        )  # fmt: skip
    _check_teacher_given(teacher_hidden, teacher_weight, teacher_bias, teacher)
    if teacher is not None:
        return _fused_linear_topk_loss(
            student_hidden, student_weight, labels, student_bias, num_items_in_batch, teacher,
            config, chunk_size, memory_budget, return_components,
        )  # fmt: skip
    check_dense_options(config)
    check_head("student_", student_hidden, student_weight, student_bias)
    check_head("teacher_", teacher_hidden, teacher_weight, teacher_bias)
    V = _check_pair(student_hidden, student_weight, teacher_hidden, teacher_weight,
                    config.vocab_size)  # fmt: skip
    check_bias("student_", student_weight, student_bias)
    check_bias("teacher_", teacher_weight, teacher_bias)
    device = student_hidden.device
    s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias = autocast_cast(
        device,
        (student_hidden, *_vocab_rows(config, student_weight, student_bias), teacher_hidden,
         *_vocab_rows(config, teacher_weight, teacher_bias)),
    )  # fmt: skip
    check_head_dtypes("student_", s_hidden, s_weight, s_bias)
    check_head_dtypes("teacher_", t_hidden, t_weight, t_bias)
    check_labels(labels, s_hidden.shape[:-1], V, device, config)
    num_items = check_num_items(num_items_in_batch, device)
    logits_dtype = torch.promote_types(wide_dtype(s_hidden.dtype), wide_dtype(t_hidden.dtype))
    config = config.with_backend(_backends.resolve(config.backend, device, logits_dtype))
    n_rows = s_hidden.numel() // s_hidden.shape[-1] if s_hidden.shape[-1] else 0
    chunk_rows = loss_chunk_rows(
        n_rows, V, logits_dtype, config.backend, chunk_size, memory_budget, device
    )
    teacher = tuple(None if x is None else x.detach() for x in (t_hidden, t_weight, t_bias))
    grad_on = torch.is_grad_enabled()
    needs = tuple(
        grad_on and x is not None and x.requires_grad for x in (s_hidden, s_weight, s_bias)
    )
    loss, kd, ce = fused_linear_kd(
        config, chunk_rows, (s_hidden, s_weight, s_bias, *teacher, labels, num_items), needs
    )
    if return_components:
        return KDLossOutput(loss, kd.detach(), ce.detach() if config.has_ce else None)
    return loss


def _fused_linear_topk_loss(
    student_hidden, student_weight, labels, student_bias, num_items_in_batch,
    teacher: TopKTeacher, config: KDConfig, chunk_size, memory_budget, return_components,
):  # fmt: skip
    """The fused loss against a top-k teacher (design.md §4): the student's three matmuls
    a chunk, the teacher read as its pairs."""
    check_head("student_", student_hidden, student_weight, student_bias)
    check_bias("student_", student_weight, student_bias)
    V = check_vocab_widths(config.vocab_size, "rows", student_weight=student_weight.shape[0])
    device = student_hidden.device
    check_topk_teacher(teacher, student_hidden.shape[:-1], V, device)
    s_hidden, s_weight, s_bias = autocast_cast(
        device, (student_hidden, *_vocab_rows(config, student_weight, student_bias))
    )
    check_head_dtypes("student_", s_hidden, s_weight, s_bias)
    check_labels(labels, s_hidden.shape[:-1], V, device, config)
    num_items = check_num_items(num_items_in_batch, device)
    logits_dtype = wide_dtype(s_hidden.dtype)
    config = config.with_backend(_backends.resolve(config.backend, device, logits_dtype))
    n_rows = s_hidden.numel() // s_hidden.shape[-1] if s_hidden.shape[-1] else 0
    chunk_rows = loss_chunk_rows(
        n_rows, V, logits_dtype, config.backend, chunk_size, memory_budget, device
    )
    pairs = teacher.detach()
    grad_on = torch.is_grad_enabled()
    needs = tuple(
        grad_on and x is not None and x.requires_grad for x in (s_hidden, s_weight, s_bias)
    )
    inputs = (s_hidden, s_weight, s_bias, pairs.token_ids, pairs.logprobs, pairs.mask, labels,
              num_items)  # fmt: skip
    loss, kd, ce = fused_linear_kd(config, chunk_rows, inputs, needs, topk_teacher=True)
    if return_components:
        return KDLossOutput(loss, kd.detach(), ce.detach() if config.has_ce else None)
    return loss


def _fused_linear_vocab_parallel(
    student_hidden, student_weight, teacher_hidden, teacher_weight, labels, student_bias,
    teacher_bias, num_items_in_batch, teacher, config: KDConfig, chunk_size, memory_budget,
    return_components, process_group,
):  # fmt: skip
    """design.md §5 with this rank's rows of both LM heads (fastkd/_vocab_parallel_linear.py).
    This rank's checks run first; a refusal reaches every rank through the first collective."""
    refused, num_items, chunk_rows = None, None, 1
    try:
        _check_teacher_given(teacher_hidden, teacher_weight, teacher_bias, teacher)
        check_head("student_", student_hidden, student_weight, student_bias)
        check_bias("student_", student_weight, student_bias)
        check_head_dtypes("student_", student_hidden, student_weight, student_bias)
        rows = student_weight.shape[0]
        if teacher is None:
            check_head("teacher_", teacher_hidden, teacher_weight, teacher_bias)
            check_bias("teacher_", teacher_weight, teacher_bias)
            check_head_dtypes("teacher_", teacher_hidden, teacher_weight, teacher_bias)
            if teacher_weight.shape[0] != rows:
                raise ValueError(
                    f"with process_group, this rank's student_weight and teacher_weight must "
                    f"hold the same vocabulary rows, got {rows} and {teacher_weight.shape[0]}"
                )
            if teacher_hidden.shape[:-1] != student_hidden.shape[:-1]:
                raise ValueError(
                    f"student_hidden and teacher_hidden must have the same leading shape (one "
                    f"row per token), got {tuple(student_hidden.shape)} and "
                    f"{tuple(teacher_hidden.shape)}"
                )
        else:
            check_topk_teacher(teacher, student_hidden.shape[:-1], None, student_hidden.device)
        check_labels(labels, student_hidden.shape[:-1], None, student_hidden.device, config)
        num_items = check_num_items(num_items_in_batch, student_hidden.device)
        n_rows = student_hidden.numel() // student_hidden.shape[-1] if student_hidden.shape[-1] \
            else 0  # fmt: skip
        chunk_rows = loss_chunk_rows(n_rows, max(rows, 1), torch.float32, "cpu", chunk_size,
                                     memory_budget, student_hidden.device)  # fmt: skip
    except Exception as error:  # any: the other ranks must not wait in the first collective
        refused = error
    loss, kd, ce = fused_linear_vocab_parallel(
        config, process_group, chunk_rows, student_hidden, student_weight, student_bias,
        teacher_hidden, teacher_weight, teacher_bias, teacher, labels, num_items, refused,
    )  # fmt: skip
    if return_components:
        return KDLossOutput(loss, kd, ce)
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
        vocab_size: the true vocabulary V: only the first V rows of each LM-head weight (and
            bias) count, so that heads padded to different row counts (Qwen2.5-7B's 152064
            against Qwen2.5-0.5B's 151936) can be distilled; the padding rows get a
            gradient of exactly 0. Without it, both weights must have the same rows.
        chunk_size: at most this many rows (tokens) per chunk.
        process_group (None): vocab-parallel (design.md §5): each rank passes its
            contiguous rows of both LM-head weights (and biases), as Megatron's
            ColumnParallelLinear holds them, and the whole hidden states; the loss is the
            whole vocabulary's on every rank, each weight gets its rows' gradient and the
            hidden states' gradient is summed over the ranks (docs/distributed.md).
        memory_budget: bytes a chunk's logits-sized buffers may take (both models' logits,
            in float32); sets the chunk's rows. With neither option, the budget is a quarter
            of the free CUDA memory, or 256 MiB on CPU.

    Forward: ``(student_hidden (..., H_s), student_weight (V, H_s), teacher_hidden
    (..., H_t), teacher_weight (V, H_t), labels=None, student_bias=None, teacher_bias=None,
    num_items_in_batch=None, *, teacher=None, return_components=False)``. H_s and H_t may
    differ; V must match, or ``vocab_size`` be given. A teacher seen only through its top-k
    log-probabilities comes as ``teacher=`` a :class:`fastkd.TopKTeacher` (..., K) instead of
    its hidden states and weight (``labels=`` then by keyword): three matmuls a chunk instead
    of four, and the top-k options of :class:`fastkd.KDLoss` apply. Hidden, weight and bias of
    one model share a dtype (as for nn.Linear); under torch.autocast they are cast like
    nn.Linear's.
    KDLoss's ``inplace_backward`` has no counterpart: the chunk's logits are always
    overwritten by their gradient.

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
        chunk_size: int | None = None,
        memory_budget: int | None = None,
        process_group=None,
        **options: Unpack[KDOptions],
    ) -> None:
        super().__init__()
        self.config = _config(divergence, options)
        check_chunking(chunk_size, memory_budget)
        self.chunk_size = chunk_size
        self.memory_budget = memory_budget
        self.process_group = process_group

    def forward(
        self,
        student_hidden: Tensor,
        student_weight: Tensor,
        teacher_hidden: Tensor | None = None,
        teacher_weight: Tensor | None = None,
        labels: Tensor | None = None,
        student_bias: Tensor | None = None,
        teacher_bias: Tensor | None = None,
        num_items_in_batch: int | float | Tensor | None = None,
        *,
        teacher: TopKTeacher | None = None,
        return_components: bool = False,
    ) -> Tensor | KDLossOutput:
        check_flags(return_components=return_components)
        return _fused_linear_kd_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
            student_bias, teacher_bias, num_items_in_batch, teacher, self.config,
            self.chunk_size, self.memory_budget, return_components, self.process_group,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return self.config.describe(chunk_size=self.chunk_size, memory_budget=self.memory_budget)
