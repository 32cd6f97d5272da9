"""What one benchmark case is, its inputs, and its floor (design.md §3).

A case is one loss configuration at one shape on one device. Its inputs are a few buffers
allocated once and refilled in place: with fresh random numbers before timing, and with a
row-periodic pattern before the correctness check (see :func:`fill_check_`), so the check
can compare every output row at full size against a float64 reference computed on a few
rows only. A top-k teacher (design.md §4) is a constant of its case: its pairs are made once,
from random logits, with the same row period, and serve the check and the timing alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

import fastkd
from fastkd import TopKTeacher

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}

# Logits are drawn as LOGIT_STD * randn: peaked distributions, like a trained LM's.
LOGIT_STD = 3.0
# The correctness check tiles this many random rows (a prime, so a wrong row offset at any
# power-of-two or vocabulary-sized stride lands on a row with different expected values).
CHECK_PERIOD = 251
# The top-k teacher's pairs: what fastkd.topk_logprobs makes (the floor counts their bytes).
TOPK_ID_DTYPE = torch.int64
TOPK_LOGPROB_DTYPE = torch.float32
# Its logits' seed: one teacher per case, whatever the run's seed.
TOPK_TEACHER_SEED = 1234
TEACHERS = ("dense", "topk")


@dataclass(frozen=True)
class Case:
    divergence: str
    tokens: int
    vocab: int
    dtype: str
    device: str
    temperature: float = 1.0
    beta: float = 0.5
    alpha: float = 0.1
    fused_linear: bool = False
    hidden: int = 0
    # Fused linear with a top-k teacher: the dense baseline's teacher hidden size.
    teacher_hidden: int = 0
    teacher: str = "dense"  # or "topk": a fastkd.TopKTeacher of K pairs a row
    topk: int = 0
    topk_tail: str = "none"

    @property
    def is_topk(self) -> bool:
        return self.teacher == "topk"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=self.torch_dtype).element_size()

    def label(self) -> str:
        shape = f"N={self.tokens} V={self.vocab}"
        if self.fused_linear:
            shape += f" H={self.hidden}"
            if self.teacher_hidden != self.hidden and not self.is_topk:
                shape += f" H_t={self.teacher_hidden}"
        kind = "FusedLinear" if self.fused_linear else "logits"
        if self.is_topk:
            kind += f", {topk_label(self.topk, self.topk_tail)}"
        return f"{self.divergence} ({kind}) {shape} {self.dtype} T={self.temperature:g}"


def topk_label(k: int | None, tail: str) -> str:
    """The teacher in words: top-64 teacher (, tail bucket); top-k teacher for k None."""
    return f"top-{k or 'k'} teacher" + (f", tail {tail}" if tail != "none" else "")


def as_dense(case: Case) -> Case:
    """The same shapes with a dense teacher (the top-k cases' dense baseline)."""
    return replace(case, teacher="dense", topk=0, topk_tail="none")


@dataclass
class Inputs:
    """The argument tensors of a loss call, in call order.

    Logits: (student (N, V), teacher (N, V)). Fused linear: (student hidden (N, H), student
    weight (V, H), teacher hidden (N, H_t), teacher weight (V, H_t)). ``grad_index`` names
    the arguments that get a gradient; ``row_index`` those whose dim 0 is the token axis.
    A top-k teacher is not among ``args`` (those are refilled): it is ``teacher``, passed
    last, after the student's (N, V) logits or (hidden, weight).
    """

    args: list[torch.Tensor]
    grad_index: tuple[int, ...]
    row_index: tuple[int, ...]
    scales: list[float] = field(default_factory=list)
    teacher: TopKTeacher | None = None

    def grad_args(self) -> list[torch.Tensor]:
        return [self.args[i] for i in self.grad_index]

    def call_args(self) -> list:
        return self.args if self.teacher is None else [*self.args, self.teacher]


def make_inputs(case: Case) -> Inputs:
    """Allocates the case's input buffers (contents are set by the fill functions); a top-k
    teacher is made here, whole."""
    kw = dict(dtype=case.torch_dtype, device=case.device)
    N, V = case.tokens, case.vocab
    if case.is_topk:
        teacher = make_topk_teacher(case)
        if not case.fused_linear:
            args = [torch.empty(N, V, **kw)]
            return Inputs(
                args, grad_index=(0,), row_index=(0,), scales=[LOGIT_STD], teacher=teacher
            )
        H = case.hidden
        args = [torch.empty(N, H, **kw), torch.empty(V, H, **kw)]
        scales = [1.0, LOGIT_STD / math.sqrt(H)]
        return Inputs(args, grad_index=(0, 1), row_index=(0,), scales=scales, teacher=teacher)
    if not case.fused_linear:
        args = [torch.empty(N, V, **kw), torch.empty(N, V, **kw)]
        return Inputs(args, grad_index=(0,), row_index=(0, 1), scales=[LOGIT_STD, LOGIT_STD])
    H, Ht = case.hidden, case.teacher_hidden
    args = [
        torch.empty(N, H, **kw),
        torch.empty(V, H, **kw),
        torch.empty(N, Ht, **kw),
        torch.empty(V, Ht, **kw),
    ]
    # Unit hidden states and weights of std LOGIT_STD/sqrt(H): logits of std LOGIT_STD.
    scales = [1.0, LOGIT_STD / math.sqrt(H), 1.0, LOGIT_STD / math.sqrt(Ht)]
    return Inputs(args, grad_index=(0, 1), row_index=(0, 2), scales=scales)


def make_topk_teacher(case: Case) -> TopKTeacher:
    """The case's top-K pairs (N, K): ``fastkd.topk_logprobs`` at the loss's temperature of
    random logits (the producer divides by T, as design.md §4's default teacher_temperature
    expects), with rows that repeat with the check's period (row i = row i % period)."""
    generator = torch.Generator(device=case.device)
    generator.manual_seed(TOPK_TEACHER_SEED)
    period = min(CHECK_PERIOD, case.tokens)
    logits = torch.empty(period, case.vocab, dtype=torch.float32, device=case.device)
    logits.normal_(0.0, LOGIT_STD, generator=generator)
    pairs = fastkd.topk_logprobs(logits, case.topk, temperature=case.temperature)
    rows = torch.arange(case.tokens, device=case.device) % period
    ids = pairs.token_ids[rows].to(TOPK_ID_DTYPE).contiguous()
    return TopKTeacher(ids, pairs.logprobs[rows].to(TOPK_LOGPROB_DTYPE).contiguous())


def fill_random_(inputs: Inputs, generator: torch.Generator) -> None:
    """Fresh normal random numbers in every buffer (never zeros)."""
    with torch.no_grad():
        for x, scale in zip(inputs.args, inputs.scales, strict=True):
            x.normal_(0.0, scale, generator=generator)


def fill_check_(inputs: Inputs, generator: torch.Generator, period: int) -> None:
    """Random contents whose token rows repeat with the given period (row i = row i % period).

    Weights are fully random. Every output row is then known from ``period`` reference rows.
    """
    with torch.no_grad():
        for i, (x, scale) in enumerate(zip(inputs.args, inputs.scales, strict=True)):
            if i not in inputs.row_index:
                x.normal_(0.0, scale, generator=generator)
                continue
            block = x.new_empty((period, *x.shape[1:])).normal_(0.0, scale, generator=generator)
            for start in range(0, x.shape[0], period):
                stop = min(start + period, x.shape[0])
                x[start:stop].copy_(block[: stop - start])


def row_counts(tokens: int, period: int) -> torch.Tensor:
    """How many times each of the ``period`` reference rows occurs among ``tokens`` rows."""
    full, rest = divmod(tokens, period)
    counts = torch.full((period,), full, dtype=torch.float64)
    counts[:rest] += 1
    return counts


# --- floors (design.md §3) -------------------------------------------------------------


def floor_bytes(case: Case, backward: bool) -> int:
    """Least device-memory traffic of the logits loss: read both inputs once, and write the
    gradient once when there is a backward. 6*N*V bytes for bf16 forward+backward. A top-k
    teacher is read as its K (id, log-probability) pairs a row (design.md §4's floor)."""
    nv = case.tokens * case.vocab * case.element_size
    if case.is_topk:
        pair_bytes = TOPK_ID_DTYPE.itemsize + TOPK_LOGPROB_DTYPE.itemsize
        return (2 if backward else 1) * nv + case.tokens * case.topk * pair_bytes
    return (3 if backward else 2) * nv


def floor_flops(case: Case, backward: bool) -> int:
    """Least arithmetic of the fused-linear loss: the student and teacher logits matmuls,
    plus grad_hidden and grad_weight of the student with a backward: 2*N*V*(3*H_s + H_t).
    A top-k teacher has no matmul: 2*N*V*3*H_s."""
    student = (3 if backward else 1) * case.hidden
    teacher = 0 if case.is_topk else case.teacher_hidden
    return 2 * case.tokens * case.vocab * (student + teacher)
