"""Every row of fastkd/divergences.py reaches every place a divergence must be written.

docs/adding_a_divergence.md lists those places; a row added to the table without one of them
fails here, by name, rather than deep in the kernel matrix.
"""

import math
import re
from pathlib import Path

import pytest
import torch
from kd_testing import kernel_targets, make_logits

import fastkd
from fastkd import DIVERGENCES, _backends
from fastkd.bench.formulas import kd_formula

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(params=kernel_targets())
def target(request):
    return request.param


def test_the_codes_are_distinct_and_dense():
    codes = sorted(d.code for d in DIVERGENCES.values())
    assert codes == list(range(len(DIVERGENCES)))
    for d in DIVERGENCES.values():
        assert d.param in (None, "beta", "alpha"), d


def test_the_cpp_enum_is_the_table():
    """csrc/kd_math.h spells the codes as an enum for its compile-time dispatch."""
    header = (ROOT / "csrc" / "kd_math.h").read_text()
    enum = re.search(r"enum Divergence : int \{(.*?)\};", header, re.S)
    assert enum, "csrc/kd_math.h has no `enum Divergence : int { ... };`"
    entries = dict(re.findall(r"(\w+)\s*=\s*(\d+)", enum.group(1)))
    expected = {name.upper(): str(d.code) for name, d in DIVERGENCES.items()}
    assert entries == expected, "csrc/kd_math.h's enum Divergence differs from the table"
    count = re.search(r"kNumDivergences\s*=\s*(\d+)", header)
    assert count and int(count.group(1)) == len(DIVERGENCES)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_every_kernel_has_the_divergence(target, divergence):
    backend, device = target
    gen = torch.Generator().manual_seed(DIVERGENCES[divergence].code)
    s = make_logits((3, 40), torch.float32, device, gen).requires_grad_(True)
    t = make_logits((3, 40), torch.float32, device, gen)
    loss = fastkd.kd_loss(s, t, divergence=divergence, temperature=1.5, backend=backend)
    loss.backward()
    s64 = s.detach().cpu().double().requires_grad_(True)
    ref, _, _ = fastkd.kd_loss_reference(s64, t.cpu().double(), divergence=divergence,
                                         temperature=1.5)  # fmt: skip
    ref.backward()
    torch.testing.assert_close(loss.cpu().double(), ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(s.grad.cpu().double(), s64.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_the_benchmark_has_a_plain_formula(divergence):
    """fastkd.bench's baseline (the loss as people write it) for every divergence."""
    gen = torch.Generator().manual_seed(7)
    s = torch.randn(5, 30, generator=gen, dtype=torch.float64) * 3
    t = torch.randn(5, 30, generator=gen, dtype=torch.float64) * 3
    ours = kd_formula(s, t, divergence=divergence, temperature=2.0, beta=0.3, alpha=0.2)
    ref, _, _ = fastkd.kd_loss_reference(
        s, t, divergence=divergence, temperature=2.0, beta=0.3, alpha=0.2
    )
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=0)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_the_readme_documents_the_divergence(divergence):
    readme = (ROOT / "README.md").read_text()
    assert f"| `{divergence}` |" in readme, f"README.md's divergence table lacks {divergence}"


def test_the_registry_lists_the_kernel_backends():
    assert set(_backends.KERNEL_BACKENDS) | {"torch", "auto"} == set(_backends.BACKENDS)


@pytest.mark.parametrize("divergence", sorted(fastkd.DIVERGENCES))
def test_log_q_gradient_column_is_the_tables_derivative(divergence):
    """reference.divergence_log_q_grad (the top-k path's gradient column) against autograd
    through divergence_per_row, float64, with masked entries on either side."""
    from fastkd.reference import divergence_log_q_grad, divergence_per_row

    g = torch.Generator().manual_seed(11)
    log_p = torch.log_softmax(torch.randn(5, 12, generator=g, dtype=torch.float64) * 3, -1)
    log_q = torch.log_softmax(torch.randn(5, 12, generator=g, dtype=torch.float64) * 3, -1)
    log_p[0, 2] = log_q[0, 2] = -math.inf  # padding: both sides
    if divergence not in ("forward_kl", "soft_ce"):  # D = +inf where p > 0 = q
        log_q[1, 4] = -math.inf  # no student mass
    if divergence != "reverse_kl":  # D = +inf where q > 0 = p
        log_p[2, 5] = -math.inf  # no teacher mass
    log_q.requires_grad_(True)
    D = divergence_per_row(log_p, log_q, divergence, 0.3, 0.2)
    (want,) = torch.autograd.grad(D.sum(), log_q)
    got = divergence_log_q_grad(log_p, log_q.detach(), divergence, 0.3, 0.2)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)
