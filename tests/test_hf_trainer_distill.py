"""examples/hf_trainer_distill.py: transformers.Trainer distilling with fastkd, run short
with fastkd and with the plain-PyTorch formula it replaces, and its label shift and
masking against a hand-written per-position loop."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from example_testing import (
    import_example,
    max_relative_difference,
    one_thread,
    weights_relative_difference,
)
from kd_testing import kernel_targets

ex = import_example("hf_trainer_distill", "transformers")

# A few seconds per run on one CPU thread: V=96, one layer, 2 x 2 sequences of <= 11 tokens
# per optimizer step, 3 steps. The teacher is trained 20 steps first so it has a signal.
SMALL = dict(
    vocab_size=96,
    student_hidden=32,
    student_layers=1,
    teacher_hidden=48,
    teacher_layers=1,
    max_prompt=4,
    examples=32,
    batch_size=2,
    grad_accum=2,
    steps=3,
    teacher_steps=20,
    lr=1e-2,
    temperature=2.0,
    kd_weight=0.5,
    ce_weight=0.5,
)
LOSS_RTOL = 1e-5  # per-step losses: float32 rounding of two summation orders
WEIGHTS_RTOL = 1e-4  # after 3 AdamW steps, which divide by sqrt(v) of near-zero gradients


def backend_targets():
    """The reference backend, then the kernel backends (skipped with a reason if absent)."""
    return [pytest.param(("torch", "cpu"), id="torch-cpu"), *kernel_targets()]


def fixed_batch_loss(trainer, n: int = 8) -> float:
    """The plain formula on a fixed batch of the training set, for "the loss goes down";
    checked against the float64 per-position loop (looped_loss), so that the figure is the
    objective it claims to be."""
    batch = ex.collate([trainer.train_dataset[i] for i in range(n)])
    device = next(trainer.model.parameters()).device
    inputs = {k: v.to(device) for k, v in batch.items()}
    labels = inputs.pop("labels")
    with torch.no_grad():
        s = trainer.model(**inputs).logits
        t = trainer.teacher_model(**inputs).logits
        options = {k: SMALL[k] for k in ("temperature", "kd_weight", "ce_weight")}
        value = ex.plain_kd_loss(s[:, :-1], t[:, :-1], labels[:, 1:], **options).item()
    expected, _ = looped_loss(s.cpu(), t.cpu(), labels.cpu(), **options)
    assert math.isclose(value, expected, rel_tol=LOSS_RTOL), (value, expected)
    return value


def run(**overrides):
    """(trainer after training, held-out loss before, after)."""
    trainer = ex.build_trainer(ex.RunConfig(**{**SMALL, **overrides}))
    before = fixed_batch_loss(trainer)
    trainer.train()
    return trainer, before, fixed_batch_loss(trainer)


def assert_same_run(fast, plain):
    (fast_trainer, fast_before, fast_after), (plain_trainer, _, plain_after) = (
        fast,
        plain,
    )
    n_micro = SMALL["steps"] * SMALL["grad_accum"]
    assert len(fast_trainer.micro_batch_losses) == n_micro
    # Identical weights before the first micro-batch: only the loss formulas differ.
    first = max_relative_difference(
        fast_trainer.micro_batch_losses[:1], plain_trainer.micro_batch_losses[:1]
    )
    assert first <= 1e-6, first
    every = max_relative_difference(
        fast_trainer.micro_batch_losses, plain_trainer.micro_batch_losses
    )
    assert every <= LOSS_RTOL, every
    weights = weights_relative_difference(fast_trainer.model, plain_trainer.model)
    assert weights <= WEIGHTS_RTOL, weights
    assert weights_relative_difference(fast_trainer.model, _initial_student()) > 1e-3  # it trained
    # (fixed_batch_loss checks each figure against the float64 per-position loop.)
    assert fast_after < fast_before - 0.05, (fast_before, fast_after)
    assert abs(fast_after - plain_after) <= LOSS_RTOL * plain_after


def _initial_student():
    cfg = ex.RunConfig(**SMALL)
    return ex.tiny_llama(
        cfg.vocab_size,
        cfg.student_hidden,
        cfg.student_layers,
        seed=cfg.seed + 1,
        max_positions=2 * cfg.max_prompt + 3,
        pad_token_id=ex.PAD,
    )


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def plain_run():
    """The plain formula on full logits, run once for the module."""
    with one_thread():
        return run(loss="torch", device="cpu")


@pytest.mark.parametrize("target", backend_targets())
def test_kdloss_trainer_matches_plain_formula(plain_run, target):
    backend, device = target
    fast = run(loss="fastkd", backend=backend, device=device)
    plain = plain_run if device == "cpu" else run(loss="torch", device=device)
    assert_same_run(fast, plain)


def test_fused_linear_path_equals_logits_path(plain_run):
    """The hidden-state path (final hidden states through logits_to_keep, lm_head weights
    read off the models) with the plain formula on hidden @ W.T is the logits path."""
    fused_plain = run(loss="torch", fused_linear=True, device="cpu")
    assert_same_run(fused_plain, plain_run)


@pytest.mark.parametrize("target", backend_targets())
def test_fused_linear_trainer_matches_plain_formula(plain_run, target):
    backend, device = target
    fast = run(loss="fastkd", fused_linear=True, backend=backend, device=device)
    plain = plain_run if device == "cpu" else run(loss="torch", device=device)
    assert_same_run(fast, plain)


# --- Label shift and masking ------------------------------------------------------------


def hand_batch():
    """Three right-padded sequences: two of the counting task (prompt, then completion) and
    one that is all prompt (no labelled token: it contributes no row)."""
    task = ex.CountingTask(2, SMALL["vocab_size"], max_prompt=5, seed=7)
    prompt_only = {"input_ids": [ex.BOS, 40, 41, 42, ex.SEP], "labels": [-100] * 5}
    return ex.collate([task[0], task[1], prompt_only])


def looped_loss(s, t, labels, *, temperature, kd_weight, ce_weight, num_items=None):
    """Per position in float64: row i of sequence b is scored when token i+1 is labelled,
    T^2 KL(softmax(t/T) || softmax(s/T)) and -log softmax(s)[token i+1]; summed over the
    scored rows, divided by their number (or num_items)."""
    s, t = s.double(), t.double()
    total, rows = 0.0, 0
    for b in range(labels.shape[0]):
        for i in range(labels.shape[1] - 1):
            target = int(labels[b, i + 1])
            if target == -100:
                continue
            log_q = torch.log_softmax(s[b, i] / temperature, -1)
            log_p = torch.log_softmax(t[b, i] / temperature, -1)
            kl = (log_p.exp() * (log_p - log_q)).sum().item()
            ce = -torch.log_softmax(s[b, i], -1)[target].item()
            total += kd_weight * temperature**2 * kl + ce_weight * ce
            rows += 1
    return total / (rows if num_items is None else num_items), rows


def _loss_options():
    return {k: SMALL[k] for k in ("temperature", "kd_weight", "ce_weight")}


@pytest.mark.parametrize(
    "loss, fused_linear, target",
    [
        pytest.param("fastkd", False, ("torch", "cpu"), id="kdloss-torch-cpu"),
        *[
            pytest.param("fastkd", False, p.values[0], id=f"kdloss-{p.id}", marks=p.marks)
            for p in kernel_targets()
        ],
        pytest.param("torch", False, ("torch", "cpu"), id="plain-logits"),
        pytest.param("torch", True, ("torch", "cpu"), id="plain-hidden-states"),
        pytest.param("fastkd", True, ("torch", "cpu"), id="fused-torch-cpu"),
        *[
            pytest.param("fastkd", True, p.values[0], id=f"fused-{p.id}", marks=p.marks)
            for p in kernel_targets()
        ],
    ],
)
def test_label_shift_and_masking(loss, fused_linear, target):
    backend, device = target
    cfg = ex.RunConfig(
        **{**SMALL, "teacher_steps": 0},
        loss=loss,
        fused_linear=fused_linear,
        backend=backend,
        device=device,
    )
    trainer = ex.build_trainer(cfg)
    batch = {k: v.to(trainer.args.device) for k, v in hand_batch().items()}
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        s = trainer.model(**inputs).logits
        t = trainer.teacher_model(**inputs).logits
    expected, rows = looped_loss(s, t, batch["labels"], **_loss_options())
    assert rows == int((batch["labels"][:, 1:] != -100).sum()) > 0
    got = trainer.compute_loss(trainer.model, dict(batch))
    assert math.isclose(got.item(), expected, rel_tol=1e-5), (got.item(), expected)

    # Gradient accumulation: the Trainer counts the same rows, and passing the count of a
    # larger accumulated batch divides by it instead.
    _, num_items = trainer.get_batch_samples(iter([dict(batch)]), 1, trainer.args.device)
    assert int(num_items) == rows
    expected_ga, _ = looped_loss(s, t, batch["labels"], **_loss_options(), num_items=3 * rows)
    got_ga = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=3 * rows)
    assert math.isclose(got_ga.item(), expected_ga, rel_tol=1e-5)


@pytest.mark.parametrize("fused_linear", [False, True], ids=["logits", "fused-linear"])
def test_gradient_accumulation_equals_one_big_batch(fused_linear):
    """One SGD step over the same 8 sequences, as one batch of 8 or as 2 accumulated
    micro-batches of 4 (each padded to its own width): num_items_in_batch makes the two the
    same update. Dividing each micro-batch by its own row count would not."""
    common = dict(
        examples=8,
        steps=1,
        teacher_steps=0,
        optim="sgd",
        lr=0.5,
        loss="fastkd",
        fused_linear=fused_linear,
        device="cpu",
    )
    one, _, _ = run(**common, batch_size=8, grad_accum=1)
    two, _, _ = run(**common, batch_size=4, grad_accum=2)
    initial = _initial_student()
    moved = weights_relative_difference(one.model, initial)
    assert moved > 1e-3
    assert weights_relative_difference(two.model, one.model) <= 1e-5
    assert math.isclose(sum(two.micro_batch_losses), one.micro_batch_losses[0], rel_tol=1e-6)


def test_plain_formula_is_the_kl_div_one_liner():
    """The example's plain formula is the usual F.kl_div + cross_entropy (no mask, no
    accumulation: every row labelled, denominator = rows)."""
    gen = torch.Generator().manual_seed(3)
    s = torch.randn(6, 11, generator=gen) * 4
    t = torch.randn(6, 11, generator=gen) * 4
    y = torch.randint(0, 11, (6,), generator=gen)
    T = 2.0
    one_liner = 0.3 * F.kl_div(
        F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction="batchmean"
    ) * T**2 + 0.7 * F.cross_entropy(s, y)
    got = ex.plain_kd_loss(s, t, y, temperature=T, kd_weight=0.3, ce_weight=0.7)
    torch.testing.assert_close(got, one_liner, rtol=1e-6, atol=0)


# --- The command line, as the README runs it (fewer steps) --------------------------------


def test_cli_tiny(capsys):
    ex.main(["--tiny", "--steps", "2", "--teacher-steps", "2"])
    out = capsys.readouterr().out
    assert "loss=fastkd (logits + KDLoss, forward_kl)" in out
    assert "2 steps in" in out
    ex.main(["--tiny", "--steps", "2", "--teacher-steps", "0", "--divergence", "tvd"])
    assert "loss=fastkd (logits + KDLoss, tvd)" in capsys.readouterr().out


def test_cli_tiny_fused_linear(capsys):
    argv = ["--tiny", "--fused-linear", "--steps", "2", "--teacher-steps", "2"]
    ex.main([*argv, "--report-vocab", "4096"])
    out = capsys.readouterr().out
    assert "loss=fastkd (hidden states + FusedLinearKDLoss, forward_kl)" in out
    assert "V=4096" in out
    fused_lines = [line for line in out.splitlines() if "fastkd.FusedLinearKDLoss " in line]
    assert len(fused_lines) == 2 and all("MiB" in line for line in fused_lines), out
