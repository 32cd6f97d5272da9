"""The public losses: :class:`KDLoss` and its functional twin :func:`kd_loss`.

This module checks every argument (a clear error naming it, before any kernel runs), picks
the backend, and hands over to the kernels (``_ops``) or the reference (``reference``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn
from typing_extensions import Unpack

from . import _backends, _ops, _vocab_parallel, distributed
from ._config import (
    KDConfig,
    KDOptions,
    check_flags,
    check_float_tensor,
    check_labels,
    check_logits,
    check_num_items,
)
from .reference import reference_loss
from .topk import TopKTeacher
from .topk_reference import check_topk_inputs, check_topk_teacher, topk_reference_loss


class KDLossOutput(NamedTuple):
    """``loss == kd_weight * kd_loss + ce_weight * ce_loss`` (ce_loss is None without CE).

    ``kd_loss`` (T^2 * D, or D without T^2 scaling) and ``ce_loss`` are reduced like
    ``loss`` and detached: they are for logging.
    """

    loss: Tensor
    kd_loss: Tensor
    ce_loss: Tensor | None


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None = None,
    *,
    divergence: str = "forward_kl",
    num_items_in_batch: int | float | Tensor | None = None,
    return_components: bool = False,
    process_group=None,
    **options: Unpack[KDOptions],
) -> Tensor | KDLossOutput:
    """Knowledge-distillation loss between student and teacher logits of shape (..., V).

    Per row: ``kd_weight * T^2 * D(softmax(t/T), softmax(s/T)) + ce_weight * CE(s, label)``;
    see :class:`KDLoss` for every option. The teacher logits are detached: no gradient
    ever flows to them. Returns the reduced loss (float32), or a :class:`KDLossOutput` with
    ``return_components=True``.
    """
    config = KDConfig.from_options(divergence, **options)
    check_flags(return_components=return_components)
    return _kd_loss(student_logits, teacher_logits, labels, num_items_in_batch, config,
                    return_components, process_group)  # fmt: skip


def _kd_loss(student_logits, teacher_logits, labels, num_items_in_batch, config: KDConfig,
             return_components: bool, process_group=None):  # fmt: skip
    """kd_loss with its options already in a validated config."""
    student_logits, teacher_logits, labels, process_group = distributed.as_local_shards(
        student_logits, teacher_logits, labels, process_group
    )
    if process_group is not None:
        return _vocab_parallel_kd_loss(student_logits, teacher_logits, labels,
                                       num_items_in_batch, config, return_components,
                                       process_group)  # fmt: skip
    topk = isinstance(teacher_logits, TopKTeacher)
    if topk:
        V = check_topk_inputs(student_logits, teacher_logits, config.vocab_size)
        dtype = student_logits.dtype
    else:
        check_dense_options(config)
        V = check_logits(student_logits, teacher_logits, config.vocab_size)
        dtype = torch.promote_types(student_logits.dtype, teacher_logits.dtype)
    check_labels(labels, student_logits.shape[:-1], V, student_logits.device, config)
    num_items = check_num_items(num_items_in_batch, student_logits.device)
    config = config.with_backend(_backends.resolve(config.backend, student_logits.device, dtype))
    teacher = teacher_logits.detach()

    # The logits go on whole, padding columns included, and the spec and the ops each take
    # the first vocab_size columns with KDConfig.vocab_view. Slicing here instead would put
    # the ops behind an autograd slice, whose backward pads their gradient into a second
    # N x V buffer (defeating inplace_backward) and leaves the student's padding columns
    # holding logits after an in-place forward; the ops write those columns' 0 themselves.
    if config.backend == "torch":
        spec_loss = topk_reference_loss if topk else reference_loss
        loss, kd, ce = spec_loss(student_logits, teacher, labels, num_items, config)
        kd, ce = kd.detach(), None if ce is None else ce.detach()
    else:
        if config.inplace_backward and student_logits.requires_grad and torch.is_grad_enabled():
            _check_inplace_leaf(student_logits)
        loss, kd, ce = _ops.kd_loss_through_kernels(
            student_logits, teacher, labels, num_items, config
        )
        if not config.has_ce:
            ce = None
    if return_components:
        return KDLossOutput(loss, kd, ce)
    return loss


def _vocab_parallel_kd_loss(student_logits, teacher_logits, labels, num_items_in_batch,
                            config: KDConfig, return_components: bool, process_group):  # fmt: skip
    """design.md §5: this rank's vocabulary shards; the loss of the whole vocabulary."""

    def check_this_rank():
        # Run inside the handshake: a rank whose inputs are refused tells the others, so
        # that every rank raises instead of the others waiting in a collective.
        if topk:
            check_float_tensor("student_logits", student_logits)
            if student_logits.dim() == 0:
                raise ValueError("student_logits must have a vocabulary dimension")
            return check_this_rank_common()
        check_dense_options(config)
        widths = [x.shape[-1] for x in (student_logits, teacher_logits)
                  if isinstance(x, Tensor) and x.dim() > 0]  # fmt: skip
        if len(widths) == 2 and widths[0] != widths[1]:
            # vocab_size is the whole vocabulary's here, not a shard's: no padding to drop.
            raise ValueError(
                f"with process_group, this rank's student_logits and teacher_logits shards must "
                f"have the same width, got {widths[0]} and {widths[1]}"
            )
        check_logits(student_logits, teacher_logits, allow_empty=True)
        return check_this_rank_common()

    def check_this_rank_common():
        # The shapes here, where one rank's mistake reaches the others through the handshake;
        # the values against the whole vocabulary after it, alike on every rank.
        lead = student_logits.shape[:-1]
        check_labels(labels, lead, None, student_logits.device, config)
        if topk:
            check_topk_teacher(teacher_logits, lead, None, student_logits.device)
        if config.inplace_backward and student_logits.requires_grad and torch.is_grad_enabled():
            _check_inplace_leaf(student_logits)
            if student_logits.shape[-1]:  # an empty shard has nothing to write over
                _ops._check_inplace_memory(student_logits, teacher_logits)
        return check_num_items(num_items_in_batch, student_logits.device)

    topk = isinstance(teacher_logits, TopKTeacher)
    run = _vocab_parallel.topk_vocab_parallel_loss if topk else _vocab_parallel.vocab_parallel_loss
    loss, kd, ce = run(
        student_logits, teacher_logits, labels, config, process_group, check_this_rank
    )
    kd, ce = kd.detach(), None if ce is None else ce.detach()
    if return_components:
        return KDLossOutput(loss, kd, ce)
    return loss


def check_dense_options(config: KDConfig) -> None:
    """The top-k options belong to a TopKTeacher: a clear error with dense teacher logits."""
    options = config.topk_options_set
    if options:
        raise ValueError(
            f"{options[0]} is an option of top-k teachers (design.md §4): pass the teacher as "
            "a fastkd.TopKTeacher, or leave it at its default with teacher logits"
        )


def _check_inplace_leaf(student: Tensor) -> None:
    """PyTorch's rule for in-place operations, checked before anything is written. (The
    memory layout checks run in the op itself, with the tensors it is given: see
    _ops._check_inplace_memory.) Under torch.compile a view's base is not known, and a view
    of a leaf is then left to the tracer."""
    leaf = student.is_leaf
    if not torch.compiler.is_compiling() and student._is_view():
        leaf = leaf or student._base.is_leaf
    if leaf:
        raise ValueError(
            "inplace_backward=True would overwrite student_logits, a leaf tensor that requires "
            "grad (an nn.Parameter, a tensor made with requires_grad=True, or a view of one), "
            "with its gradient: PyTorch refuses in-place operations on such leaves. Pass "
            "logits that a model computed, or inplace_backward=False"
        )


class KDLoss(nn.Module):
    """Fused knowledge-distillation loss on logits, a drop-in for the F.kl_div formula.

    ``KDLoss(divergence="forward_kl", temperature=2.0)(s, t)`` equals
    ``F.kl_div(F.log_softmax(s/2, -1), F.softmax(t/2, -1), reduction="batchmean") * 4`` on
    2-D logits with ``reduction="batchmean"`` (the default ``"mean"`` averages over the rows
    not ignored), without holding any float32 copy of the N x V logits.

    Args (keywords, but ``divergence`` may come first; defaults in parentheses):
        divergence ("forward_kl"): ``"forward_kl"`` KL(p||q), ``"soft_ce"`` -sum p log q,
            ``"reverse_kl"`` KL(q||p), ``"jsd"`` (generalised, weight ``beta``),
            ``"skew_forward_kl"`` and ``"skew_reverse_kl"`` (mixture weight ``alpha``),
            ``"tvd"``, ``"hellinger"`` (squared, 1/2 sum (sqrt p - sqrt q)^2); p is the
            teacher's distribution, q the student's, both at temperature T.
        temperature (1.0): T > 0; both logits are divided by it before the softmax.
        beta (0.5): the JSD weight, 0 < beta < 1 (TRL's meaning: m = beta p + (1 - beta) q).
        alpha (0.1): the skew weight, 0 < alpha < 1 (DistiLLM's meaning: KL(p || alpha p +
            (1 - alpha) q) and KL(q || alpha q + (1 - alpha) p)).
        softcap (None): if set, ``c * tanh(x / c)`` is applied to both logits before
            anything else.
        scale_by_temperature_squared (True): multiply the divergence by T^2 (Hinton).
        kd_weight (1.0), ce_weight (0.0): per-row loss ``kd_weight * T^2 * D + ce_weight *
            CE``, where CE is the hard-label cross-entropy of the (soft-capped) student logits
            at T = 1.
        ignore_index (-100): rows whose label equals it have zero loss and zero gradient.
        reduction ("mean"): ``"mean"`` (over the rows not ignored, or over ``num_items_in_batch``),
            ``"sum"``, ``"batchmean"`` (sum / student_logits.size(0), torch's KLDivLoss
            meaning) or ``"none"`` (one loss per row, shaped like the leading dims).
        inplace_backward (False): write the gradient over the student logits instead of a new
            N x V buffer (the student logits' values are gone after the forward; with
            ``vocab_size``, the padding columns hold their gradient, 0). Kernel backends
            only: the ``"torch"`` reference materialises anyway and ignores it.
        vocab_size (None): the true vocabulary V: only the first V columns of each logits
            tensor count, the rest (padded embeddings: Qwen2.5-7B's 152064 columns against
            Qwen2.5-0.5B's 151936) are ignored as if -inf, read in place (no copy), and get a
            gradient of exactly 0. Student and teacher may then differ in width; without
            it, they must not. Labels (and a top-k teacher's ids) must be < V.
        backend ("auto"): ``"auto"`` (the C++ kernel for CPU tensors, Triton for CUDA tensors, the
            PyTorch reference for float64 or when neither is available; the environment
            variable ``FASTKD_BACKEND`` replaces it), ``"triton"``, ``"cuda"`` (the CUDA
            kernel of fastkd._C), ``"cpu"`` (its C++ CPU kernel) or ``"torch"``.
        process_group (None): vocab-parallel (design.md §5, docs/distributed.md): each rank
            of this torch.distributed group passes its contiguous vocabulary shard of both
            logits (shards in rank order, widths may differ) and the same global labels; the
            loss is the whole vocabulary's, the same on every rank, and its backward gives
            each rank its shard's gradient. DTensor logits sharded on the last dimension
            need no process_group. The ranks exchange O(N) floats a call.

    Forward: ``(student_logits, teacher_logits, labels=None, *, num_items_in_batch=None,
    return_components=False)``. Logits are (..., V) (or wider, with ``vocab_size``),
    float32/bfloat16/float16; labels are integers shaped like the leading dims. The teacher
    logits are detached.
    """

    def __init__(
        self, divergence: str = "forward_kl", *, process_group=None, **options: Unpack[KDOptions]
    ) -> None:
        super().__init__()
        self.config = KDConfig.from_options(divergence, **options)
        # A layout, not an option of the loss's math: kept beside the config, not in it (a
        # process group is no op argument, and the config's fields are).
        self.process_group = process_group

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor,
        labels: Tensor | None = None,
        *,
        num_items_in_batch: int | float | Tensor | None = None,
        return_components: bool = False,
    ) -> Tensor | KDLossOutput:
        check_flags(return_components=return_components)
        return _kd_loss(student_logits, teacher_logits, labels, num_items_in_batch, self.config,
                        return_components, self.process_group)  # fmt: skip

    def extra_repr(self) -> str:
        return self.config.describe()
