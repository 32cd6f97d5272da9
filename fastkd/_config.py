"""One loss's options as one frozen :class:`KDConfig`, and the checks of its tensors.

The public layer (``losses``, ``fused_linear``) builds a KDConfig with
:meth:`KDConfig.from_options`, which validates every option once (a clear error naming the
argument, before any kernel runs); everything below it reads the options by name. Only the
torch.library op boundary (``_ops``) flattens a config to scalars, with
:meth:`KDConfig.to_op_args` and :meth:`KDConfig.from_op_args`.

The checks of tensors and labels live here too, so that every public entry point shares them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TypedDict

import torch
from torch import Tensor
from typing_extensions import Unpack

from . import _backends
from .divergences import DIVERGENCES, REDUCTIONS

# The op schema's type of each field type (the annotations are strings under
# ``from __future__ import annotations``).
_SCHEMA_TYPES = {"str": "str", "float": "float", "float | None": "float?", "bool": "bool",
                 "int": "int", "int | None": "int?"}  # fmt: skip


class KDOptions(TypedDict, total=False):
    """The options every fastkd loss takes as keywords, besides ``divergence`` (their meaning
    is documented on :class:`fastkd.KDLoss`; defaults in ``OPTION_DEFAULTS``)."""

    temperature: float
    beta: float
    alpha: float
    softcap: float | None
    scale_by_temperature_squared: bool
    kd_weight: float
    ce_weight: float
    ignore_index: int
    reduction: str
    backend: str
    inplace_backward: bool
    teacher_normalization: str
    student_normalization: str
    topk_tail: str
    teacher_temperature: float | None
    vocab_size: int | None


# The top-k options' values (design.md §4); a dense teacher takes only their defaults.
TEACHER_NORMALIZATIONS = ("raw", "renormalize")
STUDENT_NORMALIZATIONS = ("full", "topk")
TOPK_TAILS = ("none", "bucket")

OPTION_DEFAULTS: KDOptions = {
    "temperature": 1.0,
    "beta": 0.5,  # TRL's generalized JSD default
    "alpha": 0.1,  # DistiLLM's skew default
    "softcap": None,
    "scale_by_temperature_squared": True,  # Hinton
    "kd_weight": 1.0,
    "ce_weight": 0.0,
    "ignore_index": -100,  # torch's cross_entropy and Hugging Face's label padding
    "reduction": "mean",
    "backend": "auto",
    "inplace_backward": False,
    "teacher_normalization": "raw",  # the stored log-probabilities as they are
    "student_normalization": "full",  # the student's softmax over its whole vocabulary
    "topk_tail": "none",
    "teacher_temperature": None,  # the producer already divided by the loss's T
    "vocab_size": None,  # every column of the logits (every row of the LM-head weights)
}


@dataclass(frozen=True)
class KDConfig:
    """Every option of one KD loss, validated (build it with :meth:`from_options`).

    ``mix_weight`` is the one mixture parameter in use: ``beta`` for jsd, ``alpha`` for the
    skew KLs, 0.5 (unused) for the others. ``backend`` is as asked ("auto" included) until
    :meth:`with_backend` resolves it for a call.
    """

    divergence: str
    temperature: float
    mix_weight: float
    softcap: float | None
    scale_by_temperature_squared: bool
    kd_weight: float
    ce_weight: float
    ignore_index: int
    reduction: str
    backend: str
    inplace_backward: bool
    teacher_normalization: str
    student_normalization: str
    topk_tail: str
    teacher_temperature: float | None
    vocab_size: int | None

    @classmethod
    def from_options(cls, divergence: str = "forward_kl", **options: Unpack[KDOptions]) -> KDConfig:
        """The public options (KDLoss's arguments) checked and resolved."""
        unknown = sorted(set(options) - set(OPTION_DEFAULTS))
        if unknown:
            raise TypeError(
                f"unknown option {unknown[0]!r}; the options are divergence and "
                f"{', '.join(OPTION_DEFAULTS)}"
            )
        o = {**OPTION_DEFAULTS, **options}
        if divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {sorted(DIVERGENCES)}, got {divergence!r}")
        if o["reduction"] not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {list(REDUCTIONS)}, got {o['reduction']!r}")
        if o["backend"] not in _backends.BACKENDS:
            raise ValueError(
                f"backend must be one of {list(_backends.BACKENDS)}, got {o['backend']!r}"
            )
        check_flags(
            scale_by_temperature_squared=o["scale_by_temperature_squared"],
            inplace_backward=o["inplace_backward"],
        )
        softcap = o["softcap"]
        if softcap is not None:
            softcap = check_number("softcap", softcap, positive=True)
        ignore_index = o["ignore_index"]
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
        temperature = check_temperature(o["temperature"])
        return cls(
            divergence=divergence,
            temperature=temperature,
            mix_weight=_mix_weight(divergence, o["beta"], o["alpha"]),
            softcap=softcap,
            scale_by_temperature_squared=o["scale_by_temperature_squared"],
            kd_weight=check_number("kd_weight", o["kd_weight"]),
            ce_weight=check_number("ce_weight", o["ce_weight"]),
            ignore_index=int(ignore_index),
            reduction=o["reduction"],
            backend=o["backend"],
            inplace_backward=o["inplace_backward"],
            **_topk_options(o, temperature),
            vocab_size=check_vocab_size(o["vocab_size"]),
        )

    def describe(self, **extra) -> str:
        """``name=value, ...`` of every field and of ``extra`` (the modules' extra_repr);
        ``vocab_size`` only when set."""
        items = {**dataclasses.asdict(self), **extra}
        if self.vocab_size is None:
            del items["vocab_size"]
        return ", ".join(f"{name}={value!r}" for name, value in items.items())

    def with_backend(self, backend: str) -> KDConfig:
        return dataclasses.replace(self, backend=backend)

    def vocab_view(self, x: Tensor, dim: int = -1) -> Tensor:
        """The first ``vocab_size`` entries of ``x`` along ``dim`` (the logits' columns, or an
        LM head's rows at dim 0), as a view: what every path reads (design.md §5).

        A view and not a copy: the kernels take a row stride larger than V, and autograd
        through the view hands the padding entries a gradient of exactly 0.
        """
        if self.vocab_size is None or x.shape[dim] == self.vocab_size:
            return x
        return x.narrow(dim, 0, self.vocab_size)

    @property
    def topk_options_set(self) -> list[str]:
        """The top-k options given other values than their defaults (a dense teacher takes
        none)."""
        return [
            name
            for name in ("teacher_normalization", "student_normalization", "topk_tail",
                         "teacher_temperature")
            if getattr(self, name) != OPTION_DEFAULTS[name]
        ]  # fmt: skip

    @property
    def teacher_logprob_scale(self) -> float:
        """T_g / T, the factor on a top-k teacher's stored log-probabilities (design.md §4):
        1 when teacher_temperature is None or equals T."""
        if self.teacher_temperature is None:
            return 1.0
        return self.teacher_temperature / self.temperature

    @property
    def has_ce(self) -> bool:
        return self.ce_weight != 0

    @property
    def t_squared(self) -> float:
        """The factor on D in the loss: T^2 (Hinton), or 1 when switched off."""
        return self.temperature**2 if self.scale_by_temperature_squared else 1.0

    @property
    def kd_grad_coef(self) -> float:
        """dL/ds = kd_grad_coef * dD/da + ...: the kd weight, T^2, and 1/T from a = s/T."""
        return self.kd_weight * self.t_squared / self.temperature

    # --- the op boundary: scalars in the fields' order, one function each way ---------

    @classmethod
    def op_schema(cls) -> str:
        """The fields as torch.library schema arguments, e.g. ``"str divergence, ..."``."""
        return ", ".join(f"{_SCHEMA_TYPES[f.type]} {f.name}" for f in dataclasses.fields(cls))

    def to_op_args(self) -> tuple:
        return dataclasses.astuple(self)

    @classmethod
    def from_op_args(cls, values) -> KDConfig:
        return cls(*values)


# 1/T and T^2 must stay far from float32's limits (3.4e38) for logits up to 1e4 in
# magnitude (design.md §2): T = 1e-4 makes them 1e8, T^2 = 1e8 at T = 1e4.
TEMPERATURE_RANGE = (1e-4, 1e4)


def check_temperature(value) -> float:
    value = check_number("temperature", value, positive=True)
    low, high = TEMPERATURE_RANGE
    if not low <= value <= high:
        raise ValueError(
            f"temperature must lie in [{low:g}, {high:g}] (float32 holds 1/T and T^2 there for "
            f"logits up to 1e4), got {value!r}"
        )
    return value


def _topk_options(o: dict, temperature: float) -> dict:
    """The top-k options checked against each other (design.md §4)."""
    for name, allowed in (
        ("teacher_normalization", TEACHER_NORMALIZATIONS),
        ("student_normalization", STUDENT_NORMALIZATIONS),
        ("topk_tail", TOPK_TAILS),
    ):
        value = o[name]
        if not isinstance(value, str) or value not in allowed:
            raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")
    if o["topk_tail"] == "bucket" and o["teacher_normalization"] != "raw":
        raise ValueError(
            "topk_tail='bucket' needs teacher_normalization='raw': the tail is the mass the "
            "raw top-k leaves out, and a renormalised teacher leaves none"
        )
    if o["topk_tail"] == "bucket" and o["student_normalization"] != "full":
        raise ValueError(
            "topk_tail='bucket' needs student_normalization='full': a student normalised over "
            "the top-k has no mass outside it"
        )
    t_g = o["teacher_temperature"]
    if t_g is not None:
        t_g = check_number("teacher_temperature", t_g, positive=True)
        if t_g != temperature and (
            o["teacher_normalization"] != "renormalize" or o["topk_tail"] != "none"
        ):
            raise ValueError(
                f"teacher_temperature={t_g!r} differs from temperature={temperature!r}: the "
                "log-probabilities are rescaled by T_g/T and are no longer normalised over the "
                "vocabulary, so this needs teacher_normalization='renormalize' and "
                "topk_tail='none'"
            )
    return {
        "teacher_normalization": o["teacher_normalization"],
        "student_normalization": o["student_normalization"],
        "topk_tail": o["topk_tail"],
        "teacher_temperature": t_g,
    }


def _mix_weight(divergence: str, beta, alpha) -> float:
    name = DIVERGENCES[divergence].param
    if name is None:
        return 0.5
    value = check_number(name, beta if name == "beta" else alpha)
    if not 0.0 < value < 1.0:
        raise ValueError(
            f"{name} must lie strictly between 0 and 1 for {divergence}, got {value!r}"
        )
    return value


# --- checks of single values -------------------------------------------------------------


def check_number(name: str, value, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    # Comparisons rather than math.isfinite, which torch.compile(dynamic=True) cannot trace
    # on a symbolic float; NaN fails them too.
    if not (-math.inf < value < math.inf) or (positive and value <= 0):
        rule = "a finite number > 0" if positive else "a finite number"
        raise ValueError(f"{name} must be {rule}, got {value!r}")
    return float(value)


def check_flags(**flags) -> None:
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {value!r}")


# --- checks of tensors -------------------------------------------------------------------


def check_dense_tensor(name: str, x) -> None:
    """A dense (strided) torch.Tensor with data, or a TypeError naming the argument: the
    kernels read memory through strides, and sparse, nested or meta tensors have none."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.is_nested or x.layout != torch.strided:
        kind = "a nested tensor" if x.is_nested else f"layout {x.layout}"
        raise TypeError(f"{name} must be a dense (strided) tensor, got {kind}")
    if x.device.type == "meta":
        raise TypeError(f"{name} must hold data, got a tensor on the meta device")


def check_float_tensor(name: str, x) -> None:
    """A dense floating-point torch.Tensor, or a TypeError naming the argument."""
    check_dense_tensor(name, x)
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def check_logits(
    student: Tensor, teacher: Tensor, vocab_size: int | None = None, *, allow_empty: bool = False
) -> int:
    """Student and teacher logits (..., V_s) and (..., V_t) of one loss: the vocabulary V
    the loss reads (:func:`check_vocab_widths`) is returned. ``allow_empty``: a vocab-parallel
    rank may hold an empty shard (V_r = 0)."""
    for name, x in (("student_logits", student), ("teacher_logits", teacher)):
        check_float_tensor(name, x)
        if x.dim() == 0:
            raise ValueError(f"{name} must have a vocabulary dimension, got a 0-d tensor")
    if student.device != teacher.device:
        raise ValueError(
            f"student_logits and teacher_logits must be on one device, got {student.device} "
            f"and {teacher.device}"
        )
    widths = {"student_logits": student.shape[-1], "teacher_logits": teacher.shape[-1]}
    if allow_empty and widths["student_logits"] == widths["teacher_logits"] == 0:
        V = 0
    else:
        V = check_vocab_widths(vocab_size, "columns", **widths)
    if student.shape[:-1] != teacher.shape[:-1]:
        raise ValueError(
            f"student_logits and teacher_logits must have the same leading shape, got "
            f"{tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    return V


def check_vocab_size(value) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"vocab_size must be an int or None, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"vocab_size must be >= 1, got {value}")
    return int(value)


def check_vocab_widths(vocab_size: int | None, unit: str, **widths: int) -> int:
    """The vocabulary V a loss reads (design.md §5), from the widths of its tensors (the
    logits' columns, the LM heads' rows), by name: ``vocab_size``, which no width may fall
    short of, or else the one width they all share."""
    names = list(widths)
    if vocab_size is not None:
        for name in names:
            if widths[name] < vocab_size:
                raise ValueError(
                    f"vocab_size={vocab_size} is larger than {name}, which has "
                    f"{widths[name]} {unit}: vocab_size is the true vocabulary, at most the "
                    f"width of every input"
                )
        return vocab_size
    first = names[0]
    for name in names[1:]:
        if widths[name] != widths[first]:
            # Padded embeddings (Qwen2.5-7B: 152064 columns, Qwen2.5-0.5B: 151936) are the usual
            # cause; the padding must be dropped, never compared as if it were vocabulary.
            narrow = min(widths[first], widths[name])
            raise ValueError(
                f"{first} has {widths[first]} {unit} and {name} {widths[name]}: pass "
                f"vocab_size={narrow} (or the true vocabulary, if smaller) to ignore the "
                f"padding {unit}"
            )
    if widths[first] == 0:
        raise ValueError(f"{first} has an empty vocabulary dimension (V = 0)")
    return widths[first]


def check_labels(
    labels, lead_shape: torch.Size, V: int | None, device: torch.device, config: KDConfig
) -> None:
    """Labels for logits of shape (*lead_shape, V) on ``device`` (FusedLinearKDLoss has no
    logits to show, only their shape); CE mixing needs them. V None: a vocab-parallel rank
    before the ranks agree on the vocabulary, which then checks the range."""
    if labels is None:
        if config.has_ce:
            raise ValueError("ce_weight != 0 mixes in hard-label cross-entropy and needs labels")
        return
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor or None, got {type(labels).__name__}")
    check_dense_tensor("labels", labels)
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    if labels.shape != lead_shape:
        raise ValueError(
            f"labels must have the leading shape of the logits {tuple(lead_shape)}, "
            f"got {tuple(labels.shape)}"
        )
    if labels.device != device:
        raise ValueError(f"labels must be on the logits' device {device}, got {labels.device}")
    ignore_index = config.ignore_index
    if V is None:
        return
    valid = (labels == ignore_index) | ((labels >= 0) & (labels < V))
    check_values(valid, f"labels must lie in [0, {V}) or equal ignore_index={ignore_index}")


def check_values(valid: Tensor, message: str) -> None:
    """ValueError unless ``valid`` is all true: at once on CPU, else with the kernels."""
    if valid.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(valid.all()):
            raise ValueError(message)
    else:
        # No host sync on accelerators, and no data-dependent branch (a graph break) under
        # torch.compile: an assert that runs with the op, as torch's cross_entropy does.
        torch._assert_async(valid.all(), message)


def check_num_items(num_items_in_batch, device: torch.device) -> Tensor | None:
    """``num_items_in_batch`` as a 0-d tensor on ``device`` (or None)."""
    if num_items_in_batch is None:
        return None
    if isinstance(num_items_in_batch, Tensor):
        check_dense_tensor("num_items_in_batch", num_items_in_batch)
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
        # 0 is let through (the sum, 0, is then divided by 1): a trainer hands it over when
        # every label of the accumulated batch is ignored. Every positive count is honoured,
        # fractional ones included.
        check_values(
            torch.isfinite(count) & (count >= 0),
            "num_items_in_batch must be a finite number >= 0",
        )
        return count
    if check_number("num_items_in_batch", num_items_in_batch) <= 0:
        raise ValueError(f"num_items_in_batch must be > 0, got {num_items_in_batch!r}")
    return torch.full((), float(num_items_in_batch), device=device)
