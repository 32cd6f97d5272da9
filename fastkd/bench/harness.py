"""The harness: check each implementation against the reference, then time it.

For every case and every (implementation, mode) pair:

1. Correctness, at the full shape. The inputs are refilled with rows that repeat with a
   prime period (:func:`cases.fill_check_`); one call's loss and gradients are compared with
   the float64 reference (:mod:`fastkd.reference`) computed once per case on those few rows,
   every output row against its expected row. Relative norm error above the tolerance, or
   any NaN/inf, marks the pair "wrong" and it is not timed: a fast wrong kernel cannot win.
   This first call also absorbs compilation; its time is kept as ``first_call_ms``.
2. Timing, on fresh normal random inputs (:mod:`measure`): warm-up, then the median and
   quartiles of repeated calls.
3. Peak memory beyond the inputs, over the first call after the check (outputs held).

Any exception marks the pair "OOM" (out of memory) or "error" (with the message in the JSON)
and the run goes on with the next pair.

Baselines that compute something else than the case's loss (a top-k case's bare matmuls and
dense loss: ``Candidate.checked`` False) skip step 1 but for its first call: they are timed
the same way, never checked, and say so in their note.
"""

from __future__ import annotations

import gc
import math
import os
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from fastkd import TopKTeacher
from fastkd.reference import kd_loss_reference
from fastkd.topk_reference import topk_loss_reference

from . import cases, measure
from .cases import Case, Inputs
from .implementations import FWD, FWD_BWD, MATMULS, Candidate

# (loss, gradient) relative-norm tolerances of the check. Looser than the precision tests'
# contract (tests/, design.md §2): this check is there to catch wrong results, and it
# applies to every implementation alike, including ones that round log-probs (Liger's API)
# or logits (a bf16 matmul) to the input dtype before the loss.
TOLERANCES = {
    (False, "float32"): (1e-4, 1e-4),
    (False, "low"): (1e-2, 2e-2),
    (True, "float32"): (1e-4, 1e-3),
    (True, "low"): (2e-2, 5e-2),
}


def tolerance(case: Case) -> tuple[float, float]:
    return TOLERANCES[(case.fused_linear, "float32" if case.dtype == "float32" else "low")]


@dataclass
class Result:
    """One row of the table, one object of the JSON ``results`` list."""

    implementation: str
    family: str
    mode: str
    divergence: str
    tokens: int
    vocab: int
    dtype: str
    device: str
    temperature: float
    fused_linear: bool
    hidden: int | None
    teacher_hidden: int | None
    status: str  # "ok", "wrong", "OOM", "error", "skipped"
    teacher: str = "dense"  # or "topk"
    topk: int | None = None  # K, with a top-k teacher
    topk_tail: str | None = None  # "none" or "bucket", with a top-k teacher
    reason: str | None = None
    note: str = ""
    loss_rel_err: float | None = None
    grad_rel_err: float | None = None
    first_call_ms: float | None = None
    reps: int = 0
    median_ms: float | None = None
    p25_ms: float | None = None
    p75_ms: float | None = None
    min_ms: float | None = None
    max_ms: float | None = None
    spread_pct: float | None = None
    floor_ms: float | None = None
    floor_bytes: int | None = None
    floor_flops: int | None = None
    achieved_GBps: float | None = None
    achieved_TFLOPs: float | None = None
    pct_of_floor: float | None = None
    peak_mem_bytes: int | None = None
    speedup_vs_eager: float | None = None
    speedup_vs_compile: float | None = None
    x_matmuls: float | None = None  # this median over the bare matmuls' (fused top-k)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Ceilings:
    """The device's measured ceilings, taken once per run."""

    copy_bytes_per_s: float
    matmul_flops_per_s: dict[str, float] = field(default_factory=dict)


# The fields a Result copies from its Case (hidden sizes only for fused linear).
_CASE_FIELDS = ("divergence", "tokens", "vocab", "dtype", "device", "temperature", "fused_linear")


def _result(case: Case, cand: Candidate, mode: str, status: str, **kw) -> Result:
    sizes = {
        k: getattr(case, k) if case.fused_linear else None for k in ("hidden", "teacher_hidden")
    }
    return Result(
        implementation=cand.name,
        family=cand.family,
        mode=mode,
        **{k: getattr(case, k) for k in _CASE_FIELDS},
        **sizes,
        teacher=case.teacher,
        topk=case.topk if case.is_topk else None,
        topk_tail=case.topk_tail if case.is_topk else None,
        status=status,
        note=cand.note,
        **kw,
    )


# --- the reference ------------------------------------------------------------------------


@dataclass
class Expected:
    """The reference outputs for check inputs of period P: the loss, and per gradient
    argument either its P distinct rows ("rows", row i of the output is row i % P) or the
    whole tensor ("full"). Held on the host in float32 (the values, not the arithmetic,
    which is float64)."""

    loss: float
    grads: list[tuple[str, torch.Tensor]]


def reference(case: Case, inputs: Inputs, period: int) -> Expected:
    """Float64 reference (float32 if float64 does not fit) on the check inputs' P rows.

    The loss over N rows that repeat with period P is sum_j c_j L_j / N, with c_j the count
    of row j: autograd of that gives each distinct row's gradient times c_j, and the
    weights' gradient directly.
    """
    N = case.tokens
    counts = cases.row_counts(N, period)
    wide = _reference_dtype(case, inputs)
    counts = counts.to(device=case.device, dtype=wide)
    rows = {i: inputs.args[i][:period].to(wide) for i in inputs.row_index}
    args = [rows.get(i, x.to(wide)) for i, x in enumerate(inputs.args)]
    for i in inputs.grad_index:
        args[i].requires_grad_(True)
    student = args[0] @ args[1].T if case.fused_linear else args[0]
    options = dict(
        divergence=case.divergence,
        temperature=case.temperature,
        beta=case.beta,
        alpha=case.alpha,
        reduction="none",
    )
    if case.is_topk:
        pairs = inputs.teacher.rows(0, period)
        teacher = TopKTeacher(pairs.token_ids, pairs.logprobs.to(wide), pairs.mask)
        per_row, _, _ = topk_loss_reference(student, teacher, topk_tail=case.topk_tail, **options)
    else:
        teacher = args[2] @ args[3].T if case.fused_linear else args[1]
        per_row, _, _ = kd_loss_reference(student, teacher.detach(), **options)
    loss = (per_row * counts).sum() / N
    grads = torch.autograd.grad(loss, [args[i] for i in inputs.grad_index])
    expected = []
    for i, g in zip(inputs.grad_index, grads, strict=True):
        if i in inputs.row_index:
            expected.append(("rows", (g / counts[:, None]).float().cpu()))
        else:
            expected.append(("full", g.float().cpu()))
    return Expected(float(loss.detach()), expected)


def _reference_dtype(case: Case, inputs: Inputs) -> torch.dtype:
    if not case.fused_linear or case.device != "cuda":
        return torch.float64
    # Fused linear on a GPU: the weights and their gradient in float64 must fit easily.
    weights = [x for i, x in enumerate(inputs.args) if i not in inputs.row_index]
    weight_numel = sum(x.numel() for x in weights)
    free, _ = torch.cuda.mem_get_info()
    return torch.float64 if 8 * 3 * weight_numel < free // 4 else torch.float32


def _rel_err(actual: torch.Tensor, kind: str, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||, in chunks of rows (inf on NaN/inf).

    "rows": row i of ``actual`` is compared with row i % P of ``expected`` (moved to the
    device once); "full": chunk by chunk, each moved as it is needed.
    """
    if kind == "rows":
        expected = expected.to(actual.device)
        step = expected.shape[0]
    else:
        step = max(1, (1 << 24) // max(1, actual[0].numel()))
    num = den = 0.0
    for start in range(0, actual.shape[0], step):
        a = actual[start : start + step].detach().float()
        rows = slice(0, a.shape[0]) if kind == "rows" else slice(start, start + step)
        e = expected[rows].to(a.device)
        if not bool(torch.isfinite(a).all()):
            return math.inf
        num += float((a - e).double().square().sum())
        den += float(e.double().square().sum())
    return math.sqrt(num / den) if den > 0 else math.sqrt(num)


# --- one (implementation, mode) ----------------------------------------------------------


def _caller(fn, inputs: Inputs, mode: str) -> Callable[[], tuple]:
    args = inputs.call_args()
    if mode == FWD:

        def forward_only():
            with torch.no_grad():
                return fn(*args), ()

        return forward_only
    grad_args = inputs.grad_args()

    def forward_backward():
        loss = fn(*args)
        return loss, torch.autograd.grad(loss, grad_args)

    return forward_backward


def _status_of(exc: BaseException) -> str:
    if isinstance(exc, torch.OutOfMemoryError):
        return "OOM"
    text = str(exc)
    if "out of memory" in text.lower() or "can't allocate memory" in text:
        return "OOM"
    return "error"


@dataclass
class Check:
    """The outcome of the correctness check of one (implementation, mode)."""

    loss_rel_err: float | None  # None: a baseline, not checked
    grad_rel_err: float | None
    first_call_ms: float
    failure: str | None  # why it is wrong, or None

    def fields(self) -> dict:
        return dict(
            loss_rel_err=self.loss_rel_err,
            grad_rel_err=self.grad_rel_err,
            first_call_ms=self.first_call_ms,
        )


def prepare(case: Case, cand: Candidate, mode: str, inputs: Inputs) -> Callable[[], tuple]:
    """Builds the implementation and returns a no-argument call: (loss, gradients)."""
    fn = cand.build(case)
    for i in inputs.grad_index:
        inputs.args[i].requires_grad_(mode == FWD_BWD)
    return _caller(fn, inputs, mode)


def release(inputs: Inputs, device: str) -> None:
    """Undoes :func:`prepare` on the inputs and frees cached memory."""
    for i in inputs.grad_index:
        inputs.args[i].requires_grad_(False)
        inputs.args[i].grad = None
    _free(device)


def check(
    case: Case, call: Callable[[], tuple], mode: str, inputs: Inputs, expected: Expected, seed: int
) -> Check:
    """One call on the periodic check inputs (the same for every implementation), compared
    with the reference: the loss, and with a backward every gradient row."""
    generator = torch.Generator(device=case.device)
    generator.manual_seed(seed)
    cases.fill_check_(inputs, generator, min(cases.CHECK_PERIOD, case.tokens))
    first, (loss, grads) = measure.time_call(call, case.device)
    value = float(loss.detach())
    loss_err = abs(value - expected.loss) / max(abs(expected.loss), 1e-30)
    if not math.isfinite(value):
        loss_err = math.inf
    grad_err = None
    if mode == FWD_BWD:
        pairs = zip(grads, expected.grads, strict=True)
        grad_err = max(_rel_err(g, kind, e) for g, (kind, e) in pairs)
    del loss, grads
    loss_tol, grad_tol = tolerance(case)
    failure = None
    if loss_err > loss_tol or (grad_err is not None and grad_err > grad_tol):
        failure = f"check failed: loss rel err {loss_err:.2e} (tol {loss_tol:.0e})"
        if grad_err is not None:
            failure += f", grad rel err {grad_err:.2e} (tol {grad_tol:.0e})"
    return Check(loss_err, grad_err, first, failure)


def refill_for_timing(
    inputs: Inputs, cand: Candidate, seed: int, device: str
) -> Callable[[], None] | None:
    """Fresh random inputs for timing; returns the per-call reset an in-place kernel needs."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed + 1)
    cases.fill_random_(inputs, generator)
    if not cand.overwrites_inputs:
        return None

    def reset():
        with torch.no_grad():
            for i in inputs.grad_index:
                inputs.args[i].normal_(0.0, inputs.scales[i], generator=generator)

    return reset


def measure_one(
    case: Case,
    cand: Candidate,
    mode: str,
    inputs: Inputs,
    expected: Expected,
    plan: measure.TimingPlan,
    seed: int,
) -> Result:
    """Checks, then times one implementation in one mode. Never raises (but on Ctrl-C)."""
    try:
        call = prepare(case, cand, mode, inputs)
        if cand.checked:
            outcome = check(case, call, mode, inputs, expected, seed)
        else:
            first, out = measure.time_call(call, case.device)
            del out
            outcome = Check(None, None, first, None)
        if outcome.failure is not None:
            return _result(case, cand, mode, "wrong", reason=outcome.failure, **outcome.fields())
        reset = refill_for_timing(inputs, cand, seed, case.device)
        times, peak = measure.time_calls(call, reset, case.device, plan)
        return _result(
            case, cand, mode, "ok", **outcome.fields(), **_stats(times), peak_mem_bytes=peak
        )
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - any failure is a cell, not the end
        status = _status_of(exc)
        reason = f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:300]
        if status == "error" and _debug():
            traceback.print_exc()
        return _result(case, cand, mode, status, reason=reason)
    finally:
        release(inputs, case.device)


def _debug() -> bool:
    return os.environ.get("FASTKD_BENCH_DEBUG", "0") not in ("", "0")


def _stats(times_ms: list[float]) -> dict:
    q = statistics.quantiles(times_ms, n=4) if len(times_ms) > 1 else [times_ms[0]] * 3
    median = statistics.median(times_ms)
    return dict(
        reps=len(times_ms),
        median_ms=median,
        p25_ms=q[0],
        p75_ms=q[2],
        min_ms=min(times_ms),
        max_ms=max(times_ms),
        spread_pct=100.0 * (q[2] - q[0]) / 2 / median if median > 0 else 0.0,
    )


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


# --- floors and speed-ups ----------------------------------------------------------------


def add_floors(result: Result, case: Case, ceilings: Ceilings) -> None:
    """Fills the floor, achieved rate and percent-of-floor fields of an "ok" result."""
    backward = result.mode == FWD_BWD
    if case.fused_linear:
        flops = cases.floor_flops(case, backward)
        rate = ceilings.matmul_flops_per_s.get(case.dtype)
        result.floor_flops = flops
        if result.median_ms and rate:
            result.floor_ms = flops / rate * 1e3
            result.achieved_TFLOPs = flops / (result.median_ms / 1e3) / 1e12
    else:
        nbytes = cases.floor_bytes(case, backward)
        result.floor_bytes = nbytes
        result.floor_ms = nbytes / ceilings.copy_bytes_per_s * 1e3
        if result.median_ms:
            result.achieved_GBps = nbytes / (result.median_ms / 1e3) / 1e9
    if result.median_ms and result.floor_ms:
        result.pct_of_floor = 100.0 * result.floor_ms / result.median_ms


def add_speedups(results: list[Result]) -> None:
    """speedup_vs_eager and speedup_vs_compile = torch-eager's or torch-compile's median /
    this median; x_matmuls = this median / the bare matmuls' median; same case and mode."""
    medians: dict[tuple, float] = {}
    for r in results:
        if r.status == "ok" and r.median_ms:
            medians[(r.implementation, *_key(r))] = r.median_ms
    for r in results:
        if r.status != "ok" or not r.median_ms:
            continue
        eager = medians.get(("torch-eager", *_key(r)))
        compiled = medians.get(("torch-compile", *_key(r)))
        matmuls = medians.get((MATMULS, *_key(r)))
        r.speedup_vs_eager = eager / r.median_ms if eager else None
        r.speedup_vs_compile = compiled / r.median_ms if compiled else None
        r.x_matmuls = r.median_ms / matmuls if matmuls else None


def _key(r: Result) -> tuple:
    return (
        r.divergence,
        r.tokens,
        r.vocab,
        r.dtype,
        r.device,
        r.temperature,
        r.fused_linear,
        r.hidden,
        r.teacher_hidden,
        r.teacher,
        r.topk,
        r.topk_tail,
        r.mode,
    )


# --- a whole case --------------------------------------------------------------------------


def run_case(
    case: Case,
    chosen: list[Candidate],
    skipped: list[Candidate],
    modes: tuple[str, ...],
    plan: measure.TimingPlan,
    ceilings: Ceilings,
    seed: int,
    progress: Callable[[str], None] = lambda label: None,
    deadline: float | None = None,
) -> list[Result]:
    """All results of one case: skipped candidates first noted, then each pair measured.

    Past ``deadline`` (a time.monotonic() value) the remaining pairs are marked skipped.
    """
    results = [
        _result(case, c, m, "skipped", reason=c.skip)
        for c in skipped
        for m in modes
        if m in c.modes
    ]
    pairs = [(c, m) for m in modes for c in chosen if m in c.modes]
    if deadline is not None and time.monotonic() > deadline:
        for c, m in pairs:
            progress(f"{c.name} {m}")
            results.append(_result(case, c, m, "skipped", reason="time limit reached"))
        return results
    try:
        inputs = cases.make_inputs(case)
        generator = torch.Generator(device=case.device)
        generator.manual_seed(seed)
        period = min(cases.CHECK_PERIOD, case.tokens)
        cases.fill_check_(inputs, generator, period)
        expected = reference(case, inputs, period)
        _free(case.device)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001
        status = _status_of(exc)
        why = f"inputs or reference failed: {type(exc).__name__}: {exc}".splitlines()[0][:300]
        for c, m in pairs:
            progress(f"{c.name} {m}")
            results.append(_result(case, c, m, status, reason=why))
        return results
    for cand, mode in pairs:
        progress(f"{cand.name} {mode}")
        if deadline is not None and time.monotonic() > deadline:
            results.append(_result(case, cand, mode, "skipped", reason="time limit reached"))
            continue
        result = measure_one(case, cand, mode, inputs, expected, plan, seed)
        if result.status == "ok":
            add_floors(result, cases.as_dense(case) if cand.dense_teacher else case, ceilings)
        results.append(result)
    del inputs
    _free(case.device)
    return results
