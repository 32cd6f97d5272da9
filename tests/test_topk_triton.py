"""The Triton top-k row kernels (fastkd/triton/topk_kernels.py) against their float64 oracle
(tests/topk_kernel_oracle.py, the contract of fastkd/_topk_rows.py), and compiled ahead of
time for sm_90 without register spills.

CPU tensors under the interpreter where there is no GPU (tests/conftest.py sets
TRITON_INTERPRET), the GPU otherwise. Tolerances are derived in stats_tolerance and
grad_floor: float32 roundings of each term, never a measured constant.
"""

import json
import math
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton", reason="the triton package is not installed")

import topk_kernel_oracle as oracle  # noqa: E402
from kd_testing import EPS32, ulps_off  # noqa: E402
from test_cuda_resources import parse_ptxas  # noqa: E402

from fastkd.triton import topk_kernels  # noqa: E402

HERE = Path(__file__).resolve().parent
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
IGNORE = -100
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
OPTIONS = [  # (temperature, softcap)
    (1.0, None),
    (0.7, None),
    (1.0, 20.0),
    (2.5, 8.0),
]


def out_ulps(dtype) -> float:
    """A gradient entry is float32 rounded once to its dtype: half an ulp to nearest, but
    the interpreter (triton 3.8) truncates float32 to bfloat16: under one ulp."""
    return 1.0 if INTERPRETED and dtype == torch.bfloat16 else 0.5


def make_case(n, V, K, dtype, seed, *, labels=True, pad=True):
    """Student logits (n, V) of a random scale; ids (n, K) distinct per row, about a quarter
    padded (-1, never the first column); labels with ignored rows (rows 1 and n - 1), whose
    logits are NaN: nothing of an ignored row may reach the outputs. Row 2's label is in
    its support."""
    g = torch.Generator().manual_seed(seed)
    scale = 1.0 + 4.0 * torch.rand((), generator=g).item()
    student = torch.randn(n, V, generator=g, dtype=torch.float64) * scale
    ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(n)])
    if pad and K > 1:
        padded = torch.rand(n, K, generator=g) < 0.25
        padded[:, 0] = False
        padded[0, -1] = True
        ids[padded] = -1
    lab = None
    if labels:
        lab = torch.randint(0, V, (n,), generator=g)
        lab[1] = lab[n - 1] = IGNORE
        lab[2] = ids[2, 0]
        student[lab == IGNORE] = math.nan
    return (
        student.to(dtype).to(DEVICE),
        ids.to(DEVICE),
        None if lab is None else lab.to(DEVICE),
    )


def _finite_abs(v):
    return torch.where(torch.isfinite(v), v.abs(), 0.0)


def _inv_t(temperature):
    # The kernels and the oracle multiply by float32(1 / T).
    return float(torch.tensor(1.0 / temperature, dtype=torch.float32))


# tanh's error: softcap * (1 - 2 / (e^2y + 1)) is a few roundings of numbers near 1, so a
# few eps32 of softcap in absolute terms, however small x is.
CAP_ROUNDINGS = 4


def stats_tolerance(student, ids, *, temperature, softcap, block):
    """(n, 5) float64: how far float32 may put each stat, in absolute terms.

    x carries eps (|x| + 4 softcap) from the soft-cap, a = x * float32(1/T) one more
    rounding: eps (2 |a| + 4 softcap / T). The max m is one of the a: that error. A term
    exp(a_j - m) of a sum: the errors of a_j and m and the subtraction's rounding, 3 (|a_j| +
    |m|) + 8 softcap / T, and its exp's 2: a relative error, the same for every term of a
    sum of positive terms (log_z_a and log_z_out alike: no cancellation). The sum adds one
    rounding per addition on a term's way: log2(BLOCK) in a block's tree, and per block one
    rescale and one addition. log adds |log z| <= log V. Twice that (C = 2: the GPU's exp is
    an exp2 whose argument x log2(e) rounds once more)."""
    x = oracle.capped(student.cpu(), softcap)
    V = x.shape[1]
    cap = CAP_ROUNDINGS * (softcap or 0.0)
    sums = math.log2(block) + 2 * triton.cdiv(V, block) + math.log(V) + 2

    def lse_tolerance(v, scale):
        big = _finite_abs(v).max(-1).values
        m_tol = 2 * big + cap * scale
        z_tol = 6 * big + 2 * cap * scale + sums
        return m_tol, z_tol

    inv_t = _inv_t(temperature)
    m_a_tol, z_a_tol = lse_tolerance(x * inv_t, inv_t)
    m_s_tol, z_s_tol = lse_tolerance(x, 1.0)
    return 2 * EPS32 * torch.stack([m_a_tol, z_a_tol, z_a_tol, m_s_tol, z_s_tol], -1)


def grad_floor(student, ids, student_at_ids, labels, stats, coefs, d, *, temperature,
               softcap):  # fmt: skip
    """(n, V) float64: what float32 cannot resolve in each gradient entry.

    An entry sums c_q q (d at a pair) + c_ce (sm - onehot): each exp carries the absolute
    error of its argument, e.g. (a - m_a) - log_z_a: 3 (|a| + |m|) + |log z|
    + 8 softcap / T eps32 as in stats_tolerance (the stats are the kernel's inputs here,
    exact), 2 for the exp and the products; so eps32 times the terms' magnitudes times that.
    cap' = 1 - (x / softcap)^2 carries about 16 eps32 in absolute terms (x's error, the
    division and the square; near 0 for a saturated logit, so not relative to itself)."""
    inv_t = _inv_t(temperature)
    stats = stats.cpu().double()
    coefs, d = coefs.cpu().double().abs(), d.cpu().double().abs()
    m_a, lz_a, _, m_s, lz_s = (stats[:, k : k + 1] for k in range(5))
    c_q, c_ce = coefs[:, 0:1], coefs[:, 1:2]
    cap = CAP_ROUNDINGS * (softcap or 0.0)
    label = None if labels is None else labels.cpu().unsqueeze(-1)

    def entries(logits, cols, pair_term):
        x = oracle.capped(logits.cpu(), softcap)
        a = x * inv_t

        def term(c, v):
            return torch.where(c != 0, c * torch.nan_to_num(v.exp(), nan=0.0, posinf=0.0), 0.0)

        size = term(c_q, a - m_a - lz_a) if pair_term is None else pair_term
        if label is not None:
            size = size + term(c_ce, x - m_s - lz_s) + c_ce * (cols == label).double()
        arg = (
            3 * (_finite_abs(a) + _finite_abs(x) + m_a.abs() + m_s.abs())
            + lz_a.abs() + lz_s.abs() + 2 * cap * (inv_t + 1) + 2
        )  # fmt: skip
        if softcap is None:
            return EPS32 * size * arg
        dcap = (1 - (x / softcap) ** 2).abs()
        return EPS32 * size * (dcap * arg + 16)

    n, V = student.shape
    floor = entries(student, torch.arange(V).expand(n, V), None)
    live = ids.cpu() >= 0
    pairs = entries(student_at_ids, ids.cpu(), d)
    rows = torch.arange(n).unsqueeze(-1).expand_as(ids)
    floor[rows[live], ids.cpu()[live]] = pairs[live]
    return torch.nan_to_num(floor, nan=0.0)


def check_stats(stats, student, ids, labels, **kw):
    """stats against the oracle within stats_tolerance; exact zeros where the contract says
    0 (ignored rows, the columns of options that are off). Returns the worst error as a
    fraction of its tolerance."""
    assert stats.dtype == torch.float32 and stats.shape == (student.shape[0], 5)
    ref = oracle.row_stats(student, ids, labels, ignore_index=IGNORE, **kw)
    got = stats.cpu().double()
    tol = stats_tolerance(
        student,
        ids,
        temperature=kw["temperature"],
        softcap=kw["softcap"],
        block=topk_kernels._vocab_block(student.shape[1]),
    )
    exact = ref == 0  # ignored rows and unused columns: 0 exactly, also where read as NaN
    if labels is not None:
        exact[labels.cpu() == IGNORE] = True
    assert torch.equal(got[exact], ref[exact]), (got, ref)
    infinite = ~torch.isfinite(ref)
    assert torch.equal(got[infinite].isnan(), ref[infinite].isnan())
    same_inf = ref[infinite].isnan() | (got[infinite] == ref[infinite])
    assert same_inf.all(), (got, ref)
    finite = ~infinite & ~exact
    err = (got - ref).abs()[finite] / tol[finite]
    worst = err.max().item() if err.numel() else 0.0
    assert worst <= 1.0, f"a stat {worst:.2f} of its tolerance off: {got} vs {ref}"
    return worst


def random_grad_inputs(student, ids, labels, kw, seed):
    """(student_at_ids, stats, row_coefs, pair_grads): the oracle's stats rounded to float32
    (the kernel's inputs), random coefficients of either sign, one row with c_ce = 0 and
    one with c_q = 0 (a term with a 0 coefficient is skipped)."""
    g = torch.Generator().manual_seed(seed)
    n, K = ids.shape
    stats = oracle.row_stats(student, ids, labels, ignore_index=IGNORE, **kw).float()
    coefs = torch.randn(n, 2, generator=g)
    coefs[min(2, n - 1), 1] = 0.0
    coefs[min(3, n - 1), 0] = 0.0
    d = torch.randn(n, K, generator=g)
    s_at = torch.gather(student, 1, ids.clamp_min(0))
    return s_at, stats.to(DEVICE), coefs.to(DEVICE), d.to(DEVICE)


def check_grad(grad, student, ids, s_at, labels, stats, coefs, d, *, temperature, softcap,
               dtype):  # fmt: skip
    """grad against the oracle, per entry within grad_floor plus one rounding to dtype;
    ignored rows exactly 0. Returns the worst entry's excess in ulps of dtype."""
    assert grad.dtype == dtype
    kw = dict(temperature=temperature, softcap=softcap)
    ref = oracle.grad_rows(student, ids, s_at, labels, stats, coefs, d, ignore_index=IGNORE, **kw)
    if labels is not None:
        ignored = labels.cpu() == IGNORE
        assert (grad.cpu()[ignored] == 0).all()
    floor = grad_floor(student, ids, s_at, labels, stats, coefs, d, **kw)
    assert torch.isfinite(grad).all()
    worst = ulps_off(grad, ref, floor).max().item()
    assert worst <= out_ulps(dtype), f"a gradient entry {worst:.2f} ulps of {dtype} off"
    return worst


# --- topk_row_stats ---------------------------------------------------------------------

STAT_FLAGS = [  # (tail, ce, labels)
    (False, False, False),
    (True, False, True),
    (False, True, True),
    (True, True, False),
]


@pytest.mark.parametrize("tail,ce,labels", STAT_FLAGS)
@pytest.mark.parametrize("temperature,softcap", OPTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_row_stats_match_the_oracle(dtype, temperature, softcap, tail, ce, labels):
    seed = zlib.crc32(repr((dtype, temperature, softcap, tail, ce, labels)).encode())
    student, ids, lab = make_case(6, 200, 24, dtype, seed, labels=labels)
    kw = dict(temperature=temperature, softcap=softcap, tail=tail, ce=ce)
    stats = topk_kernels.topk_row_stats(student, ids, lab, ignore_index=IGNORE, **kw)
    check_stats(stats, student, ids, lab, **kw)
    if not tail:
        assert (stats[:, 2] == 0).all()
    if not ce:
        assert (stats[:, 3:] == 0).all()


# --- topk_grad_rows ---------------------------------------------------------------------


@pytest.mark.parametrize("labels", [False, True], ids=["no-labels", "labels"])
@pytest.mark.parametrize("temperature,softcap", OPTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grad_rows_match_the_oracle(dtype, temperature, softcap, labels):
    seed = zlib.crc32(repr(("grad", dtype, temperature, softcap, labels)).encode())
    student, ids, lab = make_case(6, 200, 24, dtype, seed, labels=labels)
    kw = dict(temperature=temperature, softcap=softcap, tail=True, ce=labels)
    s_at, stats, coefs, d = random_grad_inputs(student, ids, lab, kw, seed)
    grad = torch.full_like(student, math.nan)  # every entry must be written
    opts = dict(temperature=temperature, softcap=softcap)
    topk_kernels.topk_grad_rows(
        student, ids, s_at, lab, stats, coefs, d, grad, ignore_index=IGNORE, **opts
    )
    check_grad(grad, student, ids, s_at, lab, stats, coefs, d, dtype=dtype, **opts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_in_place_gradient_over_the_student(dtype):
    """grad is the student: the dense pass reads each block before writing it, the pairs
    take their logits from student_at_ids. Stats from the kernel: the two kernels chained."""
    student, ids, lab = make_case(5, 150, 20, dtype, seed=11)
    kw = dict(temperature=0.7, softcap=20.0)
    stats = topk_kernels.topk_row_stats(
        student, ids, lab, tail=True, ce=True, ignore_index=IGNORE, **kw
    )
    check_stats(stats, student, ids, lab, tail=True, ce=True, **kw)
    s_at, _, coefs, d = random_grad_inputs(student, ids, lab, dict(kw, tail=True, ce=True), 12)
    original = student.clone()
    topk_kernels.topk_grad_rows(
        student, ids, s_at, lab, stats, coefs, d, student, ignore_index=IGNORE, **kw
    )
    check_grad(student, original, ids, s_at, lab, stats, coefs, d, dtype=dtype, **kw)


# --- rows over several blocks, and the support's edge cases ----------------------------


def test_rows_over_several_blocks(monkeypatch):
    """BLOCK 32 and pairs written 16 at a time, so that V = 300 spans 10 blocks (the last
    one partial), a block holds many chunks of KB = 4 ids (a whole block of them; 7 in
    another: a chunk and a remainder) and K = 48 > 16 pairs."""
    monkeypatch.setattr(topk_kernels, "_vocab_block", lambda V: 32)
    monkeypatch.setattr(topk_kernels, "_pair_block", lambda K: 16)
    n, V, K = 5, 300, 48
    student, ids, lab = make_case(n, V, K, torch.float32, seed=21)
    ids[0] = torch.cat([torch.arange(64, 96), torch.arange(290, 297), torch.full((9,), -1)])
    ids[3] = torch.cat([torch.arange(268, 300), torch.arange(0, 16)]).flip(0)  # unsorted
    kw = dict(temperature=0.7, softcap=20.0)
    stats = topk_kernels.topk_row_stats(
        student, ids, lab, tail=True, ce=True, ignore_index=IGNORE, **kw
    )
    check_stats(stats, student, ids, lab, tail=True, ce=True, **kw)
    s_at, stats, coefs, d = random_grad_inputs(student, ids, lab, dict(kw, tail=True, ce=True), 22)
    grad = torch.full_like(student, math.nan)
    topk_kernels.topk_grad_rows(
        student, ids, s_at, lab, stats, coefs, d, grad, ignore_index=IGNORE, **kw
    )
    check_grad(grad, student, ids, s_at, lab, stats, coefs, d, dtype=torch.float32, **kw)


@pytest.mark.parametrize("K", [1, 64], ids=["K=1", "K=V"])
def test_k_of_one_and_of_the_whole_vocabulary(K):
    """K = V leaves nothing outside the support: log_z_out = -inf, and every dense entry
    is written over by a pair; K = 1 the most outside."""
    V = 64
    student, ids, lab = make_case(4, V, K, torch.float32, seed=31 + K, pad=False)
    kw = dict(temperature=1.0, softcap=None)
    stats = topk_kernels.topk_row_stats(
        student, ids, lab, tail=True, ce=True, ignore_index=IGNORE, **kw
    )
    check_stats(stats, student, ids, lab, tail=True, ce=True, **kw)
    kept = lab.cpu() != IGNORE
    if K == V:
        assert (stats[kept, 2] == -math.inf).all()
    s_at, stats, coefs, d = random_grad_inputs(student, ids, lab, dict(kw, tail=True, ce=True), 32)
    grad = torch.full_like(student, math.nan)
    topk_kernels.topk_grad_rows(
        student, ids, s_at, lab, stats, coefs, d, grad, ignore_index=IGNORE, **kw
    )
    check_grad(grad, student, ids, s_at, lab, stats, coefs, d, dtype=torch.float32, **kw)


def test_minus_inf_outside_the_support():
    """Row 0 is -inf except on its support: no mass outside (log_z_out = -inf), a finite
    gradient (q_j = 0 there). Row 2 is -inf everywhere: log_z_a = -inf, m_a = 0."""
    student, ids, lab = make_case(5, 100, 10, torch.float32, seed=41)
    outside = ~oracle.support_mask(ids, 100).to(DEVICE)
    student[0][outside[0]] = -math.inf
    student[2] = -math.inf
    kw = dict(temperature=0.7, softcap=None)
    stats = topk_kernels.topk_row_stats(
        student, ids, lab, tail=True, ce=True, ignore_index=IGNORE, **kw
    )
    check_stats(stats, student, ids, lab, tail=True, ce=True, **kw)
    assert stats[0, 2] == -math.inf and torch.isfinite(stats[0, :2]).all()
    assert stats[2, 0] == 0 and stats[2, 1] == -math.inf
    rows = [0, 3]  # the -inf row has no distribution, its gradient is NaN by the formula
    student, ids, lab = student[rows], ids[rows], lab[rows]
    s_at, stats, coefs, d = random_grad_inputs(student, ids, lab, dict(kw, tail=True, ce=True), 42)
    grad = torch.full_like(student, math.nan)
    topk_kernels.topk_grad_rows(
        student, ids, s_at, lab, stats, coefs, d, grad, ignore_index=IGNORE, **kw
    )
    check_grad(grad, student, ids, s_at, lab, stats, coefs, d, dtype=torch.float32, **kw)


@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
def test_a_nan_or_inf_logit_spoils_its_row_only(bad):
    """Rows 2 and 3 hold a bad logit: log_z_a and log_z_s are NaN. Row 2's gradient is NaN
    outside its support; row 3's c_q and c_ce are 0, so its dense entries are exactly 0 (the
    terms are skipped, not 0 * NaN) and its pairs d_i. The other rows are untouched."""
    n, V, K = 6, 100, 10
    student, ids, lab = make_case(n, V, K, torch.float32, seed=51)
    student[2, 7] = student[3, 7] = bad
    kw = dict(temperature=1.0, softcap=None)
    stats = topk_kernels.topk_row_stats(
        student, ids, lab, tail=True, ce=True, ignore_index=IGNORE, **kw
    )
    assert stats[[2, 3], 1].isnan().all() and stats[[2, 3], 4].isnan().all()
    good = [0, 1, 4, 5]  # 1 and 5 are ignored
    check_stats(stats[good], student[good], ids[good], lab[good], tail=True, ce=True, **kw)
    s_at, _, coefs, d = random_grad_inputs(student, ids, lab, dict(kw, tail=True, ce=True), 52)
    coefs[2] = torch.tensor([0.7, -0.4])
    coefs[3] = 0.0
    grad = torch.empty_like(student)
    topk_kernels.topk_grad_rows(
        student, ids, s_at, lab, stats, coefs, d, grad, ignore_index=IGNORE, **kw
    )
    assert grad[2].isnan().all()
    rows = [0, 1, 3, 4, 5]
    check_grad(grad[rows], student[rows], ids[rows], s_at[rows], lab[rows], stats[rows],
               coefs[rows], d[rows], dtype=torch.float32, **kw)  # fmt: skip


def test_tail_holding_one_billionth_of_the_mass():
    """The support holds all but ~1e-9 of the student's mass: z_a - sum_S is 0 in float32
    (the tail would be -inf), the sum outside keeps float32's relative accuracy."""
    g = torch.Generator().manual_seed(61)
    n, V, K = 3, 256, 16
    student = torch.randn(n, V, generator=g, dtype=torch.float64) * 0.5 - 24.0
    ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(n)])
    student.scatter_(1, ids, torch.randn(n, K, generator=g, dtype=torch.float64))
    student, ids = student.float().to(DEVICE), ids.to(DEVICE)
    kw = dict(temperature=1.0, softcap=None)
    stats = topk_kernels.topk_row_stats(
        student, ids, None, tail=True, ce=False, ignore_index=IGNORE, **kw
    )
    ref = oracle.row_stats(student, ids, None, tail=True, ce=False, ignore_index=IGNORE, **kw)
    mass_out = (ref[:, 2] - ref[:, 1]).exp()
    assert (mass_out < 1e-8).all() and (mass_out > 1e-10).all(), mass_out
    assert (1.0 - mass_out).float().eq(1.0).all()  # 1 - sum_S q would be 0 in float32
    check_stats(stats, student, ids, None, tail=True, ce=False, **kw)
    s_at, stats, coefs, d = random_grad_inputs(
        student, ids, None, dict(kw, tail=True, ce=False), 62
    )
    coefs[:, 0] = 1e9  # c_q is about the tail's g, 1 / q_tail (fastkd/_topk_rows.py)
    grad = torch.empty_like(student)
    topk_kernels.topk_grad_rows(
        student, ids, s_at, None, stats, coefs, d, grad, ignore_index=IGNORE, **kw
    )
    check_grad(grad, student, ids, s_at, None, stats, coefs, d, dtype=torch.float32, **kw)
    outside = ~oracle.support_mask(ids, V)
    assert (grad.cpu()[outside] > 0).all()  # c_q q_j, q_j ~ 1e-12: not lost to underflow


def test_an_all_ignored_batch_writes_zeros():
    student, ids, lab = make_case(3, 80, 8, torch.float16, seed=71)
    lab.fill_(IGNORE)
    kw = dict(temperature=0.7, softcap=20.0)
    stats = topk_kernels.topk_row_stats(
        student, ids, lab, tail=True, ce=True, ignore_index=IGNORE, **kw
    )
    assert (stats == 0).all()
    s_at = torch.gather(student, 1, ids.clamp_min(0))
    coefs = torch.ones(3, 2, device=DEVICE)
    d = torch.ones(3, 8, device=DEVICE)
    grad = torch.full_like(student, math.nan)
    topk_kernels.topk_grad_rows(
        student, ids, s_at, lab, stats, coefs, d, grad, ignore_index=IGNORE, **kw
    )
    assert (grad == 0).all()


# --- compiled for sm_90: no spills ------------------------------------------------------

# Run in a fresh interpreter without TRITON_INTERPRET and with an empty cache, so that
# Triton runs ptxas and prints its -v log (tests/test_cuda_resources.py says why the log).
AOT_SCRIPT = r"""
import contextlib, io, json
import triton_aot
from fastkd.triton import topk_kernels as tk

def stats_args(s):
    return {"s_ptr": s, "s_row_stride": "i64", "labels_ptr": "*i64",
            "sorted_ids_ptr": "*i32", "sorted_ids_row_stride": "i64",
            "block_ranges_ptr": "*i32", "block_ranges_row_stride": "i64",
            "stats_ptr": "*fp32", "V": "i32", "inv_t": "fp32", "softcap": "fp32",
            "ignore_index": "i32"}

def grad_args(s):
    return {"s_ptr": s, "s_row_stride": "i64", "ids_ptr": "*i64", "s_at_ids_ptr": s,
            "labels_ptr": "*i64", "stats_ptr": "*fp32", "row_coefs_ptr": "*fp32",
            "pair_grads_ptr": "*fp32", "grad_ptr": s, "grad_row_stride": "i64", "V": "i32",
            "K": "i32", "inv_t": "fp32", "softcap": "fp32", "ignore_index": "i32"}

block = tk._vocab_block(1 << 20)
for s in ("*bf16", "*fp32"):
    for full in (True, False):
        variants = [
            ("topk_row_stats_kernel", stats_args(s),
             dict(HAS_LABELS=full, SOFTCAP=full, TAIL=full, CE=full, BLOCK=block,
                  KB=tk._support_chunk())),
            ("topk_grad_rows_kernel", grad_args(s),
             dict(HAS_LABELS=full, SOFTCAP=full, BLOCK=block, PAIR_BLOCK=tk._pair_block(1 << 20))),
        ]
        for name, args, constexprs in variants:
            log = io.StringIO()
            with contextlib.redirect_stdout(log):
                size = triton_aot.compile_kernel(getattr(tk, name), constexprs, 90,
                                                 tk._num_warps(block), arg_types=args)
            print(json.dumps({"kernel": name, "dtype": s, "full": full, "cubin_bytes": size,
                              "log": log.getvalue()}))
"""


def test_kernels_compile_for_sm90_without_spills(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(HERE.parent), env.get("PYTHONPATH", "")])
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton_cache")
    env["TRITON_DUMP_PTXAS_LOG"] = "1"
    proc = subprocess.run(
        [sys.executable, "-c", AOT_SCRIPT], capture_output=True, text=True, env=env,
        timeout=600, cwd=str(HERE),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(results) == 8, proc.stdout[-3000:]
    for r in results:
        assert r["cubin_bytes"] > 0
        kernels = parse_ptxas(r["log"])
        assert list(kernels) == [r["kernel"]], r["log"][-2000:]
        regs, spill_st, spill_ld = kernels[r["kernel"]]
        print(f"sm_90 {r['kernel']} {r['dtype']} full={r['full']}: {regs} registers, "
              f"spills {spill_st}/{spill_ld} B")  # fmt: skip
        assert spill_st == 0 and spill_ld == 0, r["kernel"]
        # 64 registers or fewer: two 512-thread programs (BLOCK 4096, 16 warps) fit an SM.
        assert regs <= 64, (r["kernel"], r["dtype"], regs)
