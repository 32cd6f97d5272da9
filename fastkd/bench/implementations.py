"""Everything the benchmark compares, and why a candidate is skipped on this machine.

- ``fastkd-<backend>``: :func:`fastkd.kd_loss` (or ``fastkd.FusedLinearKDLoss``) with each
  backend that :mod:`fastkd._backends` knows and reports available on the device, so a new
  backend shows up here without edits. ``fastkd-<backend>-inplace`` is the same kernel with
  ``inplace_backward=True`` (forward+backward only: without a backward it is the same call).
- ``torch-eager`` / ``torch-compile``: :mod:`fastkd.bench.formulas`, plain and compiled.
- ``liger``: Liger-Kernel's JSD / KL-divergence entry points on log-probs, as its API wants
  (``liger_kl_div`` for forward_kl; ``liger_jsd`` for jsd, with beta=1 for reverse_kl).
  Fused linear: ``liger-fused`` is its Triton ``LigerFusedLinearJSD`` and ``liger-chunked``
  its chunked ``LigerFusedLinearJSDLoss`` (torch ops, runs anywhere), beta=0 giving
  forward_kl and beta=1 reverse_kl in both. Liger has no T^2 factor: its loss is multiplied
  by T^2 so that all rows compute the same number.

With a top-k teacher (``Case.teacher == "topk"``), the same names on the top-k loss:
``fastkd-<backend>`` (a kernel backend whose top-k kernels are not in this build is skipped,
saying so), ``torch-eager`` / ``torch-compile`` on :func:`formulas.topk_formula`; Liger-Kernel
has no top-k loss. Fused linear adds two baselines, timed but not checked (they compute
something else): ``matmuls``, the student's three bare matmuls (logits = h W^T; with a
backward grad_h = g W and grad_W = g^T h, g a fixed N x V tensor), and
``fastkd-<backend>-dense``, the dense FusedLinearKDLoss at the same shapes (a random teacher
of hidden size ``teacher_hidden``).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import fastkd
from fastkd import _backends

from . import formulas
from .cases import LOGIT_STD, Case, as_dense

FWD_BWD = "fwd+bwd"
FWD = "fwd"
MODES = (FWD_BWD, FWD)
MATMULS = "matmuls"

LossFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Candidate:
    """One implementation. ``skip`` says why it can't run here (None: it can)."""

    name: str
    family: str  # "fastkd", "torch" or "liger"
    build: Callable[[Case], LossFn] | None
    skip: str | None = None
    note: str = ""
    modes: tuple[str, ...] = MODES
    # The call overwrites its gradient arguments (inplace_backward): refill them before
    # each timed call, outside the clock.
    overwrites_inputs: bool = False
    # Goes through torch.compile (its first call compiles, tens of seconds on a GPU): the
    # command line measures these in a last pass, after every case's other implementations.
    compiles: bool = False
    # False: a baseline that computes something else than the case's loss (timed, not
    # checked against the reference).
    checked: bool = True
    # Computes the case's shapes with a dense teacher (its floor is the dense case's).
    dense_teacher: bool = False


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def liger_version() -> str | None:
    if importlib.util.find_spec("liger_kernel") is None:
        return None
    try:
        return importlib.metadata.version("liger-kernel")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def candidates(case: Case) -> list[Candidate]:
    """Every implementation, runnable or with the reason it is skipped, for one case."""
    out = _fastkd_candidates(case)
    out += [
        Candidate("torch-eager", "torch", _eager),
        Candidate(
            "torch-compile", "torch", _compiled, note="torch.compile defaults", compiles=True
        ),
    ]
    if case.is_topk:
        out += _topk_baselines(case)
        out.append(Candidate("liger", "liger", None, "Liger-Kernel has no top-k teacher loss"))
    else:
        out += _liger_candidates(case)
    return out


def _options(case: Case) -> dict:
    options = dict(
        divergence=case.divergence,
        temperature=case.temperature,
        beta=case.beta,
        alpha=case.alpha,
    )
    if case.is_topk:
        options["topk_tail"] = case.topk_tail
    return options


# --- fastkd ---------------------------------------------------------------------------------


def _backend_status(backend: str, case: Case) -> tuple[str | None, str]:
    """(why it is skipped or None, a note for the table)."""
    device = torch.device(case.device)
    ok, why = _backends.is_available(backend, device)
    if backend == "triton" and device.type == "cpu":
        if not ok:
            return (
                "Triton on CPU runs only in its interpreter (TRITON_INTERPRET=1), which is "
                "not a speed path; skipped by default",
                "",
            )
        return None, "Triton interpreter: not a speed path"
    if not ok:
        return why, ""
    if case.is_topk:
        missing = _topk_kernels_missing(backend)
        if missing is not None:
            return missing, ""
    try:
        auto = _backends.resolve("auto", device, case.torch_dtype)
    except ValueError:
        auto = None
    notes = ["auto"] if auto == backend else []
    if backend == "torch":
        notes.append("the reference under autograd, not a speed path")
    return None, "; ".join(notes)


def _topk_kernels_missing(backend: str) -> str | None:
    """Why an available kernel backend cannot run a top-k teacher here, or None."""
    if _backends.REGISTRY[backend].topk_module is None:
        return None  # the spec's own top-k rows
    try:
        _backends.topk_kernels(backend)
    except (ImportError, AttributeError) as exc:
        return f"no top-k kernels in this build ({type(exc).__name__}: {exc})"
    return None


def _fastkd_candidates(case: Case) -> list[Candidate]:
    backends = [b for b in _backends.BACKENDS if b != "auto"]
    if case.fused_linear:
        return _fastkd_fused_candidates(case, backends)
    out = []
    for backend in backends:
        skip, note = _backend_status(backend, case)
        build = _fastkd_logits(backend, False)
        out.append(Candidate(f"fastkd-{backend}", "fastkd", build, skip, note))
        if backend in _backends.KERNEL_BACKENDS:
            out.append(
                Candidate(
                    f"fastkd-{backend}-inplace",
                    "fastkd",
                    _fastkd_logits(backend, True),
                    skip,
                    "gradient written over the student logits",
                    modes=(FWD_BWD,),
                    overwrites_inputs=True,
                )
            )
    return out


class _AsModelOutput(torch.autograd.Function):
    """The benchmark's student logits as a model's output (no leaf, which inplace_backward
    refuses), sharing the leaf's memory: no copy enters the measurement."""

    @staticmethod
    def forward(ctx, logits):
        return logits.detach()

    @staticmethod
    def backward(ctx, grad):
        return grad


def _fastkd_logits(backend: str, inplace: bool) -> Callable[[Case], LossFn]:
    def build(case: Case) -> LossFn:
        options = _options(case)

        def loss(student, teacher):
            if inplace and student.requires_grad:
                student = _AsModelOutput.apply(student)
            return fastkd.kd_loss(
                student, teacher, backend=backend, inplace_backward=inplace, **options
            )

        return loss

    return build


def _fastkd_fused_candidates(case: Case, backends: list[str]) -> list[Candidate]:
    out = []
    for backend in backends:
        skip, note = _backend_status(backend, case)
        build = _fastkd_fused_topk(backend) if case.is_topk else _fastkd_fused(backend)
        out.append(Candidate(f"fastkd-{backend}", "fastkd", build, skip, note))
    return out


def _fastkd_fused(backend: str) -> Callable[[Case], LossFn]:
    def build(case: Case) -> LossFn:
        module = fastkd.FusedLinearKDLoss(backend=backend, **_options(case))

        def loss(student_hidden, student_weight, teacher_hidden, teacher_weight):
            return module(student_hidden, student_weight, teacher_hidden, teacher_weight)

        return loss

    return build


def _fastkd_fused_topk(backend: str) -> Callable[[Case], LossFn]:
    def build(case: Case) -> LossFn:
        module = fastkd.FusedLinearKDLoss(backend=backend, **_options(case))

        def loss(student_hidden, student_weight, teacher):
            return module(student_hidden, student_weight, teacher=teacher)

        return loss

    return build


# --- a top-k case's baselines ------------------------------------------------------------


def _topk_baselines(case: Case) -> list[Candidate]:
    """Fused linear: the bare matmuls and the dense loss at the same shapes (not checked)."""
    if not case.fused_linear:
        return []
    out = [
        Candidate(
            MATMULS,
            "baseline",
            _bare_matmuls,
            note="the student's three bare matmuls, not checked",
            checked=False,
        )
    ]
    dense = as_dense(case)
    for backend in (b for b in _backends.BACKENDS if b != "auto"):
        skip, note = _backend_status(backend, dense)
        what = f"dense teacher, H_t={case.teacher_hidden}, not checked"
        out.append(
            Candidate(
                f"fastkd-{backend}-dense",
                "fastkd",
                _dense_beside_topk(backend),
                skip,
                f"{what}; {note}" if note else what,
                checked=False,
                dense_teacher=True,
            )
        )
    return out


class _BareMatmuls(torch.autograd.Function):
    """logits = h W^T forward; grad_h = g W and grad_W = g^T h backward, with g fixed: the
    matmuls a fused-linear loss cannot avoid. The loss value is a placeholder (0)."""

    @staticmethod
    def forward(ctx, hidden, weight, grad_logits):
        ctx.save_for_backward(hidden, weight, grad_logits)
        logits = hidden @ weight.T  # the work; dropped, as a fused loss drops each chunk's
        return logits.new_zeros(())

    @staticmethod
    def backward(ctx, grad_output):
        hidden, weight, grad_logits = ctx.saved_tensors
        return grad_logits @ weight, grad_logits.T @ hidden, None


def _bare_matmuls(case: Case) -> LossFn:
    generator = torch.Generator(device=case.device).manual_seed(0)
    grad_logits = torch.empty(case.tokens, case.vocab, dtype=case.torch_dtype, device=case.device)
    grad_logits.normal_(generator=generator)

    def loss(student_hidden, student_weight, teacher):
        return _BareMatmuls.apply(student_hidden, student_weight, grad_logits)

    return loss


def _dense_beside_topk(backend: str) -> Callable[[Case], LossFn]:
    def build(case: Case) -> LossFn:
        generator = torch.Generator(device=case.device).manual_seed(0)
        kw = dict(dtype=case.torch_dtype, device=case.device)
        Ht = case.teacher_hidden
        teacher_hidden = torch.empty(case.tokens, Ht, **kw).normal_(generator=generator)
        teacher_weight = torch.empty(case.vocab, Ht, **kw)
        teacher_weight.normal_(0.0, LOGIT_STD / math.sqrt(Ht), generator=generator)
        module = fastkd.FusedLinearKDLoss(backend=backend, **_options(as_dense(case)))

        def loss(student_hidden, student_weight, teacher):
            return module(student_hidden, student_weight, teacher_hidden, teacher_weight)

        return loss

    return build


# --- plain PyTorch --------------------------------------------------------------------------


def _formula(case: Case) -> LossFn:
    """The formula of the case's arguments; a top-k one takes (..., token_ids, logprobs)."""
    options = _options(case)
    if case.is_topk:
        base = formulas.fused_linear_topk_formula if case.fused_linear else formulas.topk_formula
    else:
        base = formulas.fused_linear_formula if case.fused_linear else formulas.kd_formula

    def loss(*args):
        return base(*args, **options)

    return loss


def _eager(case: Case) -> LossFn:
    return _with_pairs(_formula(case)) if case.is_topk else _formula(case)


def _with_pairs(fn: LossFn) -> LossFn:
    """A formula of (..., token_ids, logprobs) called as (..., teacher): torch.compile sees
    tensors only."""

    def loss(*args):
        *student, teacher = args
        return fn(*student, teacher.token_ids, teacher.logprobs)

    return loss


# One compiled function per loss configuration, kept across shapes: torch.compile's default
# (automatic dynamic shapes) then serves a sweep with two compilations instead of one per
# shape, as it would in a training loop whose sequence lengths vary.
_COMPILED: dict[tuple, LossFn] = {}


def _compiled(case: Case) -> LossFn:
    key = (case.fused_linear, case.teacher, case.topk_tail, case.divergence, case.temperature)
    key += (case.beta, case.alpha)
    if key not in _COMPILED:
        _raise_recompile_limit()
        _COMPILED[key] = torch.compile(_formula(case))
    return _with_pairs(_COMPILED[key]) if case.is_topk else _COMPILED[key]


def _raise_recompile_limit() -> None:
    # Every configuration compiles the same Python code object; past the default limit of 8
    # cache entries per code object torch.compile would silently fall back to eager.
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), 256))


# --- Liger-Kernel -----------------------------------------------------------------------------

# fastkd divergence -> Liger's JSD beta (its JSD is forward KL at beta=0, reverse KL at 1).
_LIGER_BETA = {"forward_kl": 0.0, "reverse_kl": 1.0}


def _liger_beta(case: Case) -> float | None:
    if case.divergence == "jsd":
        return case.beta
    return _LIGER_BETA.get(case.divergence)


def _liger_candidates(case: Case) -> list[Candidate]:
    version = liger_version()
    names = ["liger-fused", "liger-chunked"] if case.fused_linear else ["liger"]
    if version is None:
        return [Candidate(n, "liger", None, "liger-kernel is not installed") for n in names]
    note = f"liger-kernel {version}"
    beta = _liger_beta(case)
    unsupported = f"Liger-Kernel has no {case.divergence} loss" if beta is None else None
    triton_skip = None
    if case.device == "cpu" and not interpreting():
        triton_skip = "Liger's Triton kernels run on CPU only under TRITON_INTERPRET=1"
    if not case.fused_linear:
        return [Candidate("liger", "liger", _liger_logits, unsupported or triton_skip, note)]
    return [
        Candidate("liger-fused", "liger", _liger_fused, unsupported or triton_skip, note),
        # LigerFusedLinearJSDLoss compiles its chunk function (compiled=True, its default).
        Candidate("liger-chunked", "liger", _liger_chunked, unsupported, note, compiles=True),
    ]


def _t2(case: Case) -> float:
    return case.temperature**2


def _liger_logits(case: Case) -> LossFn:
    from liger_kernel.transformers.functional import liger_jsd, liger_kl_div

    T, t2 = case.temperature, _t2(case)
    beta = _liger_beta(case)

    def loss(student, teacher):
        log_q = F.log_softmax(student / T, dim=-1)
        log_p = F.log_softmax(teacher / T, dim=-1)
        if case.divergence == "forward_kl":
            out = liger_kl_div(log_q, log_p, reduction="batchmean", log_target=True)
        else:
            out = liger_jsd(log_q, log_p, None, beta)
        return out * t2

    return loss


def _liger_fused(case: Case) -> LossFn:
    from liger_kernel.transformers.functional import liger_fused_linear_jsd

    beta, T, t2 = _liger_beta(case), case.temperature, _t2(case)

    def loss(student_hidden, student_weight, teacher_hidden, teacher_weight):
        out = liger_fused_linear_jsd(
            student_hidden, student_weight, teacher_hidden, teacher_weight, None, beta, -100, T
        )
        return out * t2

    return loss


def _liger_chunked(case: Case) -> LossFn:
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    module = LigerFusedLinearJSDLoss(
        weight_hard_loss=0.0,
        weight_soft_loss=1.0,
        beta=_liger_beta(case),
        temperature=case.temperature,
    )
    # It needs labels to count the tokens; none is ignored.
    labels = torch.zeros(case.tokens, dtype=torch.long, device=case.device)
    t2 = _t2(case)

    def loss(student_hidden, student_weight, teacher_hidden, teacher_weight):
        return module(student_hidden, student_weight, teacher_hidden, teacher_weight, labels) * t2

    return loss
