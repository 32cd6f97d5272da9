"""KDLoss, kd_loss and FusedLinearKDLoss with a top-k teacher (design.md §4), on every kernel
backend, against the float64 spec (fastkd.topk_loss_reference) and autograd through it.

The spec itself is checked against the peers' formulas in tests/test_topk_reference.py; the
two row kernels against their own oracle in tests/test_topk_compiled.py and
tests/test_topk_triton.py. Here: the whole loss, its gradient, its options and its errors.
"""

from __future__ import annotations

import math

import pytest
import torch
from kd_testing import DTYPES, GRAD_TOL, LOSS_TOL, kernel_targets, record, rel_err

import fastkd
from fastkd import TopKTeacher, topk_loss_reference

DIVERGENCES = sorted(fastkd.DIVERGENCES)

# The conventions of design.md §4 (peers in the comments).
CONVENTIONS = {
    # axolotl's top-k KD
    "renormalize": dict(teacher_normalization="renormalize"),
    # TRL's tail bucket, DistillKit's uniform tail
    "bucket": dict(topk_tail="bucket"),
    # ModelOpt's TopK KL, axolotl's kd_normalize_topk
    "topk-student": dict(teacher_normalization="renormalize", student_normalization="topk"),
    # verl's forward_kl_topk, soft CE over the top-k
    "raw": dict(),
}


def make_teacher(n_rows, V, K, generator, *, pad=True, scale=3.0, dtype=torch.float32):
    """The top-k of a random teacher's log_softmax (K distinct ids a row), with padding: some
    pairs masked out, some -inf, on some rows."""
    t = torch.randn(n_rows, V, generator=generator, dtype=torch.float64) * scale
    top = torch.log_softmax(t, -1).topk(K, -1)
    ids, logprobs = top.indices, top.values.clone()
    # Shuffle the pairs: nothing may assume they come sorted.
    perm = torch.argsort(torch.rand(n_rows, K, generator=generator), -1)
    ids, logprobs = ids.gather(1, perm), logprobs.gather(1, perm)
    mask = None
    if pad and K > 2:
        mask = torch.rand(n_rows, K, generator=generator) > 0.2
        logprobs[0, -1] = -math.inf  # padding by -inf
        ids[0, -1] = -1  # whose id is never read
    return TopKTeacher(ids, logprobs.to(dtype), mask)


def make_labels(n_rows, V, generator):
    labels = torch.randint(0, V, (n_rows,), generator=generator)
    labels[1] = -100
    return labels


def to(teacher: TopKTeacher, device, dtype=None) -> TopKTeacher:
    lp = teacher.logprobs.to(device, dtype or teacher.logprobs.dtype)
    mask = None if teacher.mask is None else teacher.mask.to(device)
    return TopKTeacher(teacher.token_ids.to(device), lp, mask)


def check(student, teacher, labels, backend, generator, **options):
    """fastkd on ``backend`` against the float64 spec: loss and gradient (grad_output != 1),
    design.md §2's tolerances. Returns (loss_err, grad_err)."""
    device = student.device
    s = student.detach().clone().requires_grad_(True)
    out = fastkd.kd_loss(s, to(teacher, device), None if labels is None else labels.to(device),
                         backend=backend, **options)  # fmt: skip
    weight = (
        torch.tensor(3.0, dtype=torch.float64)
        if out.dim() == 0
        else 0.5 + torch.rand(out.shape, generator=generator, dtype=torch.float64)
    )
    (out * weight.to(device, torch.float32)).sum().backward()

    s64 = student.detach().cpu().double().requires_grad_(True)
    ref, _, _ = topk_loss_reference(s64, to(teacher, "cpu", torch.float64), labels, **options)
    (ref * weight).sum().backward()

    assert out.dtype == torch.float32 and s.grad.dtype == student.dtype
    assert torch.isfinite(out).all() and torch.isfinite(s.grad).all()
    loss_err, grad_err = rel_err(out, ref), rel_err(s.grad, s64.grad)
    assert loss_err <= LOSS_TOL, f"loss rel err {loss_err:.3e}"
    assert grad_err <= GRAD_TOL[student.dtype], f"grad rel err {grad_err:.3e}"
    record(f"topk {backend}-{device.type} {str(student.dtype)[6:]}", loss_err, grad_err)
    return loss_err, grad_err


@pytest.fixture
def generator(request):
    return torch.Generator().manual_seed(hash(request.node.name) % 2**31)


@pytest.mark.parametrize("target", kernel_targets())
@pytest.mark.parametrize("convention", list(CONVENTIONS))
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_every_divergence_and_convention(target, convention, divergence, generator):
    backend, device = target
    n_rows, V, K = 6, 96, 12
    student = (torch.randn(n_rows, V, generator=generator) * 4).to(device)
    teacher = make_teacher(n_rows, V, K, generator)
    check(student, teacher, make_labels(n_rows, V, generator), backend, generator,
          divergence=divergence, temperature=2.0, ce_weight=0.3,
          **CONVENTIONS[convention])  # fmt: skip


@pytest.mark.parametrize("target", kernel_targets())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "options",
    [
        dict(divergence="forward_kl", topk_tail="bucket", softcap=20.0),
        dict(divergence="jsd", teacher_normalization="renormalize", temperature=0.7),
        dict(divergence="reverse_kl", teacher_normalization="renormalize",
             teacher_temperature=1.5, temperature=2.0, reduction="none"),
        dict(divergence="tvd", topk_tail="bucket", ce_weight=1.0, reduction="sum"),
    ],
    ids=["fkl-bucket-softcap", "jsd-renorm-T0.7", "rkl-Tg-none", "tvd-bucket-ce-sum"],
)  # fmt: skip
def test_dtypes_and_options(target, dtype, options, generator):
    backend, device = target
    n_rows, V, K = 5, 80, 10
    student = (torch.randn(n_rows, V, generator=generator) * 3).to(dtype).to(device)
    teacher = make_teacher(n_rows, V, K, generator)
    check(student, teacher, make_labels(n_rows, V, generator), backend, generator, **options)


@pytest.mark.parametrize("target", kernel_targets())
@pytest.mark.parametrize("K", [1, 20, 1024])
def test_k(target, K, generator):
    backend, device = target
    n_rows, V = 3, max(2 * K, 64)
    student = (torch.randn(n_rows, V, generator=generator) * 3).to(device)
    teacher = make_teacher(n_rows, V, K, generator, pad=False)
    for options in (dict(topk_tail="bucket"), dict(teacher_normalization="renormalize")):
        check(student, teacher, None, backend, generator, divergence="jsd", **options)


@pytest.mark.parametrize("target", kernel_targets())
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "tvd"])
def test_k_equal_to_v_is_the_dense_loss(target, divergence, generator):
    """Every entry in the support: the dense loss of the teacher's log-probabilities, for
    each convention (no tail is left; renormalising a normalised teacher changes nothing)."""
    backend, device = target
    n_rows, V = 4, 48
    student = (torch.randn(n_rows, V, generator=generator) * 3).to(device)
    t = torch.randn(n_rows, V, generator=generator, dtype=torch.float64) * 3
    log_p = torch.log_softmax(t, -1)
    perm = torch.argsort(torch.rand(n_rows, V, generator=generator), -1)
    teacher = TopKTeacher(perm, log_p.gather(1, perm).float())
    dense, _, _ = fastkd.kd_loss_reference(student.cpu().double(), t, divergence=divergence)
    for options in CONVENTIONS.values():
        loss = fastkd.kd_loss(student, to(teacher, device), backend=backend,
                              divergence=divergence, **options)  # fmt: skip
        assert rel_err(loss, dense) <= 1e-5, options


@pytest.mark.parametrize("target", kernel_targets())
def test_padding_equals_fewer_pairs(target, generator):
    """Pairs padded by mask or by -inf (their ids anything, -1 included) are absent."""
    backend, device = target
    n_rows, V, K = 4, 64, 6
    student = (torch.randn(n_rows, V, generator=generator) * 3).to(device)
    base = make_teacher(n_rows, V, K, generator, pad=False)
    junk_ids = torch.full((n_rows, 3), -1)
    junk_ids[:, 1] = base.token_ids[:, 0]  # a repeat of a real id, in padding only
    padded_mask = TopKTeacher(
        torch.cat([base.token_ids, junk_ids], 1),
        torch.cat([base.logprobs, torch.randn(n_rows, 3, generator=generator)], 1),
        torch.cat([torch.ones(n_rows, K, dtype=torch.bool),
                   torch.zeros(n_rows, 3, dtype=torch.bool)], 1),
    )  # fmt: skip
    padded_inf = TopKTeacher(
        torch.cat([base.token_ids, junk_ids], 1),
        torch.cat([base.logprobs, torch.full((n_rows, 3), -math.inf)], 1),
    )
    for options in CONVENTIONS.values():
        kw = dict(backend=backend, divergence="skew_reverse_kl", reduction="none", **options)
        want = fastkd.kd_loss(student, to(base, device), **kw)
        for padded in (padded_mask, padded_inf):
            got = fastkd.kd_loss(student, to(padded, device), **kw)
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("target", kernel_targets())
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_teacher_holding_all_but_1e9(target, divergence, generator):
    """The teacher's top-k holds all its mass but 1e-9: 1 - sum e^l is rounding in float32,
    the tail is 0 (or its true 1e-9), never NaN, and the loss is the spec's."""
    backend, device = target
    n_rows, V, K = 3, 64, 4
    log_p = torch.full((n_rows, V), math.log(1e-9 / (V - K)), dtype=torch.float64)
    log_p[:, :K] = math.log((1 - 1e-9) / K)
    teacher = TopKTeacher(torch.arange(K).repeat(n_rows, 1), log_p[:, :K].float())
    student = (torch.randn(n_rows, V, generator=generator) * 2).to(device)
    check(student, teacher, None, backend, generator, divergence=divergence, topk_tail="bucket")


@pytest.mark.parametrize("target", kernel_targets())
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_confident_student_tail(target, divergence, generator):
    """The teacher leaves 1e-3 outside its top-k, the student 1e-9: q_tail summed outside S
    keeps its digits (1 - sum_S q would round to 0 or below in float32); loss and gradient
    are finite and the spec's."""
    backend, device = target
    n_rows, V, K = 3, 64, 4
    log_p = torch.full((n_rows, K), math.log((1 - 1e-3) / K))
    teacher = TopKTeacher(torch.arange(K).repeat(n_rows, 1), log_p)
    s = torch.randn(n_rows, V, generator=generator, dtype=torch.float64)
    # sum_{j not in S} e^{s_j} / sum_S e^{s_j} = 1e-9 (up to rounding).
    s[:, K:] += math.log(1e-9 * K / (V - K)) - torch.logsumexp(s[:, K:], -1, keepdim=True) \
        + torch.logsumexp(s[:, :K], -1, keepdim=True) - math.log(K)  # fmt: skip
    student = s.float().to(device)
    loss_err, grad_err = check(student, teacher, None, backend, generator,
                               divergence=divergence, topk_tail="bucket")  # fmt: skip
    assert loss_err <= LOSS_TOL and grad_err <= GRAD_TOL[torch.float32]


@pytest.mark.parametrize("target", kernel_targets())
@pytest.mark.parametrize("reduction", ["mean", "sum", "batchmean", "none"])
def test_reductions_num_items_and_components(target, reduction, generator):
    backend, device = target
    n_rows, V, K = 6, 64, 8
    student = (torch.randn(2, n_rows // 2, V, generator=generator) * 3).to(device)
    teacher = make_teacher(n_rows, V, K, generator)
    teacher = TopKTeacher(teacher.token_ids.view(2, 3, K), teacher.logprobs.view(2, 3, K),
                          teacher.mask.view(2, 3, K))  # fmt: skip
    labels = make_labels(n_rows, V, generator).view(2, 3)
    options = dict(reduction=reduction, ce_weight=0.5, kd_weight=0.7, topk_tail="bucket")
    check(student, teacher, labels, backend, generator, **options)
    out = fastkd.kd_loss(student, to(teacher, device), labels.to(device), backend=backend,
                         return_components=True, **options)  # fmt: skip
    torch.testing.assert_close(out.loss, 0.7 * out.kd_loss + 0.5 * out.ce_loss)
    if reduction == "mean":
        got = fastkd.kd_loss(student, to(teacher, device), labels.to(device), backend=backend,
                             num_items_in_batch=7, **options)  # fmt: skip
        total = fastkd.kd_loss(student, to(teacher, device), labels.to(device), backend=backend,
                               **{**options, "reduction": "sum"})  # fmt: skip
        torch.testing.assert_close(got, total / 7)


@pytest.mark.parametrize("target", kernel_targets())
@pytest.mark.parametrize("dtype", DTYPES)
def test_inplace_backward(target, dtype, generator):
    backend, device = target
    n_rows, V, K = 5, 64, 8
    base = (torch.randn(n_rows, V, generator=generator) * 3).to(dtype).to(device)
    teacher = to(make_teacher(n_rows, V, K, generator), device)
    labels = make_labels(n_rows, V, generator).to(device)
    options = dict(backend=backend, divergence="jsd", ce_weight=0.4, softcap=15.0,
                   topk_tail="bucket")  # fmt: skip
    leaf = base.clone().requires_grad_(True)
    fastkd.kd_loss(leaf, teacher, labels, **options).backward()
    leaf2 = base.clone().requires_grad_(True)
    logits = leaf2 * 1.0  # a non-leaf the in-place op may overwrite
    fastkd.kd_loss(logits, teacher, labels, inplace_backward=True, **options).backward()
    torch.testing.assert_close(leaf2.grad, leaf.grad, rtol=0, atol=0)


@pytest.mark.parametrize("target", kernel_targets())
def test_torch_compile_fullgraph(target, generator):
    backend, device = target
    n_rows, V, K = 4, 64, 8
    student = (torch.randn(n_rows, V, generator=generator) * 3).to(device)
    teacher = to(make_teacher(n_rows, V, K, generator), device)
    labels = make_labels(n_rows, V, generator).to(device)
    loss_fn = fastkd.KDLoss("forward_kl", backend=backend, ce_weight=0.2, topk_tail="bucket")

    def step(s, ids, logprobs, mask, labels):
        return loss_fn(s, TopKTeacher(ids, logprobs, mask), labels)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    s1 = student.clone().requires_grad_(True)
    s2 = student.clone().requires_grad_(True)
    eager = step(s1, teacher.token_ids, teacher.logprobs, teacher.mask, labels)
    eager.backward()
    got = compiled(s2, teacher.token_ids, teacher.logprobs, teacher.mask, labels)
    got.backward()
    torch.testing.assert_close(got, eager)
    torch.testing.assert_close(s2.grad, s1.grad)


@pytest.mark.parametrize("target", kernel_targets())
def test_opcheck(target, generator):
    from fastkd._config import KDConfig

    backend, device = target
    n_rows, V, K = 4, 32, 5
    student = (torch.randn(n_rows, V, generator=generator) * 3).to(device).requires_grad_(True)
    teacher = to(make_teacher(n_rows, V, K, generator), device)
    labels = make_labels(n_rows, V, generator).to(device)
    config = KDConfig.from_options("jsd", backend=backend, ce_weight=0.3, topk_tail="bucket")
    args = (student, teacher.token_ids, teacher.logprobs, teacher.mask, labels, None, True,
            *config.to_op_args())  # fmt: skip
    # Not test_aot_dispatch_dynamic: the backward scales the stored gradient (an output of
    # the forward) in place, which AOT dispatch's output checks refuse (the dense op as
    # well); torch.compile runs the op end to end in test_torch_compile_fullgraph.
    torch.library.opcheck(
        torch.ops.fastkd.topk_kd_loss.default, args,
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )  # fmt: skip


@pytest.mark.parametrize("target", kernel_targets())
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_linear(target, reduction, generator):
    """FusedLinearKDLoss(teacher=TopKTeacher) equals the spec on h @ W.T, in value and in the
    gradients of the hidden states and the weight, over several chunks."""
    backend, device = target
    n_rows, H, V, K = 10, 16, 72, 9
    h = torch.randn(n_rows, H, generator=generator).to(device)
    W = (torch.randn(V, H, generator=generator) * 0.5).to(device)
    teacher = make_teacher(n_rows, V, K, generator)
    labels = make_labels(n_rows, V, generator)
    options = dict(divergence="reverse_kl", topk_tail="bucket", ce_weight=0.3, temperature=1.5,
                   reduction=reduction)  # fmt: skip
    hh, WW = h.clone().requires_grad_(True), W.clone().requires_grad_(True)
    loss_fn = fastkd.FusedLinearKDLoss(chunk_size=4, backend=backend, **options)
    out = loss_fn(hh, WW, labels=labels.to(device), teacher=to(teacher, device))
    weight = 0.5 + torch.rand(out.shape, generator=generator, dtype=torch.float64)
    (out * weight.to(device, torch.float32)).sum().backward()
    h64, W64 = h.cpu().double().requires_grad_(True), W.cpu().double().requires_grad_(True)
    ref, _, _ = topk_loss_reference(h64 @ W64.T, to(teacher, "cpu", torch.float64), labels,
                                    **options)  # fmt: skip
    (ref * weight).sum().backward()
    assert rel_err(out, ref) <= LOSS_TOL
    assert rel_err(hh.grad, h64.grad) <= GRAD_TOL[torch.float32]
    assert rel_err(WW.grad, W64.grad) <= GRAD_TOL[torch.float32]


def test_fused_linear_takes_one_teacher():
    h, W = torch.randn(3, 4), torch.randn(10, 4)
    teacher = TopKTeacher(torch.tensor([[1, 2]] * 3), torch.full((3, 2), -1.0))
    loss_fn = fastkd.FusedLinearKDLoss()
    with pytest.raises(ValueError, match="teacher_hidden"):
        loss_fn(h, W, h, teacher=teacher)
    with pytest.raises(TypeError, match="teacher_hidden and teacher_weight"):
        loss_fn(h, W)
    with pytest.raises(TypeError, match="TopKTeacher"):
        loss_fn(h, W, teacher=torch.randn(3, 10))


# --- bad input: a clear error naming the argument, before any kernel runs ------------------


@pytest.fixture
def no_kernel(monkeypatch):
    """Every row kernel raises: an error must come before any of them runs."""

    def refuse(*args, **kwargs):
        raise AssertionError("a kernel ran before the error")

    from fastkd import _backends

    monkeypatch.setattr(_backends, "row_kernel", refuse)
    monkeypatch.setattr(_backends, "topk_kernels", refuse)


def _teacher(ids, logprobs=None, mask=None):
    ids = torch.as_tensor(ids)
    if logprobs is None:
        logprobs = torch.full(ids.shape, -2.0)
    return TopKTeacher(ids, logprobs, mask)


@pytest.mark.parametrize(
    "teacher, options, error, match",
    [
        (lambda: _teacher([[1, 12], [0, 1]]), {}, ValueError, r"token_ids must lie in \[0, 10\)"),
        (lambda: _teacher([[1, -3], [0, 1]]), {}, ValueError, r"token_ids must lie in"),
        (lambda: _teacher([[1, 1], [0, 1]]), {}, ValueError, "distinct"),
        (lambda: _teacher(torch.arange(11).repeat(2, 1)), {}, ValueError, "K = 11"),
        (lambda: _teacher([[1, 2, 3]]), {}, ValueError, "leading shape"),
        (lambda: _teacher([[1.0, 2.0], [0.0, 1.0]]), {}, TypeError, "token_ids must be an integer"),
        (lambda: _teacher([[1, 2], [0, 1]], torch.ones(2, 2, dtype=torch.int64)), {}, TypeError,
         "logprobs must be a floating-point"),
        (lambda: _teacher([[1, 2], [0, 1]], mask=torch.ones(2, 2)), {}, TypeError,
         "mask must be a bool"),
        (lambda: _teacher([[1, 2], [0, 1]]), dict(teacher_normalization="renormalize",
         topk_tail="bucket"), ValueError, "topk_tail='bucket' needs teacher_normalization='raw'"),
        (lambda: _teacher([[1, 2], [0, 1]]), dict(teacher_temperature=2.0, topk_tail="bucket",
         teacher_normalization="raw"), ValueError, "teacher_temperature=2.0"),
        (lambda: _teacher([[1, 2], [0, 1]]), dict(teacher_temperature=2.0), ValueError,
         "teacher_temperature=2.0"),
        (lambda: _teacher([[1, 2], [0, 1]]), dict(student_normalization="all"), ValueError,
         "student_normalization must be one of"),
        (lambda: _teacher([[1, 2], [0, 1]]), dict(topk_tail="bucket",
         student_normalization="topk"), ValueError, "needs student_normalization='full'"),
        (lambda: _teacher([[1, 2], [0, 1]]), dict(teacher_temperature=-1.0), ValueError,
         "teacher_temperature must be"),
    ],
)  # fmt: skip
def test_bad_input_is_named(teacher, options, error, match, no_kernel):
    student = torch.randn(2, 10, requires_grad=True)
    with pytest.raises(error, match=match):
        fastkd.kd_loss(student, teacher(), backend="torch", **options)
    with pytest.raises(error, match=match):
        fastkd.KDLoss(**options)(student, teacher())


def test_topk_options_need_a_topk_teacher(no_kernel):
    s, t = torch.randn(2, 10), torch.randn(2, 10)
    with pytest.raises(ValueError, match="topk_tail is an option of top-k teachers"):
        fastkd.kd_loss(s, t, topk_tail="bucket")
    with pytest.raises(ValueError, match="teacher_temperature is an option of top-k"):
        fastkd.KDLoss(teacher_temperature=1.0)(s, t)


def test_float64_runs_the_spec():
    g = torch.Generator().manual_seed(3)
    student = torch.randn(4, 30, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = make_teacher(4, 30, 5, g, dtype=torch.float64)
    loss = fastkd.kd_loss(student, teacher, topk_tail="bucket")
    ref, _, _ = topk_loss_reference(student, teacher, topk_tail="bucket")
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, ref, rtol=0, atol=0)
