"""``vocab_size`` (design.md §5): logits (or LM heads) wider than the vocabulary, padding
ignored as if -inf, read in place, with a gradient of exactly 0.

The oracle is always the float64 spec run on the truncated inputs ``s[..., :V]``,
``t[..., :V]`` (the heads' first V rows), which knows nothing of ``vocab_size``, and
autograd through it; the expected gradient of the padding is 0. The padding columns hold
+30, far above the real logits, so that any of their mass that leaks in shows.
"""

from __future__ import annotations

import zlib

import pytest
import torch
from kd_testing import GRAD_TOL, LOSS_TOL, grad_weight, kernel_targets, rel_err

import fastkd
from fastkd import TopKTeacher, _backends

PAD = 30.0
V = 37

TARGETS = [pytest.param(("torch", "cpu"), id="torch-cpu"), *kernel_targets()]


@pytest.fixture(params=TARGETS)
def target(request):
    return request.param


def _gen(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def padded_logits(lead, width, gen, dtype=torch.float32):
    """randn x 3 in the first V columns, PAD past them; rounded to dtype."""
    x = torch.randn((*lead, width), generator=gen, dtype=torch.float64) * 3.0
    x[..., V:] = PAD
    return x.to(dtype)


def labels_for(lead, gen, *, ignore=True):
    labels = torch.randint(0, V, lead, generator=gen)
    if ignore:
        flat = labels.view(-1)
        flat[0] = -100
        flat[torch.rand(flat.shape, generator=gen) < 0.3] = -100
        flat[-1] = V - 1  # the last real column, next to the padding
    return labels


def truncated_reference(s, t, labels, weight, **options):
    """(loss, grad of the full-width student) from the float64 spec on s[..., :V], t[..., :V]."""
    s64 = s[..., :V].detach().double().requires_grad_(True)
    ref, _, _ = fastkd.kd_loss_reference(s64, t[..., :V].double(), labels, **options)
    (ref * weight).sum().backward()
    grad = torch.zeros(s.shape, dtype=torch.float64)
    grad[..., :V] = s64.grad
    return ref, grad


def check_logits_case(target, s, t, labels, gen, **options):
    """kd_loss(vocab_size=V) on the device against the truncated float64 reference."""
    backend, device = target
    x = s.clone().to(device).requires_grad_(True)
    inplace = options.get("inplace_backward", False)
    student = x * 1.0 if inplace else x  # in place needs a non-leaf
    labels_d = None if labels is None else labels.to(device)
    out = fastkd.kd_loss(student, t.to(device), labels_d, backend=backend, vocab_size=V,
                         **options)  # fmt: skip
    if inplace and backend != "torch":
        # The forward wrote the gradient over the student: its padding columns hold 0, not
        # the +30 logits they had.
        assert (student[..., V:] == 0).all()
    weight = grad_weight(out, gen)
    (out * weight.to(out.device, torch.float32)).sum().backward()
    ref, ref_grad = truncated_reference(s, t, labels, weight, **options)

    assert out.dtype == torch.float32 and x.grad.dtype == s.dtype
    assert x.grad.shape == s.shape
    assert (x.grad[..., V:] == 0).all(), "the padding columns got a gradient"
    assert rel_err(out, ref) <= LOSS_TOL, f"loss rel err {rel_err(out, ref):.2e}"
    assert rel_err(x.grad, ref_grad) <= GRAD_TOL[s.dtype], f"grad {rel_err(x.grad, ref_grad):.2e}"
    if inplace and backend != "torch":
        assert torch.equal(student.detach(), x.grad)  # the student's memory is the gradient


# (divergence and options, leading shape, student width, teacher width, labels)
CASES = {
    "forward_kl-student-wider": (dict(), (6,), V + 7, V, "none"),
    "reverse_kl-teacher-wider-ce-sum": (
        dict(divergence="reverse_kl", ce_weight=0.3, reduction="sum"), (2, 3), V, V + 5, "some"
    ),
    "jsd-3d-both-wider-none": (
        dict(divergence="jsd", beta=0.3, reduction="none", temperature=2.0), (2, 3), V + 3,
        V + 11, "some",
    ),
    "tvd-batchmean-softcap": (
        dict(divergence="tvd", reduction="batchmean", softcap=20.0), (5,), V + 1, V + 1, "none"
    ),
    "skew_reverse_kl-mean-labels": (
        dict(divergence="skew_reverse_kl", ce_weight=1.0), (2, 4), V + 9, V, "some"
    ),
    "soft_ce-width-equals-V": (dict(divergence="soft_ce"), (4,), V, V, "all-kept"),
    "inplace-forward_kl-3d-ce": (
        dict(inplace_backward=True, ce_weight=0.5, temperature=0.7), (2, 3), V + 6, V, "some"
    ),
    "inplace-jsd-none": (
        dict(divergence="jsd", inplace_backward=True, reduction="none"), (5,), V + 4, V + 2,
        "none",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_truncated_reference(target, case):
    options, lead, width_s, width_t, label_mode = CASES[case]
    gen = _gen("logits", case)
    s, t = padded_logits(lead, width_s, gen), padded_logits(lead, width_t, gen)
    labels = None if label_mode == "none" else labels_for(lead, gen, ignore=label_mode == "some")
    check_logits_case(target, s, t, labels, gen, **options)


def test_bf16_within_the_design_tolerance(target):
    gen = _gen("bf16")
    s, t = padded_logits((2, 3), V + 5, gen, torch.bfloat16), padded_logits((2, 3), V, gen)
    labels = labels_for((2, 3), gen)
    check_logits_case(target, s, t.to(torch.bfloat16), labels, gen, divergence="jsd",
                      ce_weight=0.2)  # fmt: skip


def test_module_matches_functional_and_shows_vocab_size():
    gen = _gen("module")
    s, t = padded_logits((4,), V + 3, gen), padded_logits((4,), V, gen)
    module = fastkd.KDLoss("reverse_kl", vocab_size=V, backend="torch")
    assert "vocab_size=37" in repr(module)
    assert "vocab_size" not in repr(fastkd.KDLoss())
    want = fastkd.kd_loss(s, t, divergence="reverse_kl", vocab_size=V, backend="torch")
    assert torch.equal(module(s, t), want)


# --- the top-k teacher -------------------------------------------------------------------


def topk_teacher(n_rows, K, gen):
    """The top-K of a random teacher's log_softmax over V (ids < V), shuffled."""
    t = torch.randn(n_rows, V, generator=gen, dtype=torch.float64) * 3.0
    top = torch.log_softmax(t, -1).topk(K, -1)
    perm = torch.argsort(torch.rand(n_rows, K, generator=gen), -1)
    return TopKTeacher(top.indices.gather(1, perm), top.values.gather(1, perm).float())


@pytest.mark.parametrize(
    "options",
    [
        dict(topk_tail="bucket", ce_weight=0.5),  # the tail is the mass outside S within V
        dict(divergence="reverse_kl", teacher_normalization="renormalize", reduction="none"),
        dict(inplace_backward=True, reduction="sum"),
    ],
    ids=["bucket-ce", "renormalize-none", "inplace"],
)
def test_topk_teacher_with_a_wider_student(target, options):
    backend, device = target
    gen = _gen("topk", tuple(options))
    n_rows, K = 6, 5
    s = padded_logits((n_rows,), V + 8, gen)
    teacher = topk_teacher(n_rows, K, gen)
    labels = labels_for((n_rows,), gen)
    x = s.clone().to(device).requires_grad_(True)
    inplace = options.get("inplace_backward", False)
    student = x * 1.0 if inplace else x
    teacher_d = TopKTeacher(teacher.token_ids.to(device), teacher.logprobs.to(device))
    out = fastkd.kd_loss(student, teacher_d, labels.to(device), backend=backend,
                         vocab_size=V, **options)  # fmt: skip
    if inplace and backend != "torch":
        assert (student[..., V:] == 0).all()
    weight = grad_weight(out, gen)
    (out * weight.to(out.device, torch.float32)).sum().backward()

    s64 = s[:, :V].double().requires_grad_(True)
    ref, _, _ = fastkd.topk_loss_reference(s64, teacher, labels, **options)
    (ref * weight).sum().backward()
    assert (x.grad[:, V:] == 0).all()
    assert rel_err(out, ref) <= LOSS_TOL
    assert rel_err(x.grad[:, :V], s64.grad) <= GRAD_TOL[torch.float32]


# --- FusedLinearKDLoss: LM heads with different row counts -------------------------------

H_S, H_T, N_ROWS = 8, 12, 9


def padded_head(rows, h, gen):
    """(weight (rows, h), bias (rows,)) whose first V rows give logits of about randn x 3;
    the padding rows' bias is PAD, so that their logits are far above the rest."""
    weight = torch.randn(rows, h, generator=gen, dtype=torch.float64) * (3.0 / h**0.5)
    bias = torch.randn(rows, generator=gen, dtype=torch.float64)
    bias[V:] = PAD
    return weight.float(), bias.float()


def _fused_targets():
    params = [pytest.param(("torch", "cpu"), id="torch-cpu")]
    for backend in ("cpu", "triton"):
        ok, why = _backends.is_available(backend, torch.device("cpu"))
        marks = [] if ok else [pytest.mark.skip(reason=f"{backend} on cpu: {why}")]
        params.append(pytest.param((backend, "cpu"), id=f"{backend}-cpu", marks=marks))
    marks = [] if torch.cuda.is_available() else [pytest.mark.skip(reason="no CUDA device")]
    params.append(pytest.param(("auto", "cuda"), id="auto-cuda", marks=marks))
    return params


@pytest.mark.parametrize("fused_target", _fused_targets())
@pytest.mark.parametrize(
    "options",
    [dict(divergence="jsd", ce_weight=0.4), dict(divergence="forward_kl", reduction="none")],
    ids=["jsd-ce-mean", "forward_kl-none"],
)
def test_fused_linear_heads_of_different_rows(fused_target, options):
    backend, device = fused_target
    gen = _gen("fused", tuple(options))
    h_s = (torch.randn(N_ROWS, H_S, generator=gen) * 2.0).to(device)
    h_t = (torch.randn(N_ROWS, H_T, generator=gen) * 2.0).to(device)
    w_s, b_s = (x.to(device) for x in padded_head(V + 7, H_S, gen))
    w_t, b_t = (x.to(device) for x in padded_head(V + 3, H_T, gen))
    labels = labels_for((N_ROWS,), gen)
    leaves = [x.clone().requires_grad_(True) for x in (h_s, w_s, b_s)]
    loss = fastkd.FusedLinearKDLoss(vocab_size=V, backend=backend, chunk_size=4, **options)
    out = loss(leaves[0], leaves[1], h_t, w_t, labels.to(device), leaves[2], b_t)
    weight = grad_weight(out, gen)
    (out * weight.to(out.device, torch.float32)).sum().backward()

    ref_leaves = [x.detach().cpu().double().requires_grad_(True) for x in (h_s, w_s, b_s)]
    hs64, ws64, bs64 = ref_leaves
    s64 = hs64 @ ws64[:V].T + bs64[:V]
    t64 = h_t.cpu().double() @ w_t[:V].cpu().double().T + b_t[:V].cpu().double()
    ref, _, _ = fastkd.kd_loss_reference(s64, t64, labels, **options)
    (ref * weight).sum().backward()

    assert rel_err(out, ref) <= LOSS_TOL
    for name, got, want in zip(("hidden", "weight", "bias"), leaves, ref_leaves, strict=True):
        assert got.grad.shape == got.shape
        assert rel_err(got.grad, want.grad) <= GRAD_TOL[torch.float32], name
    assert (leaves[1].grad[V:] == 0).all() and (leaves[2].grad[V:] == 0).all()


def test_fused_linear_topk_teacher_with_a_wider_head():
    gen = _gen("fused-topk")
    h_s = torch.randn(N_ROWS, H_S, generator=gen) * 2.0
    w_s, b_s = padded_head(V + 5, H_S, gen)
    teacher = topk_teacher(N_ROWS, 4, gen)
    labels = labels_for((N_ROWS,), gen)
    leaves = [x.clone().requires_grad_(True) for x in (h_s, w_s, b_s)]
    out = fastkd.fused_linear_kd_loss(leaves[0], leaves[1], labels=labels, student_bias=leaves[2],
                                      teacher=teacher, vocab_size=V, topk_tail="bucket",
                                      ce_weight=0.3)  # fmt: skip
    out.backward()
    ref_leaves = [x.double().requires_grad_(True) for x in (h_s, w_s, b_s)]
    s64 = ref_leaves[0] @ ref_leaves[1][:V].T + ref_leaves[2][:V]
    ref, _, _ = fastkd.topk_loss_reference(s64, teacher, labels, topk_tail="bucket", ce_weight=0.3)
    ref.backward()
    assert rel_err(out, ref) <= LOSS_TOL
    for got, want in zip(leaves, ref_leaves, strict=True):
        assert rel_err(got.grad, want.grad) <= GRAD_TOL[torch.float32]
    assert (leaves[1].grad[V:] == 0).all() and (leaves[2].grad[V:] == 0).all()


# --- no copy of the logits ---------------------------------------------------------------


@pytest.mark.parametrize("inplace", [False, True], ids=["grad-buffer", "inplace"])
@pytest.mark.parametrize("topk", [False, True], ids=["dense", "topk"])
def test_kernels_read_the_logits_in_place(target, monkeypatch, inplace, topk):
    """The row kernel gets (N, V) views of the caller's own memory, row stride the full
    width: no copy of the logits, and the gradient written within the full-width buffer."""
    backend, device = target
    if backend == "torch":
        pytest.skip("the reference materialises by design")
    gen = _gen("nocopy", inplace, topk)
    width = V + 5
    s = padded_logits((2, 3), width, gen).to(device)
    if topk:
        pairs = topk_teacher(6, 4, gen)
        teacher = TopKTeacher(pairs.token_ids.view(2, 3, 4).to(device),
                              pairs.logprobs.view(2, 3, 4).to(device))  # fmt: skip
    else:
        teacher = padded_logits((2, 3), width + 2, gen).to(device)
    seen = []
    real = _backends.row_kernel

    def spy(name, topk=False):
        row_kernel, scale_rows = real(name, topk=topk)

        def recording(rows):
            seen.append(rows)
            return row_kernel(rows)

        return recording, scale_rows

    monkeypatch.setattr(_backends, "row_kernel", spy)
    x = s.clone().requires_grad_(True)
    student = x * 1.0 if inplace else x
    fastkd.kd_loss(student, teacher, backend=backend, vocab_size=V,
                   inplace_backward=inplace).backward()  # fmt: skip
    (rows,) = seen

    def same_memory(a, b):
        return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()

    assert rows.student.shape == (6, V) and rows.student.stride() == (width, 1)
    assert same_memory(rows.student, student)
    if not topk:
        assert rows.teacher.shape == (6, V) and rows.teacher.stride() == (width + 2, 1)
        assert same_memory(rows.teacher, teacher)
    assert rows.grad.stride() == (width, 1)
    assert same_memory(rows.grad, student) == inplace
    assert (x.grad[..., V:] == 0).all()


@pytest.mark.skipif(
    not _backends.is_available("cpu", torch.device("cpu"))[0], reason="no C++ CPU kernel"
)
@pytest.mark.parametrize("inplace", [False, True], ids=["grad-buffer", "inplace"])
def test_torch_compile_fullgraph(inplace):
    """The ops' fake implementations and functionalisation with a padded student: a graph
    compiled with fullgraph=True (aot_eager: the ops' graph without code generation) gives
    eager's loss and gradients, padding rows of the head's gradient 0."""
    torch._dynamo.reset()
    gen = _gen("compile", inplace)
    H, width = 8, V + 5
    head = torch.nn.Linear(H, width)
    with torch.no_grad():
        head.bias[V:] = PAD
    h = torch.randn(2, 3, H, generator=gen)
    t = padded_logits((2, 3), V, gen)
    labels = labels_for((2, 3), gen)
    loss_fn = fastkd.KDLoss("jsd", vocab_size=V, ce_weight=0.3, backend="cpu",
                            inplace_backward=inplace)  # fmt: skip

    def step(fn):
        head.zero_grad()
        loss = fn(h, t, labels)
        loss.backward()
        return loss.detach(), head.weight.grad.clone(), head.bias.grad.clone()

    def run(h, t, labels):
        return loss_fn(head(h), t, labels)

    eager = step(run)
    compiled = step(torch.compile(run, fullgraph=True, backend="aot_eager"))
    for got, want in zip(compiled, eager, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert (compiled[1][V:] == 0).all() and (compiled[2][V:] == 0).all()
    # And both against the float64 spec on the head's first V rows.
    w64, b64 = (p.detach().double().requires_grad_(True) for p in (head.weight, head.bias))
    ref, _, _ = fastkd.kd_loss_reference(h.double() @ w64[:V].T + b64[:V], t[..., :V].double(),
                                         labels, divergence="jsd", ce_weight=0.3)  # fmt: skip
    ref.backward()
    assert rel_err(compiled[0], ref) <= LOSS_TOL
    assert rel_err(compiled[1], w64.grad) <= GRAD_TOL[torch.float32]


# --- errors ------------------------------------------------------------------------------


def test_different_widths_without_vocab_size_name_both_and_vocab_size():
    """Qwen2.5's padded head (152064 columns) against a 151936-column teacher."""
    s, t = torch.randn(1, 152064), torch.randn(1, 151936)
    with pytest.raises(ValueError) as info:
        fastkd.kd_loss(s, t)
    message = str(info.value)
    assert "student_logits has 152064 columns and teacher_logits 151936" in message
    assert "pass vocab_size=151936" in message
    fastkd.kd_loss(s, t, vocab_size=151936)  # and that is the fix


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: fastkd.kd_loss(torch.randn(2, 40), torch.randn(2, 40), vocab_size=41),
         r"vocab_size=41 is larger than student_logits, which has 40 columns"),
        (lambda: fastkd.kd_loss(torch.randn(2, 45), torch.randn(2, 40), vocab_size=42),
         r"vocab_size=42 is larger than teacher_logits, which has 40 columns"),
        (lambda: fastkd.kd_loss(torch.randn(2, 40), TopKTeacher(torch.zeros(2, 3, dtype=torch.long),
                                torch.full((2, 3), -2.0)), vocab_size=50),
         r"vocab_size=50 is larger than student_logits"),
        (lambda: fastkd.kd_loss(torch.randn(2, V + 3), torch.randn(2, V), torch.tensor([1, V]),
                                vocab_size=V, ce_weight=1.0),
         rf"labels must lie in \[0, {V}\)"),
        (lambda: fastkd.kd_loss(torch.randn(2, V + 3), TopKTeacher(torch.tensor([[0, V], [1, 2]]),
                                torch.full((2, 2), -2.0)), vocab_size=V),
         rf"teacher.token_ids must lie in \[0, {V}\)"),
        (lambda: fastkd.KDLoss(vocab_size=0), r"vocab_size must be >= 1, got 0"),
        (lambda: fastkd.KDLoss(vocab_size=-5), r"vocab_size must be >= 1, got -5"),
        (lambda: fastkd.FusedLinearKDLoss()(torch.randn(3, 4), torch.randn(V + 2, 4),
                                            torch.randn(3, 5), torch.randn(V, 5)),
         rf"student_weight has {V + 2} rows and teacher_weight {V}: pass vocab_size={V}"),
        (lambda: fastkd.FusedLinearKDLoss(vocab_size=V + 1)(
            torch.randn(3, 4), torch.randn(V + 2, 4), torch.randn(3, 5), torch.randn(V, 5)),
         rf"vocab_size={V + 1} is larger than teacher_weight, which has {V} rows"),
    ],
    ids=["above-student", "above-teacher", "above-topk-student", "label", "topk-id", "zero",
         "negative", "fused-rows", "fused-above"],
)  # fmt: skip
def test_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("bad", [True, 3.0, "37"])
def test_vocab_size_must_be_an_int(bad):
    with pytest.raises(TypeError, match="vocab_size must be an int"):
        fastkd.KDLoss(vocab_size=bad)
