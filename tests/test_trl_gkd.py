"""examples/trl_gkd.py: TRL's GKDTrainer with its generalized_jsd_loss replaced by fastkd's,
against TRL's own function and TRL's own trainer."""

from __future__ import annotations

import math

import pytest
import torch
from example_testing import (
    import_example,
    max_relative_difference,
    one_thread,
    weights_relative_difference,
)
from kd_testing import kernel_targets, make_logits

import fastkd

# TRL's GKDTrainer still reads the renamed is_gradient_checkpointing of transformers 5.
pytestmark = pytest.mark.filterwarnings("ignore:.is_gradient_checkpointing. is deprecated")

ex = import_example("trl_gkd", "transformers", "trl")
trl_loss = ex.TRL_GENERALIZED_JSD_LOSS  # TRL's staticmethod, untouched

# --- The function: fastkd_generalized_jsd_loss == GKDTrainer.generalized_jsd_loss -----------


def backend_targets():
    return [pytest.param(("torch", "cpu"), id="torch-cpu"), *kernel_targets()]


@pytest.fixture(params=backend_targets())
def target(request):
    return request.param


def _inputs(target, labels_mode, seed):
    """(B=2, L=3, V=37) logits (randn x 1..10); float64 on the reference backend, float32 on
    a kernel (TRL then runs on their float64 upcast: the oracle)."""
    backend, device = target
    dtype = torch.float64 if backend == "torch" else torch.float32
    gen = torch.Generator().manual_seed(seed)
    s = make_logits((2, 3, 37), dtype, device, gen)
    t = make_logits((2, 3, 37), dtype, device, gen)
    labels = None
    if labels_mode != "none":
        labels = torch.randint(0, 37, (2, 3), generator=gen)
        labels[torch.rand(2, 3, generator=gen) < 0.4] = -100
        labels[0, 0] = -100
        if labels_mode == "all":
            labels[:] = -100
        labels = labels.to(device)
    return s, t, labels


def _check(target, s, t, labels, **kwargs):
    backend, _ = target
    s_fast = s.detach().clone().requires_grad_(True)
    s_trl = s.detach().double().requires_grad_(True)
    got = ex.fastkd_generalized_jsd_loss(s_fast, t, labels, backend=backend, **kwargs)
    expected = trl_loss(s_trl, t.double(), labels, **kwargs)
    assert got.shape == expected.shape
    grad_out = torch.rand(expected.shape, generator=torch.Generator().manual_seed(1)) + 0.5
    (got * grad_out.to(got)).sum().backward()
    (expected * grad_out.double()).sum().backward()
    tol = 1e-10 if backend == "torch" else 1e-5
    for name, a, b in (("loss", got, expected), ("grad", s_fast.grad, s_trl.grad)):
        a, b = a.detach().double().cpu(), b.detach().cpu()
        err = ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
        assert err <= tol or (a - b).abs().max() <= 1e-12, f"{name}: rel err {err:.2e}"


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_same_value_and_gradient_as_trl(target, beta, temperature):
    """beta in (0, 1) is fastkd's jsd; TRL's beta = 0 and 1 are forward and reverse KL."""
    s, t, labels = _inputs(target, "some", seed=int(beta * 10 + temperature))
    _check(target, s, t, labels, beta=beta, temperature=temperature)


CASES = {
    "batchmean-no-labels": ("none", dict(reduction="batchmean")),
    "batchmean-all-ignored": ("all", dict(reduction="batchmean")),
    "sum": ("some", dict(reduction="sum")),
    "sum-no-labels": ("none", dict(reduction="sum")),
    "mean": ("some", dict(reduction="mean")),
    "mean-no-labels": ("none", dict(reduction="mean")),
    "num-items-int": ("some", dict(num_items_in_batch=17)),
    "num-items-tensor": ("some", dict(num_items_in_batch=torch.tensor(23))),
    "num-items-no-labels": ("none", dict(num_items_in_batch=11)),
    "none-falls-back-to-trl": ("some", dict(reduction="none")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_reductions_as_trl(target, case):
    labels_mode, kwargs = CASES[case]
    s, t, labels = _inputs(target, labels_mode, seed=len(case))
    _check(target, s, t, labels, beta=0.3, temperature=1.5, **kwargs)


def test_unknown_reduction_is_a_value_error():
    s = torch.randn(2, 3, 5)
    with pytest.raises(ValueError, match="reduction"):
        ex.fastkd_generalized_jsd_loss(s, s.clone(), reduction="avg")


# --- The trainer: FastKDGKDTrainer == GKDTrainer, step by step ----------------------------

SMALL = dict(
    n_numbers=40,
    student_hidden=32,
    student_layers=1,
    teacher_hidden=48,
    teacher_layers=1,
    max_count=4,
    examples=32,
    batch_size=2,
    grad_accum=2,
    steps=3,
    teacher_steps=20,
    lr=1e-2,
    beta=0.5,
    lmbda=0.0,  # off-policy: deterministic, no generation
    max_new_tokens=4,
)


@pytest.fixture
def _one_thread():
    with one_thread():
        yield


def fixed_batch_loss(trainer, n: int = 8) -> float:
    """TRL's own loss on a fixed collated batch, for "the loss goes down"; checked against
    the float64 reference (jsd, T = 1 without T^2, mean over the labelled rows: TRL's
    generalized JSD, design.md §1), so that the figure is the objective it claims to be."""
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(n)])
    device = next(trainer.model.parameters()).device
    inputs = dict(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"])
    inputs["attention_mask"] = inputs["attention_mask"].to(device)
    labels = batch["labels"][:, 1:]
    with torch.no_grad():
        s = trainer.model(**inputs).logits[:, :-1]
        t = trainer.teacher_model(**inputs).logits[:, :-1]
        value = trl_loss(s, t, labels.to(device), beta=SMALL["beta"]).item()
    expected, _, _ = fastkd.kd_loss_reference(
        s.cpu().double(), t.cpu().double(), labels, divergence="jsd", beta=SMALL["beta"],
        scale_by_temperature_squared=False,
    )  # fmt: skip
    assert math.isclose(value, expected.item(), rel_tol=1e-5), (value, expected.item())
    return value


def run(**overrides):
    trainer = ex.build_trainer(ex.RunConfig(**{**SMALL, **overrides}))
    before = fixed_batch_loss(trainer)
    trainer.train()
    return trainer, before, fixed_batch_loss(trainer)


@pytest.fixture(scope="module")
def trl_run():
    with one_thread():
        return run(loss="trl", device="cpu")


@pytest.mark.usefixtures("_one_thread")
@pytest.mark.parametrize("target", backend_targets())
def test_gkd_trainer_matches_trl(trl_run, target):
    backend, device = target
    fast_trainer, fast_before, fast_after = run(loss="fastkd", backend=backend, device=device)
    trl_trainer, _, trl_after = trl_run if device == "cpu" else run(loss="trl")
    assert len(fast_trainer.micro_batch_losses) == SMALL["steps"] * SMALL["grad_accum"]
    first = max_relative_difference(
        fast_trainer.micro_batch_losses[:1], trl_trainer.micro_batch_losses[:1]
    )
    assert first <= 1e-6, first
    every = max_relative_difference(fast_trainer.micro_batch_losses, trl_trainer.micro_batch_losses)
    assert every <= 1e-5, every
    weights = weights_relative_difference(fast_trainer.model, trl_trainer.model)
    assert weights <= 1e-4, weights
    # (fixed_batch_loss checks each figure against the float64 reference.)
    assert fast_after < 0.9 * fast_before, (fast_before, fast_after)
    assert math.isclose(fast_after, trl_after, rel_tol=1e-5)


@pytest.mark.usefixtures("_one_thread")
def test_on_policy_step_matches_trl():
    """lmbda=1: the batch is the student's own sampled completions. Seeded alike, both
    trainers sample the same tokens from the same initial student, so the first loss is
    the same; the run finishes with finite losses."""
    overrides = dict(lmbda=1.0, steps=2, grad_accum=1, device="cpu")
    fast = ex.run(ex.RunConfig(**{**SMALL, **overrides}, loss="fastkd"))
    trl = ex.run(ex.RunConfig(**{**SMALL, **overrides}, loss="trl"))
    assert max_relative_difference(fast.micro_batch_losses[:1], trl.micro_batch_losses[:1]) <= 1e-6
    assert all(math.isfinite(x) and x > 0 for x in fast.micro_batch_losses)


@pytest.mark.usefixtures("_one_thread")
def test_cli_tiny(capsys):
    ex.main(["--tiny", "--steps", "2", "--teacher-steps", "2", "--lmbda", "0.5"])
    out = capsys.readouterr().out
    assert "loss=fastkd  beta=0.5  lmbda=0.5" in out
    assert "2 steps in" in out
