"""KDLoss through the kernel backends against the float64 reference (design.md §1-2)."""

import zlib

import pytest
import torch
from kd_testing import (
    DTYPES,
    GRAD_TOL,
    LOSS_TOL,
    check_against_reference,
    half_grad_ulps,
    half_ulps_allowed,
    kernel_targets,
    make_labels,
    make_logits,
    rel_err,
)

import fastkd

DIVERGENCES = list(fastkd.DIVERGENCES)
# 2-D with an odd V, 3-D (B, S, V), and a single-block V that is not a power of two.
SHAPES = [(5, 37), (2, 3, 50)]


def _generator(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


@pytest.fixture(params=kernel_targets())
def target(request):
    return request.param


@pytest.mark.parametrize("label_mode", ["none", "some", "all"])
@pytest.mark.parametrize("reduction", fastkd.REDUCTIONS)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_matrix(target, divergence, dtype, temperature, reduction, label_mode):
    backend, device = target
    key = (divergence, dtype, temperature, reduction, label_mode)
    gen = _generator(*key)
    shape = SHAPES[zlib.crc32(repr(key).encode()) % len(SHAPES)]
    s = make_logits(shape, dtype, device, gen)
    t = make_logits(shape, dtype, device, gen)
    labels = make_labels(shape[:-1], shape[-1], label_mode, gen, device)
    options = dict(divergence=divergence, temperature=temperature, reduction=reduction)
    if label_mode == "all":
        s = s.detach().requires_grad_(True)
        out = fastkd.kd_loss(s, t, labels, backend=backend, **options)
        out.sum().backward()
        assert torch.count_nonzero(out) == 0 and torch.count_nonzero(s.grad) == 0
        assert not torch.isnan(out).any()
        return
    check_against_reference(s, t, labels, backend, gen, **options)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.5])
@pytest.mark.parametrize("ignore_index", [-100, -1])
def test_ignore_index_and_temperature_with_ce(target, ignore_index, temperature):
    """The axes the matrix leaves out, on every divergence: an ignore_index other than -100,
    and T < 1 with CE mixed in (CE is at T = 1 whatever T is). Measured on mutated kernels:
    Triton comparing labels with -100 instead of ignore_index, loss rel err 0.44-4.9 at
    ignore_index = -1; the C++ kernel taking CE's lse from the logits at T when T < 1, 0.34
    and 0.72 at T = 0.5."""
    backend, device = target
    for divergence in DIVERGENCES:
        gen = _generator("ignore-T", divergence, ignore_index, temperature)
        s = make_logits((4, 37), torch.float32, device, gen)
        t = make_logits((4, 37), torch.float32, device, gen)
        labels = make_labels((4,), 37, "some", gen, device, ignore_index=ignore_index)
        check_against_reference(
            s, t, labels, backend, gen, divergence=divergence, temperature=temperature,
            ignore_index=ignore_index, ce_weight=0.4, kd_weight=0.8,
        )  # fmt: skip


@pytest.mark.parametrize(
    "shape", [(3, 1), (4, 7), (2, 1000), (3, 5000), (2, 32003), (2, 128256)], ids=str
)
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "tvd"])
def test_vocab_sizes(target, divergence, shape):
    """V = 1, a tiny odd V, and V spanning several vocabulary blocks."""
    backend, device = target
    gen = _generator("vocab", divergence, shape)
    s = make_logits(shape, torch.float32, device, gen)
    t = make_logits(shape, torch.float32, device, gen)
    labels = make_labels(shape[:-1], shape[-1], "some", gen, device)
    check_against_reference(
        s, t, labels, backend, gen, divergence=divergence, temperature=2.0, ce_weight=0.5
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_ce_mixing_and_softcap(target, divergence, dtype):
    backend, device = target
    gen = _generator("mix", divergence, dtype)
    shape = (2, 4, 41)
    s = make_logits(shape, dtype, device, gen, scale=20.0)
    t = make_logits(shape, dtype, device, gen, scale=20.0)
    labels = make_labels(shape[:-1], shape[-1], "some", gen, device)
    check_against_reference(
        s,
        t,
        labels,
        backend,
        gen,
        divergence=divergence,
        temperature=1.7,
        softcap=15.0,
        kd_weight=0.6,
        ce_weight=0.4,
        reduction="mean",
    )


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("scale_t2", [True, False])
def test_options_without_t2_and_with_num_items(target, divergence, scale_t2):
    backend, device = target
    gen = _generator("t2", divergence, scale_t2)
    s = make_logits((6, 29), torch.float32, device, gen)
    t = make_logits((6, 29), torch.float32, device, gen)
    labels = make_labels((6,), 29, "some", gen, device)
    check_against_reference(
        s,
        t,
        labels,
        backend,
        gen,
        divergence=divergence,
        temperature=3.0,
        scale_by_temperature_squared=scale_t2,
        num_items_in_batch=11,
        ce_weight=1.0,
        beta=0.3,
        alpha=0.25,
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_extreme_logits(target, divergence, dtype):
    """Logits of magnitude 1e4: finite, and still within tolerance."""
    backend, device = target
    gen = _generator("extreme", divergence, dtype)
    sign = lambda: torch.randint(0, 2, (4, 33), generator=gen).double() * 2 - 1  # noqa: E731
    s = (sign() * 1e4 * (0.5 + torch.rand(4, 33, generator=gen, dtype=torch.float64))).to(dtype)
    t = (sign() * 1e4 * (0.5 + torch.rand(4, 33, generator=gen, dtype=torch.float64))).to(dtype)
    labels = make_labels((4,), 33, "some", gen, "cpu")
    check_against_reference(
        s.to(device),
        t.to(device),
        labels.to(device),
        backend,
        gen,
        divergence=divergence,
        temperature=1.0,
        ce_weight=0.5,
    )


@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_mostly_masked_vocabulary(target, divergence, softcap):
    """Rows where most entries are -inf (a masked vocabulary), the same mask for both."""
    backend, device = target
    gen = _generator("masked", divergence, softcap)
    shape = (5, 300)
    s = make_logits(shape, torch.float32, device, gen)
    t = make_logits(shape, torch.float32, device, gen)
    masked = torch.rand(shape, generator=gen) < 0.9
    masked[:, :2] = False  # a few live entries in every row, the labels among them
    s = s.masked_fill(masked.to(device), float("-inf"))
    t = t.masked_fill(masked.to(device), float("-inf"))
    labels = torch.randint(0, 2, (5,), generator=gen).to(device)
    check_against_reference(
        s,
        t,
        labels,
        backend,
        gen,
        divergence=divergence,
        temperature=2.0,
        softcap=softcap,
        ce_weight=0.3,
    )


def test_drop_in_kl_div_formula(target):
    """The formula people write today, F.kl_div batchmean times T^2, on the kernel backend."""
    backend, device = target
    gen = _generator("kl_div")
    T = 2.0
    s = make_logits((7, 64), torch.float32, device, gen).requires_grad_(True)
    t = make_logits((7, 64), torch.float32, device, gen)
    ours = fastkd.KDLoss("forward_kl", temperature=T, reduction="batchmean", backend=backend)
    loss = ours(s, t)
    (g,) = torch.autograd.grad(loss, s)
    s_ref = s.detach().clone().requires_grad_(True)
    ref = (
        torch.nn.functional.kl_div(
            torch.log_softmax(s_ref / T, -1), torch.softmax(t / T, -1), reduction="batchmean"
        )
        * T**2
    )
    (g_ref,) = torch.autograd.grad(ref, s_ref)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_grad_output_one_and_accumulation(target, reduction):
    """grad_output == 1 takes the skip path of the backward; a second loss accumulates."""
    backend, device = target
    gen = _generator("go1", reduction)
    s = make_logits((4, 21), torch.float32, device, gen).requires_grad_(True)
    t = make_logits((4, 21), torch.float32, device, gen)
    loss = fastkd.kd_loss(s, t, divergence="jsd", reduction=reduction, backend=backend)
    loss.sum().backward()
    first = s.grad.clone()
    loss = fastkd.kd_loss(s, t, divergence="jsd", reduction=reduction, backend=backend)
    (loss.sum() * 0.5).backward()
    s64 = s.detach().cpu().double().requires_grad_(True)
    ref, _, _ = fastkd.kd_loss_reference(
        s64, t.cpu().double(), divergence="jsd", reduction=reduction
    )
    ref.sum().backward()
    torch.testing.assert_close(first.cpu().double(), s64.grad, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(s.grad.cpu().double(), 1.5 * s64.grad, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("divergence", ["forward_kl", "skew_reverse_kl"])
def test_inplace_backward(target, divergence):
    """The gradient is written over the student logits and flows on through the graph."""
    backend, device = target
    gen = _generator("inplace", divergence)
    x = make_logits((6, 16), torch.float32, device, gen).requires_grad_(True)
    w = make_logits((45, 16), torch.float32, device, gen).mul_(0.3).requires_grad_(True)
    t = make_logits((6, 45), torch.float32, device, gen)
    labels = make_labels((6,), 45, "some", gen, device)
    opts = dict(divergence=divergence, temperature=2.0, ce_weight=0.5, backend=backend)

    logits = x @ w.T
    loss = fastkd.kd_loss(logits, t, labels, inplace_backward=True, **opts)
    (loss * 2).backward()
    x64 = x.detach().cpu().double().requires_grad_(True)
    w64 = w.detach().cpu().double().requires_grad_(True)
    opts.pop("backend")
    ref, _, _ = fastkd.kd_loss_reference(x64 @ w64.T, t.cpu().double(), labels.cpu(), **opts)
    (ref * 2).backward()
    torch.testing.assert_close(loss.cpu().double(), ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(x.grad.cpu().double(), x64.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(w.grad.cpu().double(), w64.grad, rtol=1e-4, atol=1e-7)
    # The student logits now hold dloss/dlogits (times grad_output 2).
    logits64 = (x64 @ w64.T).detach().requires_grad_(True)
    ref2, _, _ = fastkd.kd_loss_reference(logits64, t.cpu().double(), labels.cpu(), **opts)
    (g,) = torch.autograd.grad(ref2 * 2, logits64)
    torch.testing.assert_close(logits.detach().cpu().double(), g, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("leaf", ["requires_grad", "parameter"])
def test_inplace_backward_refuses_a_leaf(target, leaf):
    """PyTorch refuses in-place operations on a leaf that requires grad; so does
    inplace_backward, before anything is written (the leaf keeps its values)."""
    backend, device = target
    gen = _generator("inplace-leaf", leaf)
    s = make_logits((3, 2, 19), torch.bfloat16, device, gen)
    t = make_logits((3, 2, 19), torch.bfloat16, device, gen)
    before = s.clone()
    s = torch.nn.Parameter(s) if leaf == "parameter" else s.requires_grad_(True)
    with pytest.raises(ValueError, match="leaf tensor that requires grad"):
        fastkd.kd_loss(s, t, divergence="tvd", inplace_backward=True, backend=backend)
    assert torch.equal(s.detach(), before)
    # Without a gradient to compute nothing is written, so a leaf is fine there.
    with torch.no_grad():
        loss = fastkd.kd_loss(s, t, divergence="tvd", inplace_backward=True, backend=backend)
    ref, _, _ = fastkd.kd_loss_reference(before.cpu().double(), t.cpu().double(), divergence="tvd")
    torch.testing.assert_close(loss.cpu().double(), ref, rtol=1e-5, atol=0)


@pytest.mark.parametrize("layout", ["teacher-is-student", "disjoint-rows"])
def test_inplace_backward_with_a_teacher_in_the_same_storage(target, layout):
    """Sharing memory is fine when the teacher is the student's own view (each entry is read
    before its gradient overwrites it) or lies in other rows of the storage."""
    backend, device = target
    gen = _generator("inplace-shared", layout)
    leaf = make_logits((8, 33), torch.float32, device, gen).requires_grad_(True)
    if layout == "teacher-is-student":
        s, rows = leaf * 1.0, slice(0, 8)
        t = s.detach()
    else:
        both = leaf * 1.0
        s, t, rows = both[:4], both[4:].detach(), slice(0, 4)
    # With teacher == student the divergence is 0: the hard-label CE carries the check.
    labels = make_labels(s.shape[:-1], 33, "some", gen, device)
    opts = dict(divergence="jsd", ce_weight=0.5)
    s64 = s.detach().cpu().double().requires_grad_(True)
    t64 = t.cpu().double()  # a copy: the call may overwrite t
    loss = fastkd.kd_loss(s, t, labels, inplace_backward=True, backend=backend, **opts)
    loss.backward()
    ref, _, _ = fastkd.kd_loss_reference(s64, t64, labels.cpu(), **opts)
    ref.backward()
    torch.testing.assert_close(loss.cpu().double(), ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(leaf.grad[rows].cpu().double(), s64.grad, rtol=1e-4, atol=1e-8)
    assert torch.count_nonzero(leaf.grad[rows.stop :]) == 0


BAD_ROWS = {
    "nan-student": ("s", 5, float("nan")),
    "nan-teacher": ("t", 5, float("nan")),
    "inf-student": ("s", 5, float("inf")),
    "inf-teacher": ("t", 5, float("inf")),
    "masked-student": ("s", slice(None), float("-inf")),
    "masked-teacher": ("t", slice(None), float("-inf")),
}


def _bad_rows(target, divergence, case):
    """(s, t, labels, options): rows 1 and 3 made bad as BAD_ROWS[case] says; row 3 is
    ignored through its label."""
    backend, device = target
    gen = _generator("no-distribution", divergence, case)
    s = make_logits((4, 40), torch.float32, device, gen)
    t = make_logits((4, 40), torch.float32, device, gen)
    labels = torch.tensor([3, 11, 0, -100], device=device)
    which, cols, value = BAD_ROWS[case]
    for row in (1, 3):
        (s if which == "s" else t)[row, cols] = value
    opts = dict(divergence=divergence, temperature=2.0, ce_weight=0.5, reduction="none")
    return s, t, labels, opts


def _bad_row_params():
    targets = [*kernel_targets(), pytest.param(("torch", "cpu"), id="torch-cpu")]
    return [
        pytest.param(target.values[0], divergence, case, marks=target.marks,
                     id=f"{target.id}-{divergence}-{case}")
        for target in targets
        for divergence in DIVERGENCES
        for case in BAD_ROWS
    ]  # fmt: skip


@pytest.mark.parametrize("target,divergence,case", _bad_row_params())
def test_a_row_without_a_distribution_is_nan(target, divergence, case):
    """A NaN or +inf logit, or a row of -inf only, makes that row's loss and gradient NaN in
    the kernels and the reference alike; the other rows keep their values: those of the
    reference run on them alone (an oracle that never sees the bad rows)."""
    backend, device = target
    s, t, labels, opts = _bad_rows(target, divergence, case)
    s.requires_grad_(True)
    out = fastkd.kd_loss(s, t, labels, backend=backend, **opts)
    out.backward(torch.ones_like(out))
    ref, _, _ = fastkd.kd_loss_reference(s.detach().cpu().double(), t.cpu().double(),
                                         labels.cpu(), **opts)  # fmt: skip

    assert torch.isnan(ref[1]) and torch.isnan(out[1]), (ref, out)
    assert torch.isnan(s.grad[1]).all(), s.grad[1]
    assert out[3] == 0
    good = [0, 2]
    s_good = s.detach()[good].cpu().double().requires_grad_(True)
    ref_good, _, _ = fastkd.kd_loss_reference(
        s_good, t[good].cpu().double(), labels[good].cpu(), **opts
    )
    ref_good.backward(torch.ones_like(ref_good))
    loss_err, grad_err = rel_err(out[good], ref_good), rel_err(s.grad[good], s_good.grad)
    assert loss_err <= LOSS_TOL, f"loss rel err {loss_err:.3e}"
    assert grad_err <= GRAD_TOL[torch.float32], f"grad rel err {grad_err:.3e}"


@pytest.mark.parametrize(
    "target",
    [*kernel_targets(),
     pytest.param(("torch", "cpu"), id="torch-cpu")],
)  # fmt: skip
def test_an_ignored_row_has_zero_gradient_whatever_its_logits(target):
    """design.md §1: a row whose label is ignore_index has L = 0 and a zero gradient row,
    also when its logits are NaN, +inf or all -inf (every case, two divergences: a kernel
    skips the row whatever its divergence)."""
    backend, _ = target
    for divergence in ("reverse_kl", "jsd"):
        for case in BAD_ROWS:
            s, t, labels, opts = _bad_rows(target, divergence, case)
            s.requires_grad_(True)
            out = fastkd.kd_loss(s, t, labels, backend=backend, **opts)
            out.backward(torch.ones_like(out))
            assert out[3] == 0, (divergence, case, out)
            nonzero = torch.count_nonzero(s.grad[3]).item()
            assert nonzero == 0, f"{divergence} {case}: {nonzero} of 40 entries not 0"


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "batchmean"])
def test_float16_gradient_under_a_loss_scale(target, reduction, inplace):
    """fp16 training: a GradScaler's grad_output (2^16) after a mean over many items. The
    float16 gradient keeps the reduction's factor for the backward, so its small entries are
    not flushed to zero before the loss scale lifts them."""
    backend, device = target
    gen = _generator("fp16-loss-scale", reduction, inplace)
    # mean over the 65536 tokens of an accumulated batch; batchmean of one 1-D row (/ V).
    shape = (64, 1024) if reduction == "mean" else (32768,)
    s = make_logits(shape, torch.float16, device, gen)
    t = make_logits(shape, torch.float16, device, gen)
    opts = dict(divergence="jsd", temperature=2.0, reduction=reduction)
    if reduction == "mean":
        opts["num_items_in_batch"] = 65536
    s64 = s.cpu().double().requires_grad_(True)  # before s may hold its gradient
    s.requires_grad_(True)
    # s * 1: a model's logits are no leaf (inplace_backward refuses one); exact in float16.
    loss = fastkd.kd_loss(s * 1, t, backend=backend, inplace_backward=inplace, **opts)
    (loss * 65536.0).backward()
    ref, _, _ = fastkd.kd_loss_reference(s64, t.cpu().double(), **opts)
    (ref * 65536.0).backward()
    torch.testing.assert_close(loss.cpu().double(), ref, rtol=1e-5, atol=0)
    grad_err = rel_err(s.grad, s64.grad)
    assert grad_err <= GRAD_TOL[torch.float16], f"grad rel err {grad_err:.3e}"
    # Entry by entry: a gradient flushed to 0 or off by a factor is many ulps off.
    scale = torch.tensor(65536.0, dtype=torch.float64)
    worst = half_grad_ulps(s.grad, s64.grad, s.detach(), t, None, scale, **opts)
    assert worst <= half_ulps_allowed(backend, device, torch.float16), f"{worst:.2f} ulps"


def test_no_grad_computes_loss_only(target, monkeypatch):
    """Without a gradient to compute, the kernel gets no gradient buffer."""
    backend, device = target
    gen = _generator("nograd")
    s = make_logits((4, 30), torch.float32, device, gen)
    t = make_logits((4, 30), torch.float32, device, gen)
    seen = []
    from fastkd import _backends

    real = _backends.row_kernel(backend)

    def spy(name, topk=False):
        row_kernel, scale_rows = real
        return (lambda rows: seen.append(rows.grad is None) or row_kernel(rows)), scale_rows

    monkeypatch.setattr(_backends, "row_kernel", spy)
    ref, _, _ = fastkd.kd_loss_reference(s.cpu().double(), t.cpu().double(), divergence="jsd")
    plain = fastkd.kd_loss(s, t, divergence="jsd", backend=backend)
    with torch.no_grad():
        nograd = fastkd.kd_loss(s.requires_grad_(True), t, divergence="jsd", backend=backend)
    assert seen == [True, True]
    for out in (plain, nograd):
        torch.testing.assert_close(out.cpu().double(), ref, rtol=1e-5, atol=0)


def test_teacher_gets_no_gradient(target):
    backend, device = target
    gen = _generator("teacher")
    s = make_logits((4, 30), torch.float32, device, gen).requires_grad_(True)
    t = make_logits((4, 30), torch.float32, device, gen).requires_grad_(True)
    fastkd.kd_loss(s, t, divergence="reverse_kl", backend=backend).backward()
    assert t.grad is None and s.grad is not None


def test_components(target):
    """loss == kd_weight * kd_loss + ce_weight * ce_loss, each like the reference's."""
    backend, device = target
    gen = _generator("components")
    s = make_logits((2, 5, 23), torch.float32, device, gen).requires_grad_(True)
    t = make_logits((2, 5, 23), torch.float32, device, gen)
    labels = make_labels((2, 5), 23, "some", gen, device)
    opts = dict(divergence="skew_forward_kl", temperature=2.0, kd_weight=0.7, ce_weight=0.3)
    out = fastkd.kd_loss(s, t, labels, backend=backend, return_components=True, **opts)
    ref = fastkd.kd_loss_reference(
        s.detach().cpu().double(), t.cpu().double(), labels.cpu(), **opts
    )
    for got, want in zip(out, ref):
        torch.testing.assert_close(got.cpu().double(), want, rtol=1e-5, atol=0)
    assert not out.kd_loss.requires_grad and out.loss.requires_grad
    plain = fastkd.kd_loss(s, t, labels, backend=backend, return_components=True, divergence="jsd")
    assert plain.ce_loss is None


@pytest.mark.parametrize("reduction", fastkd.REDUCTIONS)
def test_empty_batch(target, reduction):
    backend, device = target
    s = torch.randn(0, 17, device=device, requires_grad=True)
    t = torch.randn(0, 17, device=device)
    out = fastkd.kd_loss(s, t, reduction=reduction, backend=backend)
    if reduction == "none":
        assert out.shape == (0,)
    else:
        assert out.shape == () and out.item() == 0.0
    out.sum().backward()
    assert s.grad.shape == (0, 17)


def test_row_strides(target):
    """Last-dim-contiguous rows with any row stride, student and teacher strided differently."""
    backend, device = target
    gen = _generator("strides")
    big_s = make_logits((6, 80), torch.float32, device, gen)
    big_t = make_logits((3, 6, 50), torch.float32, device, gen)
    s, t = big_s[:, 10:50], big_t[1, :, 5:45]
    assert s.stride() == (80, 1) and t.stride() == (50, 1)
    labels = make_labels((6, 2), 40, "some", gen, device)[:, 1]  # strided labels too
    assert labels.stride() == (2,)
    check_against_reference(s, t, labels, backend, gen, divergence="reverse_kl", ce_weight=0.2)
    transposed = make_logits((40, 6), torch.float32, device, gen).T  # stride(-1) != 1: copied
    check_against_reference(transposed, t, labels, backend, gen, divergence="forward_kl")


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8], ids=str)
def test_narrow_integer_labels(target, dtype):
    """Any integer labels, in the kernels and in the torch backend (int64 inside)."""
    backend, device = target
    gen = _generator("labels", dtype)
    s = make_logits((5, 31), torch.float32, device, gen)
    t = make_logits((5, 31), torch.float32, device, gen)
    labels = make_labels((5,), 31, "some" if dtype.is_signed else "none", gen, device)
    if labels is None:
        labels = torch.randint(0, 31, (5,), generator=gen).to(device)
    labels = labels.to(dtype)
    for name in (backend, "torch"):
        check_against_reference(s, t, labels, name, gen, divergence="soft_ce", ce_weight=1.0)


def test_module_matches_functional(target):
    backend, device = target
    gen = _generator("module")
    s = make_logits((4, 25), torch.float16, device, gen)
    t = make_logits((4, 25), torch.float16, device, gen)
    opts = dict(divergence="jsd", temperature=1.5, beta=0.2, reduction="sum", backend=backend)
    module = fastkd.KDLoss(**opts)
    assert "jsd" in repr(module)
    torch.testing.assert_close(module(s, t), fastkd.kd_loss(s, t, **opts), rtol=0, atol=0)
    opts.pop("backend")
    ref, _, _ = fastkd.kd_loss_reference(s.cpu().double(), t.cpu().double(), **opts)
    assert rel_err(module(s, t), ref) <= LOSS_TOL


@pytest.mark.parametrize("inplace", [False, True])
def test_second_backward_raises(target, inplace):
    """The stored gradient is scaled in place by the backward: a second backward through the
    same graph must fail loudly, not return a gradient scaled twice."""
    backend, device = target
    gen = _generator("twice", inplace)
    s = make_logits((3, 11), torch.float32, device, gen).requires_grad_(True)
    t = make_logits((3, 11), torch.float32, device, gen)
    loss = fastkd.kd_loss(s * 1.0, t, backend=backend, inplace_backward=inplace)
    (loss * 2).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="a second backward through one KDLoss call"):
        loss.backward()


@pytest.mark.parametrize("inplace", [False, True])
def test_double_backward_raises(target, inplace):
    """The gradient is made in the forward, so it has no graph of its own: create_graph=True
    must fail loudly rather than give a Hessian without the loss's part."""
    backend, device = target
    gen = _generator("create-graph", inplace)
    x = make_logits((3, 11), torch.float32, device, gen).requires_grad_(True)
    t = make_logits((3, 11), torch.float32, device, gen)
    loss = fastkd.kd_loss(x * 1.0, t, backend=backend, inplace_backward=inplace)
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(loss, x, create_graph=True)


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_offsets_past_2_31(target, divergence):
    """N * V > 2^31 (16.4k tokens x 131k vocab): row offsets must be 64-bit."""
    backend, device = target
    if device != "cuda":
        pytest.skip("needs a GPU: 2^31 elements are too many for the Triton interpreter")
    N, V = 16400, 131072
    assert N * V > 2**31
    gen = torch.Generator(device=device).manual_seed(0)
    s = torch.randn(N, V, device=device, dtype=torch.bfloat16, generator=gen).requires_grad_()
    t = torch.randn(N, V, device=device, dtype=torch.bfloat16, generator=gen)
    loss = fastkd.kd_loss(s, t, divergence=divergence, reduction="none", backend=backend)
    loss.sum().backward()
    rows = [0, N // 2, N - 1]
    s64 = s.detach()[rows].double().requires_grad_(True)
    ref, _, _ = fastkd.kd_loss_reference(
        s64, t[rows].double(), divergence=divergence, reduction="none"
    )
    ref.sum().backward()
    torch.testing.assert_close(loss[rows].double(), ref, rtol=1e-5, atol=0)
    assert (s.grad[rows].double() - s64.grad).norm() <= 1e-2 * s64.grad.norm()
