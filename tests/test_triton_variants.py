"""Each Triton row kernel against the float64 reference (design.md §1-2), whatever V and N
fastkd/triton/launch.py would give it: its thresholds and tables are overridden so that
short rows (the interpreter's pace) run each kernel, the multi-pass one over several
blocks a row, the split one over three chunks of two blocks (the last one short). The rest
of the suite runs whichever kernel the tables pick."""

import os
import zlib

import pytest
import torch
from kd_testing import (
    GRAD_TOL,
    LOSS_TOL,
    check_against_reference,
    make_labels,
    make_logits,
    rel_err,
)

import fastkd

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    pytest.skip("no GPU and TRITON_INTERPRET is not set", allow_module_level=True)

DIVERGENCES = list(fastkd.DIVERGENCES)
# The multi-pass kernel walks a row in 5 blocks of 64, the on-chip one in one of 512, the
# split one in chunks of 128, 128 and 44 (4 rows, 8 SMs standing in for the GPU's).
V = 300


def _generator(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


@pytest.fixture(params=["multi_pass", "on_chip", "split"])
def variant(request, monkeypatch):
    """Forces one kernel, and asserts that every launch of the test ran it."""
    from fastkd.triton import launch

    if request.param == "on_chip":
        monkeypatch.setattr(launch, "ON_CHIP_MAX_V", 1 << 20)
    else:
        monkeypatch.setattr(launch, "ON_CHIP_MAX_V", 0)
        monkeypatch.setattr(launch, "MULTI_PASS_TABLE", ((None, 64, 1),))
        split = request.param == "split"
        monkeypatch.setattr(launch, "sm_count", lambda device: 8 if split else 0)
        monkeypatch.setattr(launch, "SPLIT_MIN_CHUNK", 64)
    chosen = []
    real = launch.row_launch

    def recording(*args, **kwargs):
        chosen.append(real(*args, **kwargs).kernel)
        return real(*args, **kwargs)

    monkeypatch.setattr(launch, "row_launch", recording)
    yield request.param
    assert chosen and set(chosen) == {request.param}, chosen


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("with_ce", [False, True], ids=["kd", "ce-softcap"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_against_reference(variant, divergence, with_ce, dtype):
    gen = _generator("variant", divergence, with_ce, dtype)
    s = make_logits((4, V), dtype, DEVICE, gen)
    t = make_logits((4, V), dtype, DEVICE, gen)
    if with_ce:
        labels = make_labels((4,), V, "some", gen, DEVICE)
        options = dict(softcap=20.0, ce_weight=0.4, kd_weight=0.7, reduction="mean")
    else:
        labels, options = None, dict(reduction="none")
    check_against_reference(
        s, t, labels, "triton", gen, divergence=divergence, temperature=1.7, **options
    )


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "tvd"])
def test_extreme_and_masked_logits(variant, divergence):
    """Logits of magnitude 1e4 in some rows and a masked vocabulary (-inf in 90% of the
    entries, the same for both) in others."""
    gen = _generator("variant-extreme", divergence)
    s = make_logits((4, V), torch.float32, DEVICE, gen, scale=1e4)
    t = make_logits((4, V), torch.float32, DEVICE, gen, scale=1e4)
    masked = torch.rand((2, V), generator=gen) < 0.9
    masked[:, :2] = False
    s[2:] = s[2:].masked_fill(masked.to(DEVICE), float("-inf")) / 1e4
    t[2:] = t[2:].masked_fill(masked.to(DEVICE), float("-inf")) / 1e4
    labels = torch.tensor([5, 17, 0, 1], device=DEVICE)
    check_against_reference(
        s, t, labels, "triton", gen, divergence=divergence, ce_weight=0.5, reduction="none"
    )


@pytest.mark.parametrize("divergence", ["forward_kl", "skew_reverse_kl", "tvd"])
def test_inplace_backward(variant, divergence):
    """The gradient written over the student logits, CE mixed in (the label's logit is read
    before any of the row's gradient is written)."""
    gen = _generator("variant-inplace", divergence)
    leaf = make_logits((5, V), torch.float32, DEVICE, gen).requires_grad_(True)
    t = make_logits((5, V), torch.float32, DEVICE, gen)
    labels = make_labels((5,), V, "some", gen, DEVICE)
    opts = dict(divergence=divergence, temperature=2.0, ce_weight=0.5)
    s64 = leaf.detach().cpu().double().requires_grad_(True)
    loss = fastkd.kd_loss(leaf * 1.0, t, labels, inplace_backward=True, backend="triton", **opts)
    loss.backward()
    ref, _, _ = fastkd.kd_loss_reference(s64, t.cpu().double(), labels.cpu(), **opts)
    ref.backward()
    assert rel_err(loss, ref) <= LOSS_TOL
    assert rel_err(leaf.grad, s64.grad) <= GRAD_TOL[torch.float32]


@pytest.mark.parametrize("case", ["nan-student", "inf-teacher", "masked-student"])
def test_a_row_without_a_distribution_is_nan(variant, case):
    """Row 1 without a distribution: NaN loss and gradient there, the others as the
    reference gives them on their own; row 3 is ignored (0, whatever its logits)."""
    gen = _generator("variant-nan", case)
    s = make_logits((4, V), torch.float32, DEVICE, gen)
    t = make_logits((4, V), torch.float32, DEVICE, gen)
    which, cols, value = {
        "nan-student": ("s", 7, float("nan")),
        "inf-teacher": ("t", 250, float("inf")),
        "masked-student": ("s", slice(None), float("-inf")),
    }[case]
    for row in (1, 3):
        (s if which == "s" else t)[row, cols] = value
    labels = torch.tensor([3, 11, 0, -100], device=DEVICE)
    opts = dict(divergence="jsd", temperature=2.0, ce_weight=0.5, reduction="none")
    s.requires_grad_(True)
    out = fastkd.kd_loss(s, t, labels, backend="triton", **opts)
    out.backward(torch.ones_like(out))
    assert torch.isnan(out[1]) and torch.isnan(s.grad[1]).all()
    assert out[3] == 0 and torch.count_nonzero(s.grad[3]) == 0
    good = [0, 2]
    s_good = s.detach()[good].cpu().double().requires_grad_(True)
    ref, _, _ = fastkd.kd_loss_reference(s_good, t[good].cpu().double(), labels[good].cpu(),
                                         **opts)  # fmt: skip
    ref.backward(torch.ones_like(ref))
    assert rel_err(out[good], ref) <= LOSS_TOL
    assert rel_err(s.grad[good], s_good.grad) <= GRAD_TOL[torch.float32]
