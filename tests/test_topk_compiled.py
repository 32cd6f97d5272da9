"""The compiled top-k row functions (csrc/kd_topk_cpu.cpp, csrc/kd_topk_cuda.cu through
fastkd._compiled_rows) against their float64 oracle, tests/topk_kernel_oracle.py; the contract
is fastkd/_topk_rows.py's docstring (design.md §4).

Tolerances, from float32's unit roundoff EPS32 = 2^-24 (half its machine epsilon):
- m_a, m_s: the max of the rounded a = x * float32(1/T) (one rounding of |m|), the soft-cap
  rounded before it (the multiply by 1/c, tanh's ulp, the multiply by c: 4 more).
- log_z_a, log_z_out, log_z_s: log of a float32 sum of exps. Each term is off by its exp (1 ulp)
  and by its argument's rounding (a and the soft-cap: under 4 roundings of |a|, and the
  subtraction of the max: one of |a - m|); the sum's roundings random-walk, about sqrt(V) of
  them at most; the log adds one. In absolute terms, per row:
      EPS32 * (LSE_ROUNDINGS + 4 max|a| + max|a - m| + sqrt(V)).
- the gradient, per row: its terms are bounded by scale = |c_q| + 2 |c_ce| + max|d| (q, the
  softmax, the one-hot and cap' lie in [0, 1]); each is off by the roundings of its exp's
  argument (as above, with x beside a for CE), the exp, and a few products, then the result
  by one rounding to the output dtype (half an ulp of it):
      scale * (eps(out) / 2 + EPS32 * (GRAD_ROUNDINGS + 6 max(|a|, |x|))).
"""

from __future__ import annotations

import math
import zlib

import pytest
import topk_kernel_oracle as oracle
import torch
from kd_testing import make_logits

from fastkd import _compiled_rows, _extension

EPS32 = 2.0**-24
LSE_ROUNDINGS = 8
GRAD_ROUNDINGS = 8
IGNORE = -100
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _device_params():
    cpu_ok, cpu_why = _extension.cpu_available()
    cuda_ok, cuda_why = _extension.cuda_available()
    if cuda_ok and not torch.cuda.is_available():
        cuda_ok, cuda_why = False, "no CUDA device on this machine"
    return [
        pytest.param("cpu", marks=[] if cpu_ok else [pytest.mark.skip(reason=cpu_why)]),
        pytest.param("cuda", marks=[] if cuda_ok else [pytest.mark.skip(reason=cuda_why)]),
    ]


DEVICES = _device_params()


def seed_of(*case) -> int:
    """A seed per test case, the same in every process (hash() of a str is not)."""
    return zlib.crc32(repr(case).encode())


def _half_eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


# --- inputs -----------------------------------------------------------------------------------


def make_ids(n: int, V: int, K: int, gen, *, pad: bool = True) -> torch.Tensor:
    """(n, K) distinct ids per row; with ``pad``, some pairs are -1: a row's last ones, one in
    the middle of another row, and a row with none at all."""
    ids = torch.stack([torch.randperm(V, generator=gen)[:K] for _ in range(n)])
    if pad and n >= 3 and K >= 2:
        ids[0, K // 2 :] = -1
        ids[1, K // 2] = -1
        ids[2, :] = -1
    return ids


def make_labels(n: int, V: int, ids: torch.Tensor, gen) -> torch.Tensor:
    """Labels with ignored rows (the first, and about a third), some inside S, some outside."""
    labels = torch.randint(0, V, (n,), generator=gen)
    for row in range(n):
        live = ids[row][ids[row] >= 0]
        if row % 2 == 1 and live.numel():
            labels[row] = live[int(torch.randint(0, live.numel(), (), generator=gen))]
    labels[torch.rand(n, generator=gen) < 0.3] = IGNORE
    labels[0] = IGNORE
    return labels


def make_coefs(n: int, K: int, gen, zero: str | None = None):
    """row_coefs (n, 2) = (c_q, c_ce) and pair_grads (n, K): random, never 0 unless ``zero``
    names a coefficient that is exactly 0 on every row."""
    coefs = torch.rand(n, 2, generator=gen) + 0.25
    coefs *= torch.where(torch.rand(n, 2, generator=gen) < 0.5, -1.0, 1.0)
    if zero is not None:
        coefs[:, {"c_q": 0, "c_ce": 1}[zero]] = 0.0
    return coefs, torch.randn(n, K, generator=gen)


def scaled(student, softcap, temperature):
    x = oracle.capped(student.cpu(), softcap)
    return x, x * float(torch.tensor(1.0 / temperature, dtype=torch.float32))


# --- comparisons ------------------------------------------------------------------------------


def assert_stats_close(stats, ref, student, *, softcap, temperature):
    """stats (n, 5) against the oracle's, within the tolerances of the module docstring; inf
    and NaN where the oracle has them."""
    stats, ref = stats.double().cpu(), ref.double()
    x, a = scaled(student, softcap, temperature)

    def finite_max(t):
        t = torch.where(torch.isfinite(t), t.abs(), 0.0)
        return t.amax(1)

    max_a = torch.maximum(finite_max(a), finite_max(x))
    spread = finite_max(torch.cat([a - ref[:, :1], x - ref[:, 3:4]], 1))
    lse_tol = EPS32 * (LSE_ROUNDINGS + 4 * max_a + spread + math.sqrt(student.shape[1]))
    max_roundings = 1 + (4 if softcap is not None else 0)
    max_tol = max_roundings * EPS32 * torch.stack([ref[:, 0], ref[:, 3]], 1).abs()
    tol = torch.stack([max_tol[:, 0], lse_tol, lse_tol, max_tol[:, 1], lse_tol], 1)
    same_nonfinite = (stats.isnan() == ref.isnan()).all() and torch.equal(
        stats.isinf(), ref.isinf()
    )
    assert same_nonfinite, (stats, ref)
    assert torch.equal(stats[ref.isinf()], ref[ref.isinf()]), (stats, ref)
    err = torch.where(torch.isfinite(ref), (stats - ref).abs(), 0.0)
    worst = torch.where(err > 0, err / tol, 0.0).max().item()
    print(f"stats: worst {worst:.3f} of the tolerance")
    assert worst <= 1.0, f"stats {worst:.2f}x the tolerance: err {err.max():.2e}"
    return worst


def assert_grad_close(grad, ref, student, coefs, d, *, softcap, temperature):
    """grad (n, V) against the oracle's, per row within the module docstring's tolerance;
    NaN exactly where the oracle has it."""
    grad64, ref = grad.double().cpu(), ref.double()
    assert torch.equal(grad64.isnan(), ref.isnan()), "NaN where the oracle has none, or not"
    x, a = scaled(student, softcap, temperature)
    big = torch.where(torch.isfinite(x), torch.maximum(x.abs(), a.abs()), 0.0).amax(1)
    scale = coefs[:, 0].abs() + 2 * coefs[:, 1].abs()
    scale = scale.double() + (d.abs().amax(1).double() if d.numel() else 0.0)
    tol = scale * (_half_eps(grad.dtype) + EPS32 * (GRAD_ROUNDINGS + 6 * big))
    err = torch.where(ref.isnan(), 0.0, (grad64 - ref).abs()).amax(1)
    worst = torch.where(err > 0, err / tol, 0.0).max().item()
    print(f"gradient: worst {worst:.3f} of the tolerance")
    assert worst <= 1.0, f"gradient {worst:.2f}x the tolerance: err {err.max():.2e}"
    return worst


def run_stats(student, ids, labels, **kw):
    out = _compiled_rows.topk_row_stats(student, ids, labels, **kw)
    assert out.dtype == torch.float32 and out.shape == (student.shape[0], 5)
    return out, oracle.row_stats(student, ids, labels, **kw)


def run_grad(student, ids, labels, stats, coefs, d, *, grad=None, **kw):
    """The kernel's gradient (into grad, or a fresh tensor) and the oracle's."""
    student_at_ids = student.gather(1, ids.clamp(min=0))
    ref = oracle.grad_rows(student, ids, student_at_ids, labels, stats, coefs, d, **kw)
    if grad is None:
        grad = torch.full_like(student, float("nan"))  # every entry must be written
    dev = student.device
    _compiled_rows.topk_grad_rows(
        student, ids, student_at_ids, labels, stats.to(dev), coefs.to(dev), d.to(dev), grad,
        **kw,
    )  # fmt: skip
    assert grad.dtype == student.dtype
    return grad, ref


# --- the stats --------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.5])
@pytest.mark.parametrize("tail,ce", [(True, True), (False, False), (True, False), (False, True)])
def test_row_stats(device, dtype, softcap, temperature, tail, ce):
    """V = 2053: two chunks of the CPU kernel and a short last vector."""
    gen = torch.Generator().manual_seed(seed_of(dtype, softcap, temperature, tail, ce))
    n, V, K = 7, 2053, 17
    student = make_logits((n, V), dtype, device, gen)
    ids = make_ids(n, V, K, gen).to(device)
    labels = make_labels(n, V, ids.cpu(), gen).to(device)
    kw = dict(temperature=temperature, softcap=softcap, tail=tail, ce=ce, ignore_index=IGNORE)
    stats, ref = run_stats(student, ids, labels, **kw)
    assert_stats_close(stats, ref, student, softcap=softcap, temperature=temperature)
    ignored = (labels == IGNORE).cpu()
    assert torch.equal(stats.cpu()[ignored], torch.zeros(int(ignored.sum()), 5))
    # Columns not asked for are 0; with T == 1 the CE columns are a's, bit for bit.
    if not tail:
        assert torch.equal(stats[:, 2].cpu(), torch.zeros(n))
    if not ce:
        assert torch.equal(stats[:, 3:].cpu(), torch.zeros(n, 2))
    elif temperature == 1.0:
        assert torch.equal(stats[:, 3:], stats[:, :2])


@pytest.mark.parametrize("device", DEVICES)
def test_row_stats_without_labels(device):
    gen = torch.Generator().manual_seed(3)
    student = make_logits((5, 300), torch.float32, device, gen)
    ids = make_ids(5, 300, 9, gen).to(device)
    kw = dict(temperature=1.5, softcap=None, tail=True, ce=True, ignore_index=IGNORE)
    stats, ref = run_stats(student, ids, None, **kw)
    assert_stats_close(stats, ref, student, softcap=None, temperature=1.5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("K", [1, 64])
def test_row_stats_v_equals_k(device, K):
    """K = V: nothing outside S, log_z_out = -inf exactly; K = 1 on a V = 1 row too."""
    gen = torch.Generator().manual_seed(4 + K)
    student = make_logits((4, K), torch.float32, device, gen)
    ids = torch.stack([torch.randperm(K, generator=gen) for _ in range(4)]).to(device)
    kw = dict(temperature=2.0, softcap=None, tail=True, ce=True, ignore_index=IGNORE)
    stats, ref = run_stats(student, ids, None, **kw)
    assert torch.equal(stats[:, 2].cpu(), torch.full((4,), -math.inf))
    assert_stats_close(stats, ref, student, softcap=None, temperature=2.0)


@pytest.mark.parametrize("device", DEVICES)
def test_row_stats_k_equals_1(device):
    gen = torch.Generator().manual_seed(5)
    student = make_logits((6, 1000), torch.bfloat16, device, gen)
    ids = make_ids(6, 1000, 1, gen, pad=False).to(device)
    kw = dict(temperature=0.8, softcap=None, tail=True, ce=True, ignore_index=IGNORE)
    stats, ref = run_stats(student, ids, None, **kw)
    assert_stats_close(stats, ref, student, softcap=None, temperature=0.8)


@pytest.mark.parametrize("device", DEVICES)
def test_row_stats_tail_of_1e9(device):
    """S holds all but 1e-9 of the student's mass: log_z_out is summed over the entries
    outside S, so it keeps float32's relative accuracy (log z_a - log(z_a - z_S) in float32
    has none left: 1 - (1 - 1e-9) rounds to 0 or to 6e-8)."""
    gen = torch.Generator().manual_seed(6)
    n, V, K = 3, 4099, 20
    student = torch.randn(n, V, generator=gen, dtype=torch.float64)
    ids = make_ids(n, V, K, gen, pad=False)
    inside = oracle.support_mask(ids, V)
    # Outside S: mass 1e-9 relative to S, spread over the V - K entries.
    lse_s = torch.logsumexp(torch.where(inside, student, -math.inf), 1, keepdim=True)
    outside = student * 0.1 + (lse_s + math.log(1e-9) - math.log(V - K))
    student = torch.where(inside, student, outside).float().to(device)
    kw = dict(temperature=1.0, softcap=None, tail=True, ce=False, ignore_index=IGNORE)
    stats, ref = run_stats(student, ids.to(device), None, **kw)
    assert_stats_close(stats, ref, student, softcap=None, temperature=1.0)
    tail_mass = torch.exp(ref[:, 2] - ref[:, 1])
    assert ((tail_mass > 0.5e-9) & (tail_mass < 2e-9)).all(), tail_mass
    # float32 relative accuracy of z_out itself: a few roundings, not the 1e-6 of the rest.
    z_err = (stats[:, 2].double().cpu() - ref[:, 2]).abs()
    assert (z_err <= 16 * EPS32 * (1 + ref[:, 0].abs())).all(), z_err


@pytest.mark.parametrize("device", DEVICES)
def test_row_stats_masked_and_nan_rows(device):
    """A row of -inf except its support (log_z_out = -inf), a row of -inf only (log_z_a =
    -inf, m_a = 0), a NaN outside S and a NaN inside S (log_z_a NaN), a +inf (NaN); the
    other rows untouched."""
    gen = torch.Generator().manual_seed(7)
    n, V, K = 6, 513, 8
    student = make_logits((n, V), torch.float32, "cpu", gen)
    ids = make_ids(n, V, K, gen, pad=False)
    inside = oracle.support_mask(ids, V)
    student[0] = torch.where(inside[0], student[0], -math.inf)
    student[1] = -math.inf
    student[2, int(torch.nonzero(~inside[2])[0])] = math.nan
    student[3, int(ids[3, 2])] = math.nan
    student[4, int(torch.nonzero(~inside[4])[-1])] = math.inf
    student, ids = student.to(device), ids.to(device)
    kw = dict(temperature=1.3, softcap=None, tail=True, ce=True, ignore_index=IGNORE)
    stats = _compiled_rows.topk_row_stats(student, ids, None, **kw).cpu()
    ref = oracle.row_stats(student, ids, None, **kw)
    assert stats[0, 2] == -math.inf and math.isfinite(stats[0, 1])
    assert stats[1, 0] == 0 and stats[1, 1] == -math.inf and stats[1, 2] == -math.inf
    assert stats[2:5, 1].isnan().all() and stats[2:5, 4].isnan().all()
    assert stats[2, 2].isnan() and stats[4, 2].isnan()
    keep = [0, 1, 5]
    assert_stats_close(stats[keep], ref[keep], student[keep], softcap=None, temperature=1.3)


# --- the gradient -----------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.5])
@pytest.mark.parametrize("zero", [None, "c_q", "c_ce"])
def test_grad_rows(device, dtype, softcap, temperature, zero):
    """Labels with ignored rows (the gradient 0), some inside S; padding pairs; every
    coefficient, and each one exactly 0 in turn. The stats are the oracle's, so that only the
    gradient is measured."""
    gen = torch.Generator().manual_seed(seed_of(dtype, softcap, temperature, zero))
    n, V, K = 7, 2053, 17
    student = make_logits((n, V), dtype, device, gen)
    ids = make_ids(n, V, K, gen).to(device)
    labels = make_labels(n, V, ids.cpu(), gen).to(device)
    kw = dict(temperature=temperature, softcap=softcap, ignore_index=IGNORE)
    stats = oracle.row_stats(student, ids, labels, tail=True, ce=True, **kw).float()
    coefs, d = make_coefs(n, K, gen, zero)
    grad, ref = run_grad(student, ids, labels, stats, coefs, d, **kw)
    assert_grad_close(grad, ref, student, coefs, d, softcap=softcap, temperature=temperature)
    ignored = (labels == IGNORE).cpu()
    assert torch.equal(grad.cpu()[ignored], torch.zeros(int(ignored.sum()), V, dtype=dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_grad_rows_without_labels(device, temperature):
    """Without labels the CE term is off, whatever c_ce says."""
    gen = torch.Generator().manual_seed(8)
    n, V, K = 5, 777, 12
    student = make_logits((n, V), torch.float32, device, gen)
    ids = make_ids(n, V, K, gen).to(device)
    kw = dict(temperature=temperature, softcap=5.0, ignore_index=IGNORE)
    stats = oracle.row_stats(student, ids, None, tail=True, ce=False, **kw).float()
    coefs, d = make_coefs(n, K, gen)
    grad, ref = run_grad(student, ids, None, stats, coefs, d, **kw)
    assert_grad_close(grad, ref, student, coefs, d, softcap=5.0, temperature=temperature)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_grad_rows_k_equals_v(device, dtype):
    """K = V: every entry is a pair's, written after the dense pass."""
    gen = torch.Generator().manual_seed(9)
    n, V = 4, 300
    student = make_logits((n, V), dtype, device, gen)
    ids = torch.stack([torch.randperm(V, generator=gen) for _ in range(n)]).to(device)
    labels = torch.randint(0, V, (n,), generator=gen).to(device)
    kw = dict(temperature=1.0, softcap=None, ignore_index=IGNORE)
    stats = oracle.row_stats(student, ids, labels, tail=True, ce=True, **kw).float()
    assert (stats[:, 2] == -math.inf).all()
    coefs, d = make_coefs(n, V, gen)
    grad, ref = run_grad(student, ids, labels, stats, coefs, d, **kw)
    assert torch.isfinite(grad).all()
    assert_grad_close(grad, ref, student, coefs, d, softcap=None, temperature=1.0)


@pytest.mark.parametrize("device", DEVICES)
def test_grad_rows_k_equals_1(device):
    gen = torch.Generator().manual_seed(10)
    n, V = 5, 1000
    student = make_logits((n, V), torch.float16, device, gen)
    ids = make_ids(n, V, 1, gen, pad=False).to(device)
    labels = make_labels(n, V, ids.cpu(), gen).to(device)
    kw = dict(temperature=0.5, softcap=None, ignore_index=IGNORE)
    stats = oracle.row_stats(student, ids, labels, tail=True, ce=True, **kw).float()
    coefs, d = make_coefs(n, 1, gen)
    grad, ref = run_grad(student, ids, labels, stats, coefs, d, **kw)
    assert_grad_close(grad, ref, student, coefs, d, softcap=None, temperature=0.5)


@pytest.mark.parametrize("device", DEVICES)
def test_grad_rows_masked_rows_skip_zero_coefficients(device):
    """Rows of -inf only: q and the softmax are exp(-inf - (-inf)) = NaN, so a coefficient of
    exactly 0 must skip its term, not multiply it (row 0: c_q = c_ce = 0, the dense entries 0
    and the pairs d); with both non-zero, row 1 is NaN throughout, as the oracle's. Row 2 is
    -inf except its support: finite everywhere."""
    gen = torch.Generator().manual_seed(11)
    n, V, K = 3, 400, 10
    student = make_logits((n, V), torch.float32, "cpu", gen)
    ids = make_ids(n, V, K, gen, pad=False)
    student[:2] = -math.inf
    student[2] = torch.where(oracle.support_mask(ids, V)[2], student[2], -math.inf)
    student, ids = student.to(device), ids.to(device)
    labels = torch.tensor([5, 6, int(ids[2, 0])], device=device)
    kw = dict(temperature=1.0, softcap=None, ignore_index=IGNORE)
    stats = _compiled_rows.topk_row_stats(student, ids, labels, tail=True, ce=True, **kw).cpu()
    assert (stats[:2, 1] == -math.inf).all() and stats[2, 2] == -math.inf
    coefs, d = make_coefs(n, K, gen)
    coefs[0] = 0.0
    grad, ref = run_grad(student, ids, labels, stats, coefs, d, **kw)
    assert torch.isfinite(grad[0]).all() and torch.isfinite(grad[2]).all()
    assert grad[1].isnan().all()
    assert_grad_close(grad, ref, student, coefs, d, softcap=None, temperature=1.0)


@pytest.mark.parametrize("device", DEVICES)
def test_grad_rows_nan_row(device):
    """A NaN logit makes the row's log_z_a NaN (topk_row_stats), and with it every dense
    entry of its gradient; the pairs are d (the O(K) side's, NaN there too in the loss's own
    use); the other rows are untouched."""
    gen = torch.Generator().manual_seed(12)
    n, V, K = 3, 600, 6
    student = make_logits((n, V), torch.float32, device, gen)
    student[1, 123] = math.nan
    ids = make_ids(n, V, K, gen, pad=False).to(device)
    kw = dict(temperature=1.0, softcap=None, ignore_index=IGNORE)
    stats = _compiled_rows.topk_row_stats(student, ids, None, tail=True, ce=False, **kw)
    assert stats[1, 1].isnan()
    coefs, d = make_coefs(n, K, gen)
    grad, ref = run_grad(student, ids, None, stats.cpu(), coefs, d, **kw)
    pairs = oracle.support_mask(ids, V)[1]
    assert grad[1].cpu()[~pairs].isnan().all()
    assert torch.equal(grad[1].cpu()[ids[1].cpu()], d[1])
    assert_grad_close(grad, ref, student, coefs, d, softcap=None, temperature=1.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_grad_rows_in_place(device, dtype, softcap):
    """grad is the student itself: every entry is read before it is written, the pairs come
    from student_at_ids (gathered before), the label's logit is read before the dense pass."""
    gen = torch.Generator().manual_seed(13)
    n, V, K = 6, 2053, 17
    student = make_logits((n, V), dtype, device, gen)
    ids = make_ids(n, V, K, gen).to(device)
    labels = make_labels(n, V, ids.cpu(), gen).to(device)
    kw = dict(temperature=2.0, softcap=softcap, ignore_index=IGNORE)
    stats = oracle.row_stats(student, ids, labels, tail=True, ce=True, **kw).float()
    coefs, d = make_coefs(n, K, gen)
    original = student.clone()
    grad, ref = run_grad(student, ids, labels, stats, coefs, d, grad=student, **kw)
    assert grad is student
    assert_grad_close(student, ref, original, coefs, d, softcap=softcap, temperature=2.0)


@pytest.mark.parametrize("device", DEVICES)
def test_grad_rows_tail_of_1e9(device):
    """The student leaves 1e-9 of its mass outside S, where c_q is then large (1e6 on the
    O(K) side's rows): the entries outside S, c_q q_j with q_j ~ 1e-12, keep float32's
    relative accuracy."""
    gen = torch.Generator().manual_seed(14)
    n, V, K = 3, 1025, 20
    student = torch.randn(n, V, generator=gen, dtype=torch.float64)
    ids = make_ids(n, V, K, gen, pad=False)
    inside = oracle.support_mask(ids, V)
    lse_s = torch.logsumexp(torch.where(inside, student, -math.inf), 1, keepdim=True)
    outside = student * 0.1 + (lse_s + math.log(1e-9) - math.log(V - K))
    student = torch.where(inside, student, outside).float().to(device)
    ids = ids.to(device)
    kw = dict(temperature=1.0, softcap=None, ignore_index=IGNORE)
    stats = oracle.row_stats(student, ids, None, tail=True, ce=False, **kw).float()
    coefs, d = make_coefs(n, K, gen)
    coefs[:, 0] *= 1e6
    grad, ref = run_grad(student, ids, None, stats, coefs, d, **kw)
    assert_grad_close(grad, ref, student, coefs, d, softcap=None, temperature=1.0)
    # Outside S the entries are c_q q_j ~ 1e-6: each to float32 accuracy.
    out = ~oracle.support_mask(ids.cpu(), V)
    rel = ((grad.double().cpu() - ref).abs() / ref.abs())[out]
    assert rel.max() < 64 * EPS32 * (1 + stats[:, 0].abs().max().item()), rel.max()


@pytest.mark.parametrize("device", DEVICES)
def test_long_rows(device):
    """V = 400003: many CPU chunks; on CUDA, 512-thread teams and a tail bitmap of 50 KB, past
    the 48 KB a block gets without asking (the kernel's opt-in)."""
    gen = torch.Generator().manual_seed(16)
    n, V, K = 2, 400_003, 1024
    student = make_logits((n, V), torch.bfloat16, device, gen)
    ids = make_ids(n, V, K, gen, pad=False).to(device)
    labels = torch.tensor([int(ids[0, 3]), 77], device=device)
    kw = dict(temperature=1.5, softcap=None, ignore_index=IGNORE)
    stats, ref = run_stats(student, ids, labels, tail=True, ce=True, **kw)
    assert_stats_close(stats, ref, student, softcap=None, temperature=1.5)
    coefs, d = make_coefs(n, K, gen)
    grad, ref = run_grad(student, ids, labels, stats.cpu(), coefs, d, **kw)
    assert_grad_close(grad, ref, student, coefs, d, softcap=None, temperature=1.5)


@pytest.mark.parametrize("device", [p for p in DEVICES if p.values == ("cuda",)])
def test_cuda_tail_bitmap_too_large_is_a_clear_error(device):
    """The tail's bitmap of V bits must fit a block's shared memory (227 KB on an H100: V up
    to 1.86M); beyond, an error that says so, before any kernel runs."""
    V = 4_000_000
    student = torch.zeros(1, V, device=device)
    ids = torch.zeros(1, 1, dtype=torch.long, device=device)
    with pytest.raises(RuntimeError, match="membership bitmap of V = 4000000 bits needs"):
        _compiled_rows.topk_row_stats(student, ids, None, temperature=1.0, softcap=None,
                                      tail=True, ce=False, ignore_index=IGNORE)  # fmt: skip
    # Without the tail there is no bitmap.
    stats = _compiled_rows.topk_row_stats(student, ids, None, temperature=1.0, softcap=None,
                                          tail=False, ce=False, ignore_index=IGNORE)  # fmt: skip
    assert stats[0, 1].item() == pytest.approx(math.log(V))


# --- the ops ----------------------------------------------------------------------------------


def _opcheck_args(device, dtype, labels, softcap):
    gen = torch.Generator().manual_seed(15)
    n, V, K = 5, 37, 6
    student = make_logits((n, V), dtype, device, gen)
    ids = make_ids(n, V, K, gen).to(device)
    lab = make_labels(n, V, ids.cpu(), gen).to(device) if labels else None
    stats = oracle.row_stats(student, ids, lab, temperature=2.0, softcap=softcap, tail=True,
                             ce=labels, ignore_index=IGNORE).float().to(device)  # fmt: skip
    coefs, d = make_coefs(n, K, gen)
    at_ids = student.gather(1, ids.clamp(min=0))
    stats_args = (student, ids, lab, 2.0, softcap, True, labels, IGNORE)
    grad_args = (student, ids, at_ids, lab, stats, coefs.to(device), d.to(device),
                 torch.empty_like(student), 2.0, softcap, IGNORE)  # fmt: skip
    return stats_args, grad_args


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "dtype,labels,softcap",
    [(torch.float32, True, None), (torch.bfloat16, False, 20.0), (torch.float16, True, 5.0)],
)
def test_opcheck(device, dtype, labels, softcap):
    stats_args, grad_args = _opcheck_args(device, dtype, labels, softcap)
    torch.library.opcheck(torch.ops.fastkd.topk_row_stats.default, stats_args)
    torch.library.opcheck(torch.ops.fastkd.topk_grad_rows.default, grad_args)


@pytest.mark.parametrize("device", DEVICES)
def test_rejects_bad_arguments(device):
    stats_args, grad_args = _opcheck_args(device, torch.float32, True, None)
    op_stats, op_grad = torch.ops.fastkd.topk_row_stats, torch.ops.fastkd.topk_grad_rows
    bad = list(stats_args)
    bad[1] = stats_args[1].int()
    with pytest.raises(RuntimeError, match="ids must be Long"):
        op_stats(*bad)
    bad = list(stats_args)
    bad[1] = stats_args[1][:-1]
    with pytest.raises(RuntimeError, match=r"ids must have shape \(5, K\)"):
        op_stats(*bad)
    bad = list(stats_args)
    bad[0] = torch.randn(37, 5, device=device).T
    with pytest.raises(RuntimeError, match="unit stride along V"):
        op_stats(*bad)
    bad = list(grad_args)
    bad[4] = grad_args[4][:, :4]
    with pytest.raises(RuntimeError, match="stats must have shape"):
        op_grad(*bad)
    bad = list(grad_args)
    bad[7] = grad_args[7].bfloat16()
    with pytest.raises(RuntimeError, match="grad must have the student's dtype"):
        op_grad(*bad)
    both = torch.randn(6, 37, device=device)
    bad = list(grad_args)
    bad[0], bad[7] = both[:-1], both[1:]
    with pytest.raises(RuntimeError, match="grad overlaps the student"):
        op_grad(*bad)
