"""The top-k reference (design.md §4) against the peers' formulas, the dense reference, closed
forms and autograd, float64. Each peer's formula is written out here from its description in
notes/peers-2026.md, independently of fastkd/topk_reference.py."""

import math

import pytest
import torch
import torch.nn.functional as F

import fastkd
from fastkd.topk import TopKTeacher
from fastkd.topk_reference import topk_loss_reference

DIVERGENCES = list(fastkd.DIVERGENCES)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _logits(*shape, seed, scale=3.0):
    return torch.randn(*shape, generator=_gen(seed), dtype=torch.float64) * scale


def _labels(*shape, V, seed):
    g = _gen(seed)
    labels = torch.randint(0, V, shape, generator=g)
    labels[torch.rand(shape, generator=g) < 0.3] = -100
    labels.view(-1)[0] = -100
    labels.view(-1)[-1] = 1
    return labels


def _top_k(teacher_logits, k, T=1.0):
    """A producer's output: the k largest tokens (sorted, as vLLM and APIs give them) and
    their log-probabilities over the whole vocabulary at T."""
    logprobs = F.log_softmax(teacher_logits / T, -1)
    values, ids = logprobs.topk(k, -1)
    return ids, values


def _grad(loss, x):
    return torch.autograd.grad(loss, x, retain_graph=True)[0]


def _both(ours, theirs, x, **tol):
    torch.testing.assert_close(ours, theirs, **tol)
    torch.testing.assert_close(_grad(ours, x), _grad(theirs, x), **tol)


# --- K = V: the dense loss --------------------------------------------------------------

TOPK_MODES = [
    dict(),
    dict(teacher_normalization="renormalize"),
    dict(topk_tail="bucket"),  # S = V: nothing outside, the tail entry is absent
    dict(teacher_normalization="renormalize", student_normalization="topk"),
]


@pytest.mark.parametrize("mode", TOPK_MODES, ids=lambda m: "-".join(m.values()) or "raw-full")
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_k_equals_v_is_the_dense_loss(divergence, mode):
    """Every pair given (in a shuffled order): each mode is kd_loss_reference, CE, soft-cap,
    T, ignored rows included."""
    V, T, cap = 40, 1.7, 6.0
    s = _logits(2, 3, V, seed=1).requires_grad_(True)
    t = _logits(2, 3, V, seed=2)
    labels = _labels(2, 3, V=V, seed=3)
    ids = torch.rand(2, 3, V, generator=_gen(4)).argsort(-1)
    logprobs = F.log_softmax(cap * torch.tanh(t / cap) / T, -1).gather(-1, ids)
    opts = dict(divergence=divergence, temperature=T, softcap=cap, ce_weight=0.3, beta=0.3,
                alpha=0.2)  # fmt: skip
    ours = topk_loss_reference(s, TopKTeacher(ids, logprobs), labels, **mode, **opts)
    dense = fastkd.kd_loss_reference(s, t, labels, **opts)
    for x, y in zip(ours[1:], dense[1:]):
        torch.testing.assert_close(x, y)
    _both(ours[0], dense[0], s)


# --- K = 1 ------------------------------------------------------------------------------


def test_k_equals_one_by_hand():
    V = 25
    s = _logits(6, V, seed=5).requires_grad_(True)
    ids, ell = _top_k(_logits(6, V, seed=6), 1)
    teacher = TopKTeacher(ids, ell)
    log_q = F.log_softmax(s, -1).gather(-1, ids).squeeze(-1)
    p, lq = ell.squeeze(-1).exp(), log_q
    none = p * (ell.squeeze(-1) - lq)
    bucket = none + (1 - p) * (torch.log1p(-p) - torch.log1p(-lq.exp()))
    for tail, rows in (("none", none), ("bucket", bucket)):
        ours, _, _ = topk_loss_reference(s, teacher, topk_tail=tail, reduction="none")
        _both(ours.sum(), rows.sum(), s)
    # One pair renormalised against one student entry renormalised: p = q = 1, nothing
    # to learn (0 up to the rounding of the mixtures' log(w) + log(1 - w)).
    for divergence in DIVERGENCES:
        ours, _, _ = topk_loss_reference(
            s, teacher, divergence=divergence, teacher_normalization="renormalize",
            student_normalization="topk",
        )  # fmt: skip
        assert abs(ours.item()) < 1e-15 and _grad(ours, s).abs().max() < 1e-15, divergence


# --- the peers ---------------------------------------------------------------------------


def _axolotl_topk_kd(student_logits, ids, logprobs, target_mask, T, T_gen, num_items,
                     normalize_topk):  # fmt: skip
    """axolotl's top-k KD: the teacher's logprobs rescaled p^(T_gen/T) and renormalised over
    the valid K; student log_softmax(s/T) over the vocabulary gathered (over the valid K
    only with kd_normalize_topk); sum of p (log p - log q) over valid pairs, * T^2,
    / num_items_in_batch."""
    valid = target_mask.bool()
    logprobs = torch.where(valid, logprobs * (T_gen / T), -math.inf)
    logprobs = logprobs - torch.logsumexp(logprobs, -1, keepdim=True)
    student_topk = torch.gather(student_logits, -1, torch.where(valid, ids, 0)) / T
    if normalize_topk:
        lse = torch.logsumexp(student_topk.masked_fill(~valid, -math.inf), -1, keepdim=True)
    else:
        lse = torch.logsumexp(student_logits / T, -1, keepdim=True)
    student_logprobs = (student_topk - lse)[valid]
    target = logprobs[valid]
    kd = (target.exp() * (target - student_logprobs)).sum() * T**2
    return kd / float(num_items)


@pytest.mark.parametrize("normalize_topk", [False, True])
@pytest.mark.parametrize("T_gen", [None, 1.0])
def test_axolotl_topk_kd(normalize_topk, T_gen):
    V, K, T = 300, 20, 2.0
    s = _logits(2, 5, V, seed=7).requires_grad_(True)
    ids, ell = _top_k(_logits(2, 5, V, seed=8), K, T=T if T_gen is None else T_gen)
    mask = torch.rand(2, 5, K, generator=_gen(9)) < 0.8
    mask[0, 0] = False  # a position without a teacher
    ids = torch.where(mask, ids, 0)  # axolotl pads ids with 0: repeats, never read
    ours, _, _ = topk_loss_reference(
        s, TopKTeacher(ids, ell, mask), teacher_normalization="renormalize",
        student_normalization="topk" if normalize_topk else "full", temperature=T,
        teacher_temperature=T_gen, num_items_in_batch=7,
    )  # fmt: skip
    theirs = _axolotl_topk_kd(s, ids, ell, mask, T, T if T_gen is None else T_gen, 7,
                              normalize_topk)  # fmt: skip
    _both(ours, theirs, s)


def _trl_tail_kl(student_logits, ids, logprobs, labels, T):
    """TRL's server-distillation KL (beta = 0): raw teacher top-k with -inf padding, student
    log_softmax(s/T) gathered; both get the tail bucket log(1 - sum e^l) as
    log(-expm1(logsumexp)) clamped <= -1e-7; KL over K + 1; mean over completion tokens."""

    def add_tail(lp):
        log_s = torch.logsumexp(lp, -1, keepdim=True).clamp(max=-1e-7)
        return torch.cat([lp, torch.log(-torch.expm1(log_s))], -1)

    pad = logprobs == -math.inf
    student = F.log_softmax(student_logits / T, -1).gather(-1, torch.where(pad, 0, ids))
    student = add_tail(student.masked_fill(pad, -math.inf))
    teacher = add_tail(logprobs)
    live = teacher > -math.inf
    kl = torch.where(live, teacher.exp() * (teacher - torch.where(live, student, 0)), 0.0)
    mask = labels != -100
    return kl.sum(-1)[mask].sum() / mask.sum()


@pytest.mark.parametrize("T", [1.0, 1.5])
def test_trl_tail_bucket_kl(T):
    V, K = 300, 20
    s = _logits(3, 4, V, seed=10).requires_grad_(True)
    ids, ell = _top_k(_logits(3, 4, V, seed=11), K, T=T)
    ell = ell.masked_fill(torch.rand(3, 4, K, generator=_gen(12)) < 0.2, -math.inf)
    labels = _labels(3, 4, V=V, seed=13)
    ours, _, _ = topk_loss_reference(
        s, TopKTeacher(ids, ell), labels, topk_tail="bucket", temperature=T,
        scale_by_temperature_squared=False,
    )  # fmt: skip
    _both(ours, _trl_tail_kl(s, ids, ell, labels, T), s)


def test_verl_forward_kl_topk():
    """verl's forward_kl_topk without its clamps: sum e^lt (lt - ls) over the raw top-k,
    ls = log_softmax(s) gathered; token mean."""
    V, K = 200, 16
    s = _logits(8, V, seed=14).requires_grad_(True)
    ids, ell = _top_k(_logits(8, V, seed=15), K)
    student = F.log_softmax(s, -1).gather(-1, ids)
    theirs = (ell.exp() * (ell - student)).sum(-1).mean()
    ours, _, _ = topk_loss_reference(s, TopKTeacher(ids, ell))
    _both(ours, theirs, s)


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_modelopt_topk_logits_kl(T):
    """ModelOpt's TopKLogitsKLLoss: the teacher's top-K by its logits, KL between the
    teacher's and the student's softmax over those K (at T); per-token mean."""
    V, K = 150, 12
    s, t = _logits(6, V, seed=16).requires_grad_(True), _logits(6, V, seed=17)
    ids = t.topk(K, -1).indices
    p = F.softmax(t.gather(-1, ids) / T, -1)
    log_q = F.log_softmax(s.gather(-1, ids) / T, -1)
    theirs = (p * (p.log() - log_q)).sum(-1).mean()
    ell = F.log_softmax(t / T, -1).gather(-1, ids)
    ours, _, _ = topk_loss_reference(
        s, TopKTeacher(ids, ell), teacher_normalization="renormalize",
        student_normalization="topk", temperature=T, scale_by_temperature_squared=False,
    )  # fmt: skip
    _both(ours, theirs, s)


def test_distillkit_symmetric_uniform():
    """DistillKit's symmetric_uniform: the mass each side leaves outside the top-k spread
    evenly over the V - K other tokens, for teacher and student alike; KL over the whole
    vocabulary, * T^2, / num_items_in_batch."""
    V, K, T = 120, 10, 2.0
    s = _logits(2, 4, V, seed=18).requires_grad_(True)
    ids, ell = _top_k(_logits(2, 4, V, seed=19), K, T=T)
    inside = torch.zeros(2, 4, V, dtype=torch.bool).scatter(-1, ids, True)
    q_full = F.softmax(s / T, -1)
    q_topk = q_full.gather(-1, ids)
    p_left = (1 - ell.exp().sum(-1, keepdim=True)) / (V - K)
    q_left = (1 - q_topk.sum(-1, keepdim=True)) / (V - K)
    p = torch.zeros(2, 4, V, dtype=torch.float64).scatter(-1, ids, ell.exp())
    p = torch.where(inside, p, p_left)
    q = torch.where(inside, q_full, q_left)
    theirs = F.kl_div(q.log(), p, reduction="sum") * T**2 / 5
    ours, _, _ = topk_loss_reference(
        s, TopKTeacher(ids, ell), topk_tail="bucket", temperature=T, num_items_in_batch=5
    )
    _both(ours, theirs, s)


def test_soft_ce_over_the_topk():
    """Soft cross-entropy against the raw top-k (tinker): -sum_S e^l log q, q over the
    whole vocabulary."""
    V, K = 90, 20
    s = _logits(7, V, seed=20).requires_grad_(True)
    ids, ell = _top_k(_logits(7, V, seed=21), K)
    theirs = -(ell.exp() * F.log_softmax(s, -1).gather(-1, ids)).sum(-1).mean()
    ours, _, _ = topk_loss_reference(s, TopKTeacher(ids, ell), divergence="soft_ce")
    _both(ours, theirs, s)


# --- padding, empty rows, NaN ------------------------------------------------------------

MODES = [dict(), dict(topk_tail="bucket"), dict(teacher_normalization="renormalize"),
         dict(teacher_normalization="renormalize", student_normalization="topk")]  # fmt: skip


@pytest.mark.parametrize("mode", MODES, ids=lambda m: "-".join(m.values()) or "raw-full")
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_padding_is_absent(divergence, mode):
    """Pairs padded by mask or by -inf change nothing: each row equals the loss of its
    unpadded pairs alone. Padding ids are junk (-1, repeats, past V) and padding logprobs
    under mask False are NaN: no NaN anywhere."""
    V, K, T = 30, 6, 1.3
    s = _logits(5, V, seed=22).requires_grad_(True)
    ids, ell = _top_k(_logits(5, V, seed=23), K, T=T)
    g = _gen(24)
    by_mask = torch.rand(5, K, generator=g) < 0.25
    by_inf = (torch.rand(5, K, generator=g) < 0.25) & ~by_mask
    by_mask[4], by_inf[4] = False, False  # one row without padding
    padded_ids = torch.where(by_mask, -1, torch.where(by_inf, V + 3, ids))
    padded_ids[1, by_inf[1]] = ids[1, 0]  # a repeat of a real id, under -inf
    padded = TopKTeacher(
        padded_ids, ell.masked_fill(by_inf, -math.inf).masked_fill(by_mask, math.nan), ~by_mask
    )
    opts = dict(divergence=divergence, temperature=T, reduction="none", beta=0.3, alpha=0.3,
                **mode)  # fmt: skip
    ours, _, _ = topk_loss_reference(s, padded, **opts)
    weights = torch.rand(5, generator=g, dtype=torch.float64) + 0.5
    grad = _grad((ours * weights).sum(), s)
    assert torch.isfinite(ours).all() and torch.isfinite(grad).all()
    for r in range(5):
        keep = ~(by_mask[r] | by_inf[r])
        s_r = s[r : r + 1].detach().requires_grad_(True)
        row, _, _ = topk_loss_reference(
            s_r, TopKTeacher(ids[r : r + 1, keep], ell[r : r + 1, keep]), **opts
        )
        torch.testing.assert_close(ours[r : r + 1], row)
        torch.testing.assert_close(grad[r : r + 1], _grad(row.sum() * weights[r], s_r))


@pytest.mark.parametrize("mode", MODES, ids=lambda m: "-".join(m.values()) or "raw-full")
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_empty_support_is_zero(divergence, mode):
    """A row whose every pair is padding: D = 0, no KD gradient, still counted in the mean."""
    V, K = 20, 4
    s = _logits(3, V, seed=25).requires_grad_(True)
    ids, ell = _top_k(_logits(3, V, seed=26), K)
    mask = torch.ones(3, K, dtype=torch.bool)
    mask[1] = False
    ell = ell.clone()
    ell[2] = -math.inf
    opts = dict(divergence=divergence, **mode)
    rows, _, _ = topk_loss_reference(s, TopKTeacher(ids, ell, mask), reduction="none", **opts)
    assert rows[1].abs().item() < 1e-15 and rows[2].abs().item() < 1e-15
    mean, _, _ = topk_loss_reference(s, TopKTeacher(ids, ell, mask), **opts)
    torch.testing.assert_close(mean, rows[0] / 3)
    grad = _grad(mean, s)
    assert grad[1:].abs().max().item() < 1e-15 and grad[0].abs().max().item() > 0


def test_rows_without_a_distribution_are_nan():
    """NaN/+inf on a real pair, or a student row of -inf: that row NaN in loss and gradient,
    the others untouched. An ignored row's NaN logits reach nothing."""
    V, K = 15, 4
    s = _logits(5, V, seed=27)
    ids, ell = _top_k(_logits(5, V, seed=28), K)
    ell = ell.clone()
    ell[0, 1] = math.nan
    ell[1, 2] = math.inf
    s[2] = -math.inf
    s[3, 5] = math.nan  # ignored below
    s = s.requires_grad_(True)
    labels = torch.tensor([1, 2, 3, -100, 4])
    rows, _, _ = topk_loss_reference(s, TopKTeacher(ids, ell), labels, reduction="none")
    assert rows[:3].isnan().all() and rows[3] == 0 and rows[4].isfinite()
    grad = _grad(rows.sum(), s)
    assert grad[:2].isnan().all() and torch.all(grad[3] == 0) and grad[4].isfinite().all()
    # The same with NaN under mask False: padding, not a NaN row.
    mask = torch.ones(5, K, dtype=torch.bool)
    mask[0, 1] = mask[1, 2] = False
    rows, _, _ = topk_loss_reference(s, TopKTeacher(ids, ell, mask), labels, reduction="none")
    assert rows[[0, 1, 3, 4]].isfinite().all()


@pytest.mark.parametrize("reduction", ["mean", "sum", "batchmean", "none"])
def test_reductions(reduction):
    V, K = 30, 5
    s = _logits(2, 4, V, seed=29)
    ids, ell = _top_k(_logits(2, 4, V, seed=30), K)
    teacher, labels = TopKTeacher(ids, ell), _labels(2, 4, V=V, seed=31)
    opts = dict(temperature=2.0, ce_weight=0.5, topk_tail="bucket")
    rows, kd_rows, ce_rows = topk_loss_reference(s, teacher, labels, reduction="none", **opts)
    out, _, _ = topk_loss_reference(s, teacher, labels, reduction=reduction, **opts)
    kept = labels != -100
    assert torch.all(rows[~kept] == 0)
    torch.testing.assert_close(rows, kd_rows + 0.5 * ce_rows)
    expected = {"mean": rows.sum() / kept.sum(), "sum": rows.sum(),
                "batchmean": rows.sum() / 2, "none": rows}[reduction]  # fmt: skip
    torch.testing.assert_close(out, expected)
    n, _, _ = topk_loss_reference(s, teacher, labels, num_items_in_batch=17, **opts)
    torch.testing.assert_close(n, rows.sum() / 17)
    # Every row ignored: 0 with a zero gradient, never NaN.
    s = s.requires_grad_(True)
    zero, _, _ = topk_loss_reference(s, teacher, torch.full((2, 4), -100), **opts)
    assert zero.item() == 0 and torch.all(_grad(zero, s) == 0)


# --- the tail where float subtraction breaks ---------------------------------------------


def test_teacher_mass_rounded_past_one_has_no_tail():
    """Top-k logprobs whose e^l sum a hair past 1 (float rounding): the tail is 0, not NaN,
    and the loss is the tail-less one for every divergence."""
    V = 12
    s = _logits(1, V, seed=32).requires_grad_(True)
    ids = torch.tensor([[3, 7, 0]])
    ell = torch.log(torch.tensor([[0.6, 0.3, 0.1 + 1e-12]], dtype=torch.float64))
    assert torch.isnan(torch.log1p(-ell.exp().sum()))  # the naive tail
    for divergence in DIVERGENCES:
        bucket, _, _ = topk_loss_reference(
            s, TopKTeacher(ids, ell), divergence=divergence, topk_tail="bucket"
        )
        plain, _, _ = topk_loss_reference(s, TopKTeacher(ids, ell), divergence=divergence)
        assert torch.isfinite(bucket), divergence
        _both(bucket, plain, s)


@pytest.mark.parametrize("divergence", ["forward_kl", "soft_ce"])
def test_float32_teacher_holding_all_but_1e9(divergence):
    """A float32 teacher whose top-k holds all but 1e-9 of its mass: 1 - sum e^l is below
    float32's resolution, the tail comes out 0 or a rounding residue, never NaN; the loss
    and gradient are those of the float64 truth (p_tail = 1e-9) within design.md §2."""
    V, K = 50, 5
    t = torch.full((3, V), -100.0, dtype=torch.float64)
    t[:, :K] = _logits(3, K, seed=33, scale=1.0)
    t[:, K:] = t[:, :K].logsumexp(-1, keepdim=True) + math.log(1e-9 / (V - K))
    ids, ell = _top_k(t, K)
    s = _logits(3, V, seed=34)
    opts = dict(divergence=divergence, topk_tail="bucket")
    s32 = s.float().requires_grad_(True)
    out, _, _ = topk_loss_reference(s32, TopKTeacher(ids, ell.float()), **opts)
    s64 = s32.detach().double().requires_grad_(True)
    ref, _, _ = topk_loss_reference(s64, TopKTeacher(ids, ell), **opts)
    assert out.dtype == torch.float32 and torch.isfinite(out)
    g32, g64 = _grad(out, s32), _grad(ref, s64)
    assert torch.isfinite(g32).all()
    assert abs(out.item() - ref.item()) <= 1e-5 * abs(ref.item())
    assert (g32.double() - g64).norm() <= 1e-5 * g64.norm()


def _confident_student(eps, V, K, seed):
    """Student logits whose mass outside the first K ids (at random positions) is exactly
    eps: a_S = x, a_j = c elsewhere, (V - K) e^c = eps Z_S / (1 - eps). Returns the logits,
    the ids and the closed-form log q over S."""
    x = _logits(K, seed=seed, scale=1.0)
    log_z = x.logsumexp(0)
    c = math.log(eps / (V - K)) - math.log1p(-eps) + log_z.item()
    ids = torch.randperm(V, generator=_gen(seed + 1))[:K]
    s = torch.full((V,), c, dtype=torch.float64).scatter(0, ids, x)
    log_q = x - log_z + math.log1p(-eps)
    return s.unsqueeze(0), ids.unsqueeze(0), log_q


@pytest.mark.parametrize("eps", [1e-9, 1e-20])
def test_confident_student_tail_closed_form(eps):
    """The teacher leaves 1e-3 outside its top-k, the student eps: q_tail from the entries
    outside S gives the closed-form loss and gradient (1 - sum_S q would give 0 at 1e-20
    in float64, and at 1e-9 in float32: an infinite loss)."""
    V, K, p_tail = 50, 5, 1e-3
    s, ids, log_q = _confident_student(eps, V, K, seed=35)
    w = torch.rand(K, generator=_gen(36), dtype=torch.float64) + 0.1
    p = (1 - p_tail) * w / w.sum()
    teacher = TopKTeacher(ids, p.log().unsqueeze(0))
    expected = (p * (p.log() - log_q)).sum() + p_tail * (math.log(p_tail) - math.log(eps))
    grad_expected = torch.full((V,), (eps - p_tail) / (V - K), dtype=torch.float64)
    grad_expected[ids[0]] = log_q.exp() - p
    s = s.requires_grad_(True)
    ours, _, _ = topk_loss_reference(s, teacher, topk_tail="bucket")
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(_grad(ours, s)[0], grad_expected, rtol=1e-10, atol=1e-25)
    # In float32 (eps = 1e-9 is 1e-2 of float32's epsilon), within design.md §2.
    if eps == 1e-9:
        s32 = s.detach().float().requires_grad_(True)
        assert 1 - F.softmax(s32, -1)[0, ids[0]].sum().item() < 1e-7  # 1 - sum q: rounding
        out, _, _ = topk_loss_reference(
            s32, TopKTeacher(ids, p.float().log().unsqueeze(0)), topk_tail="bucket"
        )
        g = _grad(out, s32)[0].double()
        assert abs(out.item() - expected.item()) <= 1e-5 * expected.item()
        assert (g - grad_expected).norm() <= 1e-5 * grad_expected.norm()
    for divergence in DIVERGENCES:  # every divergence finite there too
        out, _, _ = topk_loss_reference(s, teacher, divergence=divergence, topk_tail="bucket")
        assert torch.isfinite(out) and torch.isfinite(_grad(out, s)).all(), divergence


# --- design.md §4's gradient --------------------------------------------------------------


def _g(divergence, p, q, w):
    """dD/dq_k from design.md §1's table, by hand."""
    if divergence in ("forward_kl", "soft_ce"):
        return -p / q
    if divergence == "reverse_kl":
        return q.log() - p.log() + 1
    if divergence == "jsd":
        return (1 - w) * (q / (w * p + (1 - w) * q)).log()
    if divergence == "skew_forward_kl":
        return -(1 - w) * p / (w * p + (1 - w) * q)
    if divergence == "skew_reverse_kl":
        m = w * q + (1 - w) * p
        return (q / m).log() + 1 - w * q / m
    if divergence == "tvd":
        return 0.5 * torch.sign(q - p)
    if divergence == "hellinger":
        return 0.5 * (1 - (p / q).sqrt())
    raise AssertionError(f"no hand-written g for {divergence!r}: add it here")


@pytest.mark.parametrize("tail", ["none", "bucket"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_design_gradient_formula(divergence, tail):
    """Autograd through the spec == design.md §4: dD/da_j = q_j (h_j - Sigma), h_j = g_i at
    j = id_i, g_tail (or 0) outside S, Sigma = sum_S g q + g_tail q_tail; raw p (not summing
    to 1), one padded pair per row."""
    V, K, w = 35, 7, 0.3
    a = _logits(4, V, seed=37, scale=2.0).requires_grad_(True)
    ids, ell = _top_k(_logits(4, V, seed=38, scale=2.0), K)
    mask = torch.ones(4, K, dtype=torch.bool)
    mask[torch.arange(4), torch.tensor([0, 3, 6, 2])] = False
    D, _, _ = topk_loss_reference(
        a, TopKTeacher(ids, ell, mask), divergence=divergence, topk_tail=tail, beta=w,
        alpha=w, reduction="sum",
    )  # fmt: skip
    grad = _grad(D, a)
    q_full = F.softmax(a.detach(), -1)
    for r in range(4):
        i, p = ids[r, mask[r]], ell[r, mask[r]].exp()
        q = q_full[r, i]
        g = _g(divergence, p, q, w)
        h = torch.zeros(V, dtype=torch.float64)
        sigma = (g * q).sum()
        if tail == "bucket":
            p_t, q_t = 1 - p.sum(), 1 - q.sum()
            g_t = _g(divergence, p_t.reshape(1), q_t.reshape(1), w)[0]
            h[:], sigma = g_t, sigma + g_t * q_t
        h[i] = g
        torch.testing.assert_close(grad[r], q_full[r] * (h - sigma))


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_design_gradient_formula_topk_student(divergence):
    """Student "topk": the §1 form over S with q renormalised over S, zero elsewhere."""
    V, K, w = 30, 6, 0.3
    a = _logits(3, V, seed=39, scale=2.0).requires_grad_(True)
    ids, ell = _top_k(_logits(3, V, seed=40, scale=2.0), K)
    D, _, _ = topk_loss_reference(
        a, TopKTeacher(ids, ell), divergence=divergence, teacher_normalization="renormalize",
        student_normalization="topk", beta=w, alpha=w, reduction="sum",
    )  # fmt: skip
    grad = _grad(D, a)
    p = F.softmax(ell, -1)
    q = F.softmax(a.detach().gather(-1, ids), -1)
    g = _g(divergence, p, q, w)
    expected = torch.zeros(3, V, dtype=torch.float64)
    expected.scatter_(-1, ids, q * (g - (q * g).sum(-1, keepdim=True)))
    torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_gradcheck(divergence):
    """Finite differences agree with autograd through the whole spec: tail, padding, CE,
    soft-cap, T, an ignored row."""
    V, K = 9, 4
    s = _logits(3, V, seed=41, scale=2.0).requires_grad_(True)
    ids, ell = _top_k(_logits(3, V, seed=42, scale=2.0), K, T=1.7)
    teacher = TopKTeacher(ids, ell.masked_fill(torch.eye(3, K, dtype=torch.bool), -math.inf))
    labels = torch.tensor([1, -100, 8])

    def f(x):
        return topk_loss_reference(
            x, teacher, labels, divergence=divergence, topk_tail="bucket", temperature=1.7,
            softcap=5.0, ce_weight=0.4, beta=0.3, alpha=0.2,
        )[0]  # fmt: skip

    assert torch.autograd.gradcheck(f, (s,), eps=1e-6, atol=1e-7)


# --- bad inputs ---------------------------------------------------------------------------


def _bad_cases():
    V, K = 10, 3
    s = torch.randn(2, V, dtype=torch.float64)
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    ell = torch.full((2, K), -2.0, dtype=torch.float64)
    ok = TopKTeacher(ids, ell)

    def teacher(i):
        return TopKTeacher(torch.tensor(i), ell)

    return [
        ("teacher-type", TypeError, "teacher must be a fastkd TopKTeacher", (s, (ids, ell)), {}),
        ("K>V", ValueError, "K = 11 pairs per row, more than the vocabulary V = 10",
         (s, TopKTeacher(torch.arange(11).expand(2, 11), torch.zeros(2, 11))), {}),
        ("id<0", ValueError, r"token_ids must lie in \[0, 10\)",
         (s, teacher([[1, 2, -1], [4, 5, 6]])), {}),
        ("id>=V", ValueError, r"token_ids must lie in \[0, 10\)",
         (s, teacher([[1, 2, 3], [4, 5, 10]])), {}),
        ("duplicate", ValueError, "token_ids must be distinct within a row",
         (s, teacher([[1, 2, 1], [4, 5, 6]])), {}),
        ("lead-shape", ValueError, "must have the student logits' leading shape",
         (torch.randn(3, V, dtype=torch.float64), ok), {}),
        ("lead-shape-3d", ValueError, "must have the student logits' leading shape",
         (s.reshape(2, 1, V), ok), {}),
        ("student-int", TypeError, "student_logits must be a floating-point tensor",
         (torch.zeros(2, V, dtype=torch.long), ok), {}),
        ("student-0d", ValueError, "student_logits must have a vocabulary dimension",
         (torch.tensor(1.0), ok), {}),
        ("renormalize+bucket", ValueError, "topk_tail='bucket' needs teacher_normalization='raw'",
         (s, ok), dict(teacher_normalization="renormalize", topk_tail="bucket")),
        ("topk+bucket", ValueError, "topk_tail='bucket' needs student_normalization='full'",
         (s, ok), dict(student_normalization="topk", topk_tail="bucket")),
        ("T_g+raw", ValueError, "teacher_temperature=1.0 differs from temperature=2.0",
         (s, ok), dict(teacher_temperature=1.0, temperature=2.0)),
        ("T_g+bucket", ValueError, "teacher_temperature=3.0 differs",
         (s, ok), dict(teacher_temperature=3.0, topk_tail="bucket")),
        ("T_g<=0", ValueError, "teacher_temperature must be a finite number > 0",
         (s, ok), dict(teacher_temperature=0.0)),
        ("T_g-type", TypeError, "teacher_temperature must be a real number",
         (s, ok), dict(teacher_temperature="1")),
        ("teacher_normalization", ValueError, "teacher_normalization must be one of",
         (s, ok), dict(teacher_normalization="softmax")),
        ("student_normalization", ValueError, "student_normalization must be one of",
         (s, ok), dict(student_normalization="none")),
        ("topk_tail", ValueError, "topk_tail must be one of", (s, ok), dict(topk_tail=None)),
        ("divergence", ValueError, "divergence must be one of", (s, ok), dict(divergence="kl")),
        ("option", TypeError, "unknown option 'temprature'", (s, ok), dict(temprature=2.0)),
        ("ce-no-labels", ValueError, "needs labels", (s, ok), dict(ce_weight=1.0)),
        ("labels-shape", ValueError, "labels must have the leading shape",
         (s, ok, torch.tensor([1, 2, 3])), {}),
        ("labels-range", ValueError, r"labels must lie in \[0, 10\)",
         (s, ok, torch.tensor([1, 10])), {}),
        ("num_items", ValueError, "num_items_in_batch must be > 0",
         (s, ok), dict(num_items_in_batch=-1)),
    ]  # fmt: skip


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_inputs(case):
    _, error, match, args, kwargs = case
    with pytest.raises(error, match=match):
        topk_loss_reference(*args, **kwargs)


def test_allowed_edge_arguments():
    """What is not an error: teacher_temperature equal to T with a raw teacher and a tail,
    out-of-range and repeated ids on padding pairs, K = V."""
    V = 6
    s = torch.randn(2, V, dtype=torch.float64)
    ell = torch.tensor([[-1.0, -2.0, -math.inf], [-0.5, -3.0, -4.0]], dtype=torch.float64)
    ids = torch.tensor([[0, 1, -7], [2, 3, 4]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    ids[1, 2] = 2  # a repeat, on a masked pair
    teacher = TopKTeacher(ids, ell, mask)
    a = topk_loss_reference(s, teacher, topk_tail="bucket", teacher_temperature=1.0)
    b = topk_loss_reference(s, teacher, topk_tail="bucket")
    torch.testing.assert_close(a[0], b[0])
    full = TopKTeacher(torch.arange(V).expand(2, V), F.log_softmax(s, -1))
    assert topk_loss_reference(s, full)[0].abs().item() < 1e-12


def test_support_covering_the_vocabulary_has_no_tail():
    """S = V: nothing lies outside S, so there is no tail entry, whatever 1 - sum e^l
    leaves (here 1e-6, as a teacher's rounding or a truncated producer might)."""
    V = 16
    s = _logits(3, V, seed=43).requires_grad_(True)
    ids = torch.rand(3, V, generator=_gen(44)).argsort(-1)
    ell = F.log_softmax(_logits(3, V, seed=45), -1).gather(-1, ids) - 1e-6
    for divergence in DIVERGENCES:
        kw = dict(divergence=divergence)
        bucket, _, _ = topk_loss_reference(s, TopKTeacher(ids, ell), topk_tail="bucket", **kw)
        plain, _, _ = topk_loss_reference(s, TopKTeacher(ids, ell), **kw)
        _both(bucket, plain, s)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_masked_student_vocabulary(divergence):
    """A student with -inf on most of its vocabulary (outside S): finite loss and gradient,
    0 on the masked entries, without a tail and with a tail the teacher gives no mass; with
    a tail the teacher gives mass the student cannot, D is +inf for forward_kl and soft_ce
    (as the dense ones are), finite for the others, and the gradient is finite. Student
    "topk" with one -inf in S: finite gradient too."""
    V, K = 40, 5
    ids, ell = _top_k(_logits(3, V, seed=46), K)
    outside = torch.ones(3, V, dtype=torch.bool).scatter(-1, ids, False)
    s = _logits(3, V, seed=47).masked_fill(outside, -math.inf).requires_grad_(True)
    opts = dict(divergence=divergence, beta=0.3, alpha=0.3)
    # The top-k holds all the mass; 1e-12 over, so that rounding cannot leave a residue of
    # tail mass (which the student, with q_tail = 0 exactly, would pay for with D = inf).
    full_mass = ell - ell.logsumexp(-1, keepdim=True) + 1e-12
    for teacher, tail in ((TopKTeacher(ids, ell), "none"),
                          (TopKTeacher(ids, full_mass), "bucket")):  # fmt: skip
        out, _, _ = topk_loss_reference(s, teacher, topk_tail=tail, **opts)
        grad = _grad(out, s)
        assert torch.isfinite(out) and torch.isfinite(grad).all()
        assert torch.all(grad[outside] == 0)
    out, _, _ = topk_loss_reference(s, TopKTeacher(ids, ell), topk_tail="bucket", **opts)
    if divergence in ("forward_kl", "soft_ce"):
        assert out == math.inf
    else:
        assert torch.isfinite(out)
    assert torch.isfinite(_grad(out, s)).all()
    s_topk = s.detach().clone()
    s_topk[0, ids[0, 2]] = -math.inf
    s_topk.requires_grad_(True)
    out, _, _ = topk_loss_reference(
        s_topk, TopKTeacher(ids, ell), teacher_normalization="renormalize",
        student_normalization="topk", **opts,
    )  # fmt: skip
    assert torch.isfinite(_grad(out, s_topk)).all()
