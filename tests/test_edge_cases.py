"""Edge cases a fuzz campaign found (issue "Precision and edge cases"), each against the
float64 reference: mixture weights near 0 and 1, logits far from 0, V = 1, fractional
num_items_in_batch, the supported temperatures, and tensors the kernels cannot read."""

import math
import zlib

import pytest
import torch
from kd_testing import LOSS_TOL, kernel_targets, make_logits, rel_err

import fastkd

TARGETS = [*kernel_targets(), pytest.param(("torch", "cpu"), id="torch-cpu")]


@pytest.fixture(params=TARGETS)
def target(request):
    return request.param


def _gen(*key):
    # crc32, not hash(): str hashes change from one process to the next (PYTHONHASHSEED).
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _loss_and_grad(s, t, labels=None, **options):
    s = s.detach().clone().requires_grad_(True)
    out = fastkd.kd_loss(s, t, labels, **options)
    out.sum().backward()
    return out.detach(), s.grad


def _reference(s, t, labels=None, **options):
    options.pop("backend", None)
    s64 = s.detach().cpu().double().requires_grad_(True)
    labels = None if labels is None else labels.cpu()
    ref, _, _ = fastkd.kd_loss_reference(s64, t.cpu().double(), labels, **options)
    ref.sum().backward()
    return ref.detach(), s64.grad


@pytest.mark.parametrize(
    "divergence,weight",
    [("jsd", 0.999), ("jsd", 1 - 1e-6), ("jsd", 1e-6), ("skew_forward_kl", 1 - 1e-6),
     ("skew_reverse_kl", 1 - 1e-6), ("skew_forward_kl", 1e-6), ("skew_reverse_kl", 1e-6)],
)  # fmt: skip
@pytest.mark.parametrize("target", kernel_targets())
def test_mixture_weights_near_the_ends(target, divergence, weight):
    """1 - w is formed in double on the host: float32's w alone makes it 1.3e-2 off at
    w = 1 - 1e-6, and jsd's loss with it. (The "torch" backend computes float32 inputs with
    PyTorch's float32 logaddexp, whose error there the README states.)

    A skew KL with w near 1 compares q (or p) with a mixture that is almost itself: the loss
    is second order in 1 - w (7e-11 here) and each entry's term is of order (1 - w), which
    float32 resolves to eps32 (1 - w) per entry, not to 1e-5 of the loss; its tolerance says
    so. The other cases are first order and meet design.md's 1e-5."""
    backend, device = target
    gen = _gen("mix-ends", divergence, weight)
    s = make_logits((4, 100), torch.float32, device, gen)
    t = make_logits((4, 100), torch.float32, device, gen)
    name = "beta" if divergence == "jsd" else "alpha"
    opts = dict(divergence=divergence, backend=backend, **{name: weight})
    loss, grad = _loss_and_grad(s, t, **opts)
    ref, ref_grad = _reference(s, t, **opts)
    conditioning = 0.0
    if divergence != "jsd" and weight > 0.5:
        conditioning = 16 * torch.finfo(torch.float32).eps * (1 - weight)
    assert abs(loss.item() - ref.item()) <= LOSS_TOL * abs(ref.item()) + conditioning
    if conditioning == 0:
        assert rel_err(grad, ref_grad) <= 1e-5


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "soft_ce"])
def test_offset_logits_keep_float32_accuracy_per_row(target, divergence):
    """Logits near 100 with a small divergence: the one-pass cross term is carried relative
    to the running maxima, so no offset of 50 (= 100 / T) is summed and then cancelled."""
    backend, device = target
    gen = _gen("offset", divergence)
    t = make_logits((4, 32000), torch.float32, "cpu", gen, scale=3.0)
    s = 0.9 * t + torch.randn(t.shape, generator=gen) + 100
    opts = dict(divergence=divergence, temperature=2.0, reduction="none", backend=backend)
    loss, _ = _loss_and_grad(s.to(device), t.to(device), **opts)
    ref, _ = _reference(s, t, **opts)
    per_row = ((loss.cpu().double() - ref).abs() / ref.abs()).max().item()
    assert per_row <= 1e-5, f"worst row's relative error {per_row:.2e}"


def test_hellinger_near_the_teacher_keeps_float32_accuracy(target):
    """A student close to its teacher (H^2 about 1e-3): the loss is summed as squares,
    1/2 (sqrt p - sqrt q)^2, never as 1 - sum sqrt(p q), which cancels to 5e-4 relative
    error per row here (docs/adding_a_divergence.md)."""
    backend, device = target
    gen = torch.Generator().manual_seed(0)
    s = make_logits((4, 4096), torch.float32, "cpu", gen, scale=4.0)
    t = s + 0.1 * torch.randn(s.shape, generator=gen)
    opts = dict(divergence="hellinger", reduction="none", backend=backend)
    loss, grad = _loss_and_grad(s.to(device), t.to(device), **opts)
    ref, ref_grad = _reference(s, t, **opts)
    per_row = ((loss.cpu().double() - ref).abs() / ref.abs()).max().item()
    assert per_row <= 1e-5, f"worst row's relative error {per_row:.2e}"
    assert rel_err(grad, ref_grad) <= 1e-5


@pytest.mark.parametrize("divergence", fastkd.DIVERGENCES)
def test_one_entry_vocabulary_is_zero(target, divergence):
    """With V = 1 both distributions are [1]: every divergence is 0, its gradient too."""
    backend, device = target
    s = torch.tensor([[5000.0], [-3.0]], device=device)
    t = torch.tensor([[0.0], [7.5]], device=device)
    loss, grad = _loss_and_grad(
        s, t, divergence=divergence, temperature=0.229, reduction="none", backend=backend
    )
    assert loss.abs().max() <= 1e-6 and grad.abs().max() <= 1e-6, (loss, grad)


@pytest.mark.parametrize("num_items", [0.5, 2.5, "tensor 0.5", "tensor 0"])
def test_num_items_in_batch_is_honoured_below_one(target, num_items):
    """Every positive count divides the sum as given; only an exact 0 (a tensor, as trainers
    pass for a fully ignored batch) divides by 1."""
    backend, device = target
    gen = _gen("num-items", num_items)
    s = make_logits((3, 20), torch.float32, device, gen)
    t = make_logits((3, 20), torch.float32, device, gen)
    count = num_items
    if isinstance(num_items, str):
        count = torch.tensor(float(num_items.split()[1]), device=device)
    loss, grad = _loss_and_grad(s, t, num_items_in_batch=count, backend=backend)
    total, total_grad = _reference(s, t, reduction="sum")
    divisor = float(count) if float(count) != 0 else 1.0
    assert rel_err(loss, total / divisor) <= LOSS_TOL
    assert rel_err(grad, total_grad / divisor) <= 1e-5


def test_fused_linear_honours_num_items_below_one():
    gen = _gen("fused-num-items")
    h = torch.randn(6, 8, generator=gen)
    w_s = torch.randn(30, 8, generator=gen).requires_grad_(True)
    w_t = torch.randn(30, 8, generator=gen)
    loss = fastkd.fused_linear_kd_loss(h, w_s, h, w_t, num_items_in_batch=0.25)
    h64 = h.double()
    total, _, _ = fastkd.kd_loss_reference(h64 @ w_s.double().T, h64 @ w_t.double().T,
                                           reduction="sum")  # fmt: skip
    assert rel_err(loss, total / 0.25) <= LOSS_TOL


@pytest.mark.parametrize("temperature", [1e-4, 1e4])
def test_the_ends_of_the_temperature_range_are_finite(target, temperature):
    backend, device = target
    gen = _gen("temperature", temperature)
    s = make_logits((3, 50), torch.float32, device, gen)
    t = make_logits((3, 50), torch.float32, device, gen)
    opts = dict(divergence="jsd", temperature=temperature, backend=backend)
    loss, grad = _loss_and_grad(s, t, **opts)
    assert math.isfinite(loss.item()) and torch.isfinite(grad).all()


@pytest.mark.parametrize("temperature", [1e-39, 5e-5, 2e4, 1e20])
def test_temperatures_outside_the_range_are_refused(temperature):
    s, t = torch.randn(2, 5), torch.randn(2, 5)
    with pytest.raises(ValueError, match=r"temperature must lie in \[0.0001, 10000\]"):
        fastkd.kd_loss(s, t, temperature=temperature)
    with pytest.raises(ValueError, match="temperature must lie in"):
        fastkd.FusedLinearKDLoss(temperature=temperature)


def _sparse(x):
    return x.to_sparse()


def _nested(x):
    return torch.nested.nested_tensor(list(x))


def _meta(x):
    return x.to("meta")


@pytest.mark.parametrize("make", [_sparse, _nested, _meta], ids=["sparse", "nested", "meta"])
@pytest.mark.parametrize("argument", ["student_logits", "teacher_logits", "labels"])
def test_tensors_without_strided_data_are_a_type_error(make, argument):
    s, t = torch.randn(4, 9), torch.randn(4, 9)
    labels = torch.randint(0, 9, (4,))
    args = {"student_logits": s, "teacher_logits": t, "labels": labels}
    args[argument] = make(args[argument])
    with pytest.raises(TypeError, match=argument):
        fastkd.kd_loss(args["student_logits"], args["teacher_logits"], args["labels"])


def test_a_sparse_hidden_state_is_a_type_error():
    h, w = torch.randn(4, 8), torch.randn(20, 8)
    with pytest.raises(TypeError, match="student_hidden"):
        fastkd.fused_linear_kd_loss(h.to_sparse(), w, h, w)


@pytest.mark.parametrize("fullgraph", [True, False])
@pytest.mark.parametrize("lead", [(12,), (2, 6)], ids=["2-d", "3-d"])
@pytest.mark.parametrize("target", kernel_targets())
def test_inplace_backward_under_torch_compile(target, lead, fullgraph):
    """The in-place op traces, also with fullgraph=True (its schema declares the mutation;
    the memory checks run in the op), and gives eager's loss, gradients and overwritten
    logits."""
    backend, device = target
    gen = _gen("inplace-compile", lead)
    lin = torch.nn.Linear(16, 40).to(device)
    h = torch.randn(*lead, 16, generator=gen).to(device)
    t = make_logits((*lead, 40), torch.float32, device, gen)
    loss_fn = fastkd.KDLoss("jsd", temperature=2.0, inplace_backward=True, backend=backend)

    def step(fn):
        lin.zero_grad()
        logits = lin(h)
        loss = fn(logits, t)
        loss.backward()
        return loss.detach(), lin.weight.grad.clone(), logits.detach().clone()

    eager = step(loss_fn)
    torch._dynamo.reset()
    compiled = step(torch.compile(loss_fn, fullgraph=fullgraph))
    for got, want in zip(compiled, eager, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    ref, _, _ = fastkd.kd_loss_reference(
        lin(h).detach().cpu().double(), t.cpu().double(), divergence="jsd", temperature=2.0
    )
    assert rel_err(eager[0], ref) <= LOSS_TOL
