"""The reference (the spec) against the ecosystem's formulas and against autograd, float64."""

import math

import pytest
import torch
import torch.nn.functional as F

import fastkd
from fastkd.reference import divergence_per_row


def _logits(*shape, seed=0, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def _labels(*shape, V, seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    labels = torch.randint(0, V, shape, generator=g)
    labels[torch.rand(shape, generator=g) < 0.3] = -100
    labels.view(-1)[0] = -100
    return labels


@pytest.mark.parametrize("T", [1.0, 2.5])
def test_forward_kl_is_the_kl_div_formula(T):
    s, t = _logits(9, 50, seed=1).requires_grad_(True), _logits(9, 50, seed=2)
    ours, _, _ = fastkd.kd_loss_reference(s, t, temperature=T, reduction="batchmean")
    theirs = F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction="batchmean")
    torch.testing.assert_close(ours, theirs * T**2, rtol=1e-12, atol=0)
    torch.testing.assert_close(*(torch.autograd.grad(x, s)[0] for x in (ours, theirs * T**2)))


def _trl_generalized_jsd(student_logits, teacher_logits, labels, beta, temperature):
    """TRL's GKDTrainer.generalized_jsd_loss (0 < beta < 1, labels given, batchmean)."""
    student_log_probs = F.log_softmax(student_logits / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits / temperature, dim=-1)
    beta = torch.tensor(beta, dtype=student_log_probs.dtype)
    mixture_log_probs = torch.logsumexp(
        torch.stack([student_log_probs + torch.log(1 - beta), teacher_log_probs + torch.log(beta)]),
        dim=0,
    )
    kl_teacher = F.kl_div(mixture_log_probs, teacher_log_probs, reduction="none", log_target=True)
    kl_student = F.kl_div(mixture_log_probs, student_log_probs, reduction="none", log_target=True)
    jsd = beta * kl_teacher + (1 - beta) * kl_student
    mask = labels != -100
    return jsd[mask].sum() / mask.sum()


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_jsd_is_trl_generalized_jsd(beta, T):
    s, t = _logits(2, 6, 40, seed=3).requires_grad_(True), _logits(2, 6, 40, seed=4)
    labels = _labels(2, 6, V=40)
    ours, _, _ = fastkd.kd_loss_reference(
        s,
        t,
        labels,
        divergence="jsd",
        beta=beta,
        temperature=T,
        scale_by_temperature_squared=False,
    )
    theirs = _trl_generalized_jsd(s, t, labels, beta, T)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=0)
    torch.testing.assert_close(*(torch.autograd.grad(x, s)[0] for x in (ours, theirs)))


def _torchtune_forward_kl(student_logits, teacher_logits, labels, ignore_index=-100):
    """torchtune's ForwardKLLoss (normalize=True)."""
    teacher_prob = F.softmax(teacher_logits, dim=-1, dtype=torch.float32)
    inf_mask = torch.isinf(student_logits)
    student_logprob = F.log_softmax(student_logits, dim=-1, dtype=torch.float32)
    prod_probs = torch.masked_fill(teacher_prob * student_logprob, inf_mask, 0)
    x = torch.sum(prod_probs, dim=-1).view(-1)
    mask = (labels != ignore_index).int()
    if torch.sum(mask.view(-1), dim=0) == 0:
        return torch.tensor(0.0, device=x.device)
    return -torch.sum(x * mask.view(-1), dim=0) / torch.sum(mask.view(-1), dim=0)


def test_soft_ce_is_torchtune_forward_kl():
    s, t = _logits(3, 5, 33, seed=5).float(), _logits(3, 5, 33, seed=6).float()
    labels = _labels(3, 5, V=33)
    ours, _, _ = fastkd.kd_loss_reference(
        s, t, labels, divergence="soft_ce", scale_by_temperature_squared=False
    )
    torch.testing.assert_close(ours, _torchtune_forward_kl(s, t, labels), rtol=1e-6, atol=0)


def test_soft_ce_is_torch_cross_entropy_with_probability_targets():
    s, t = _logits(7, 30, seed=7), _logits(7, 30, seed=8)
    ours, _, _ = fastkd.kd_loss_reference(s, t, divergence="soft_ce", temperature=1.5)
    theirs = F.cross_entropy(s / 1.5, F.softmax(t / 1.5, -1)) * 1.5**2
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=0)


def test_hard_label_ce_is_torch_cross_entropy():
    s, t = _logits(4, 6, 25, seed=9), _logits(4, 6, 25, seed=10)
    labels = _labels(4, 6, V=25)
    _, _, ce = fastkd.kd_loss_reference(s, t, labels, ce_weight=1.0, temperature=3.0)
    theirs = F.cross_entropy(s.reshape(-1, 25), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(ce, theirs, rtol=1e-12, atol=0)


def _design_gradient(divergence, log_p, log_q, w):
    """dD/da_j = q_j (g_j - sum_k q_k g_k), g from the design.md §1 table, by hand."""
    p, q = log_p.exp(), log_q.exp()
    if divergence in ("forward_kl", "soft_ce"):
        return q - p
    if divergence == "reverse_kl":
        g = log_q - log_p + 1
    elif divergence == "jsd":
        g = (1 - w) * (log_q - torch.log(w * p + (1 - w) * q))
    elif divergence == "skew_forward_kl":
        g = -(1 - w) * p / (w * p + (1 - w) * q)
    elif divergence == "skew_reverse_kl":
        m = w * q + (1 - w) * p
        g = torch.log(q / m) + 1 - w * q / m
    elif divergence == "tvd":
        g = 0.5 * torch.sign(q - p)
    elif divergence == "hellinger":
        g = 0.5 * (1 - torch.sqrt(p / q))
    else:
        raise AssertionError(f"no hand-written gradient for {divergence!r}: add its g here")
    return q * (g - (q * g).sum(-1, keepdim=True))


@pytest.mark.parametrize("divergence", list(fastkd.DIVERGENCES))
def test_autograd_matches_design_gradient(divergence):
    a, b = _logits(6, 45, seed=11).requires_grad_(True), _logits(6, 45, seed=12)
    log_q, log_p = F.log_softmax(a, -1), F.log_softmax(b, -1)
    w = 0.3
    D = divergence_per_row(log_p, log_q, divergence, beta=w, alpha=w)
    (grad,) = torch.autograd.grad(D.sum(), a)
    torch.testing.assert_close(
        grad, _design_gradient(divergence, log_p.detach(), log_q.detach(), w)
    )


@pytest.mark.parametrize("divergence", list(fastkd.DIVERGENCES))
def test_reference_gradcheck(divergence):
    """Finite differences agree with autograd through the whole reference, CE and softcap."""
    s = _logits(3, 7, seed=13, scale=2.0).requires_grad_(True)
    t, labels = _logits(3, 7, seed=14, scale=2.0), torch.tensor([1, -100, 6])

    def f(x):
        return fastkd.kd_loss_reference(
            x,
            t,
            labels,
            divergence=divergence,
            temperature=1.7,
            softcap=5.0,
            ce_weight=0.4,
            beta=0.3,
            alpha=0.2,
        )[0]

    assert torch.autograd.gradcheck(f, (s,), eps=1e-6, atol=1e-7)


def test_divergence_values_by_hand():
    """Closed-form values on a 2-entry distribution."""
    p = torch.tensor([[0.8, 0.2]], dtype=torch.float64)
    q = torch.tensor([[0.3, 0.7]], dtype=torch.float64)
    log_p, log_q = p.log(), q.log()
    kl = lambda x, y: (x * (x / y).log()).sum()  # noqa: E731
    m = 0.4 * p + 0.6 * q
    expected = {
        "forward_kl": kl(p, q),
        "soft_ce": -(p * q.log()).sum(),
        "reverse_kl": kl(q, p),
        "jsd": 0.4 * kl(p, m) + 0.6 * kl(q, m),
        "skew_forward_kl": kl(p, 0.4 * p + 0.6 * q),
        "skew_reverse_kl": kl(q, 0.4 * q + 0.6 * p),
        "tvd": torch.tensor(0.5, dtype=torch.float64),
        "hellinger": 1 - (p * q).sqrt().sum(),  # 1 - the Bhattacharyya coefficient
    }
    for name, value in expected.items():
        got = divergence_per_row(log_p, log_q, name, beta=0.4, alpha=0.4)
        torch.testing.assert_close(got, value.reshape(1), msg=name)


@pytest.mark.parametrize("reduction", ["mean", "sum", "batchmean", "none"])
def test_reductions(reduction):
    s, t = _logits(2, 5, 20, seed=15), _logits(2, 5, 20, seed=16)
    labels = _labels(2, 5, V=20)
    rows, _, _ = fastkd.kd_loss_reference(s, t, labels, reduction="none", temperature=2.0)
    out, _, _ = fastkd.kd_loss_reference(s, t, labels, reduction=reduction, temperature=2.0)
    kept = labels != -100
    assert torch.all(rows[~kept] == 0)
    expected = {
        "mean": rows.sum() / kept.sum(),
        "sum": rows.sum(),
        "batchmean": rows.sum() / 2,
        "none": rows,
    }[reduction]
    torch.testing.assert_close(out, expected)
    n, _, _ = fastkd.kd_loss_reference(s, t, labels, temperature=2.0, num_items_in_batch=17)
    torch.testing.assert_close(n, rows.sum() / 17)


def test_masked_mixture_has_finite_gradient():
    s, t = _logits(2, 12, seed=17), _logits(2, 12, seed=18)
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[:, 5:] = True
    s = s.masked_fill(mask, -math.inf).requires_grad_(True)
    t = t.masked_fill(mask, -math.inf)
    for divergence in ("jsd", "skew_forward_kl", "skew_reverse_kl", "reverse_kl", "hellinger"):
        loss, _, _ = fastkd.kd_loss_reference(s, t, divergence=divergence)
        (g,) = torch.autograd.grad(loss, s)
        assert torch.isfinite(g).all() and torch.all(g[mask] == 0), divergence
