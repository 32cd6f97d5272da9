"""examples/offline_topk_distill.py: the teacher pass's cache against the teacher's full
log_softmax, and the Trainer's loss from that cache, step by step, against the float64
top-k spec and against a hand-written per-position loop."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from example_testing import import_example, one_thread, weights_relative_difference
from kd_testing import kernel_targets

import fastkd

ex = import_example("offline_topk_distill", "transformers", "safetensors")

# A few seconds per run on one CPU thread: V=96, one layer, 2 x 2 sequences of <= 11 tokens
# per optimizer step, 3 steps. The producer takes 5 rows a chunk and the writer makes
# shards of 1 KiB, so that the cache has several of both.
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
    k=8,
    producer_chunk=5,
    shard_bytes=2**10,
    temperature=2.0,
    kd_weight=0.5,
    ce_weight=0.5,
)
LOSS_RTOL = 1e-5  # a float32 loss against its float64 recomputation
# A float16 logprob is within half an ulp (2**-11 relative) of the float32 producer's, which
# is within float32 rounding of the float64 log_softmax of the teacher's float32 logits.
FP16_RTOL, PRODUCER_ATOL = 2.0**-11, 1e-5

CONVENTIONS = {
    "raw-bucket": dict(teacher_normalization="raw", student_normalization="full",
                       topk_tail="bucket"),  # TRL's tail bucket (here with T^2: DistillKit's)
    "raw-none": dict(teacher_normalization="raw", student_normalization="full",
                     topk_tail="none"),  # verl's forward_kl_topk
    "renormalize-topk": dict(teacher_normalization="renormalize", student_normalization="topk",
                             topk_tail="none"),  # axolotl with kd_normalize_topk
}  # fmt: skip


def targets():
    return [pytest.param(("torch", "cpu"), id="torch-cpu"), *kernel_targets()]


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """(config, dataset, cache directory, teacher): the teacher pass, run once on CPU."""
    with one_thread():
        cfg = ex.RunConfig(**SMALL, device="cpu")
        dataset = ex.build_dataset(cfg)
        cache_dir = str(tmp_path_factory.mktemp("topk") / "cache")
        teacher = ex.teacher_pass(cfg, dataset, cache_dir)
    return cfg, dataset, cache_dir, teacher


def teacher_log_probs(teacher, batch, T):
    """The teacher's full log_softmax(t / T) in float64 on a collated batch, (B, L, V)."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        logits = teacher(**{k: v.to(teacher.device) for k, v in inputs.items()}).logits
    return F.log_softmax(logits.cpu().double() / T, -1)


def assert_pairs_are_the_teachers(ids, lps, reference, real):
    """Stored pairs (..., K) against the teacher's float64 log-probabilities (..., V), on the
    rows where ``real``: the logprobs are the top-K values (sorted), and each is the
    teacher's at its id, both to the float16 rounding of the cache."""
    ids, lps, reference = ids[real].long(), lps[real].double(), reference[real]
    top = reference.topk(ids.shape[-1], -1).values
    tol = FP16_RTOL * top.abs() + PRODUCER_ATOL
    assert ((lps - top).abs() <= tol).all(), (lps - top).abs().max()
    assert ((lps - reference.gather(-1, ids)).abs() <= tol).all()
    assert (lps[:, 1:] <= lps[:, :-1]).all()  # decreasing
    assert (ids.sort(-1).values.diff(dim=-1) > 0).all()  # distinct


# --- the cache -----------------------------------------------------------------------------


def test_cache_round_trips(cached):
    """Batch j of the cache is example j, (len, K), equal to log_softmax(t / T).topk(K) of the
    teacher's full logits to float16 rounding, with the producer's metadata."""
    cfg, dataset, cache_dir, teacher = cached
    shards = [f for f in os.listdir(cache_dir) if f.endswith(".safetensors")]
    assert len(shards) >= 3, shards  # the reads below cross shards
    reader = fastkd.TopKReader(cache_dir)
    assert reader.complete and reader.num_batches == len(dataset)
    assert (reader.k, reader.vocab_size, reader.temperature) == (
        cfg.k,
        cfg.vocab_size,
        cfg.temperature,
    )
    assert reader.logprobs_dtype == torch.float16

    examples = [dataset[i] for i in range(len(dataset))]
    batch = ex.collate(examples)
    reference = teacher_log_probs(teacher, batch, cfg.temperature)
    for j, example in enumerate(examples):
        pairs = reader.batch(j)
        length = len(example["input_ids"])
        assert pairs.token_ids.shape == (length, cfg.k) and pairs.token_ids.dtype == torch.int32
        real = torch.ones(length, dtype=torch.bool)
        assert_pairs_are_the_teachers(pairs.token_ids, pairs.logprobs, reference[j, :length], real)
    # And the flat rows are those batches, in order.
    flat = reader[0 : len(reader)]
    assert len(reader) == int(batch["attention_mask"].sum())
    assert torch.equal(flat.token_ids[: len(examples[0]["input_ids"])], reader.batch(0).token_ids)


# --- the loss, step by step ----------------------------------------------------------------


def record_micro_batches(trainer):
    """Wraps trainer.compute_loss to keep, per call, the batch, the student's logits of that
    forward, the num_items_in_batch the Trainer passed and the loss returned (all on CPU)."""
    records, compute_loss = [], trainer.compute_loss

    def recorded(model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = compute_loss(
            model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        records.append(
            dict(
                batch={k: v.detach().cpu() for k, v in inputs.items()},
                logits=outputs.logits.detach().cpu(),
                num_items=None if num_items_in_batch is None else int(num_items_in_batch),
                loss=loss.detach().item(),
            )
        )
        return (loss, outputs) if return_outputs else loss

    trainer.compute_loss = recorded
    return records


def next_token_labels(labels):
    """Row i is scored against token i + 1; the last row has none."""
    return torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1)


def reference_loss(cfg, logits, batch, num_items):
    """fastkd.topk_loss_reference in float64 on the batch's pairs and the student's logits."""
    teacher = fastkd.TopKTeacher(
        batch["teacher_token_ids"].long(), batch["teacher_logprobs"].double()
    )
    loss, _, _ = fastkd.topk_loss_reference(
        logits.double(),
        teacher,
        next_token_labels(batch["labels"]),
        divergence=cfg.divergence,
        temperature=cfg.temperature,
        kd_weight=cfg.kd_weight,
        ce_weight=cfg.ce_weight,
        teacher_normalization=cfg.teacher_normalization,
        student_normalization=cfg.student_normalization,
        topk_tail=cfg.topk_tail,
        num_items_in_batch=num_items,
    )
    return loss.item()


def fixed_batch_loss(trainer, cfg, n=8):
    """The float64 spec on the first n examples with the student as it stands."""
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(n)])
    device = next(trainer.model.parameters()).device
    inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        logits = trainer.model(**inputs).logits.cpu()
    return reference_loss(cfg, logits, batch, None)


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("target", targets())
def test_loss_matches_the_spec_step_by_step(cached, target, convention):
    """Every micro-batch's loss equals the float64 spec recomputed from that batch's cached
    pairs, the student's logits of that forward and the Trainer's num_items_in_batch; the
    pairs in each batch are its examples' (the Trainer shuffles); the student learns."""
    cfg, dataset, cache_dir, teacher = cached
    backend, device = target
    run_cfg = ex.RunConfig(**SMALL, **CONVENTIONS[convention], backend=backend, device=device)
    trainer = ex.build_trainer(run_cfg, dataset, cache_dir)
    initial = ex.tiny_llama(
        cfg.vocab_size, cfg.student_hidden, cfg.student_layers, seed=cfg.seed + 1,
        max_positions=2 * cfg.max_prompt + 3, pad_token_id=ex.PAD,
    )  # fmt: skip
    before = fixed_batch_loss(trainer, run_cfg)
    records = record_micro_batches(trainer)
    trainer.train()

    assert len(records) == cfg.steps * cfg.grad_accum
    assert [r["loss"] for r in records] == trainer.micro_batch_losses
    seen = set()
    for step in range(cfg.steps):
        micro = records[step * cfg.grad_accum : (step + 1) * cfg.grad_accum]
        # The Trainer's count over the step's micro-batches is what each divides by.
        counted = sum(int((r["batch"]["labels"][:, 1:] != -100).sum()) for r in micro)
        for r in micro:
            assert r["num_items"] == counted
            expected = reference_loss(run_cfg, r["logits"], r["batch"], r["num_items"])
            assert math.isclose(r["loss"], expected, rel_tol=LOSS_RTOL), (r["loss"], expected)
            batch = r["batch"]
            real = batch["attention_mask"].bool()
            reference = teacher_log_probs(teacher, batch, cfg.temperature)
            ids, lps = batch["teacher_token_ids"], batch["teacher_logprobs"]
            assert_pairs_are_the_teachers(ids, lps, reference, real)
            assert (lps[~real] == -math.inf).all()  # padded positions are padding pairs
            seen.update(map(tuple, batch["input_ids"].tolist()))
    assert len(seen) > cfg.batch_size  # several different batches were checked
    assert weights_relative_difference(trainer.model, initial) > 1e-3  # it trained
    after = fixed_batch_loss(trainer, run_cfg)
    assert after < before - 0.05, (before, after)


# --- the label shift and masking against a loop --------------------------------------------


def looped_tail_bucket_loss(s, ids, lps, labels, *, T, kd_weight, ce_weight, num_items=None):
    """Per position in float64, TRL's tail-bucket KL times T^2 (DistillKit's
    symmetric_uniform): row i of sequence b is scored when token i + 1 is labelled; p over
    the real pairs is e^l, q = softmax(s / T) at their ids, each side's tail is 1 minus its
    sum; plus -log softmax(s)[token i + 1]. Summed, divided by the rows (or num_items)."""
    total, rows = 0.0, 0
    for b in range(labels.shape[0]):
        for i in range(labels.shape[1] - 1):
            target = int(labels[b, i + 1])
            if target == -100:
                continue
            real = lps[b, i] > -math.inf
            p = lps[b, i][real].double().exp()
            q = torch.softmax(s[b, i].double() / T, -1)[ids[b, i][real].long()]
            p_tail, q_tail = 1 - p.sum(), 1 - q.sum()
            kl = (p * (p.log() - q.log())).sum() + p_tail * (p_tail.log() - q_tail.log())
            ce = -torch.log_softmax(s[b, i].double(), -1)[target]
            total += kd_weight * T**2 * kl.item() + ce_weight * ce.item()
            rows += 1
    return total / (rows if num_items is None else num_items), rows


@pytest.mark.parametrize("target", targets())
def test_label_shift_and_masking(cached, target):
    """compute_loss on a hand-made batch (two examples of different lengths and one without
    any labelled token, in that order) equals the per-position loop, with and without a
    num_items_in_batch of a larger accumulated batch."""
    cfg, dataset, cache_dir, _ = cached
    backend, device = target
    trainer = ex.build_trainer(
        ex.RunConfig(**SMALL, backend=backend, device=device), dataset, cache_dir
    )
    indexed = trainer.train_dataset
    prompt_only = {**indexed[2], "labels": [-100] * len(indexed[2]["labels"])}
    batch = trainer.data_collator([indexed[5], indexed[0], prompt_only])
    assert len(set(map(len, (indexed[5]["input_ids"], indexed[0]["input_ids"])))) == 2
    with torch.no_grad():
        inputs = {k: batch[k].to(trainer.args.device) for k in ("input_ids", "attention_mask")}
        s = trainer.model(**inputs).logits.cpu()
    options = dict(T=cfg.temperature, kd_weight=cfg.kd_weight, ce_weight=cfg.ce_weight)
    args = (s, batch["teacher_token_ids"], batch["teacher_logprobs"], batch["labels"])
    expected, rows = looped_tail_bucket_loss(*args, **options)
    assert rows == int((batch["labels"][:, 1:] != -100).sum()) > 0
    on_device = {k: v.to(trainer.args.device) for k, v in batch.items()}
    got = trainer.compute_loss(trainer.model, dict(on_device)).item()
    assert math.isclose(got, expected, rel_tol=LOSS_RTOL), (got, expected)

    expected_ga, _ = looped_tail_bucket_loss(*args, **options, num_items=3 * rows)
    got_ga = trainer.compute_loss(trainer.model, dict(on_device), num_items_in_batch=3 * rows)
    assert math.isclose(got_ga.item(), expected_ga, rel_tol=LOSS_RTOL), (got_ga, expected_ga)


# --- the command line, as the README runs it (fewer steps) ---------------------------------


def test_cli_tiny(capsys):
    ex.main(["--tiny", "--steps", "2", "--teacher-steps", "2"])
    out = capsys.readouterr().out
    assert (
        "top-16 at T=2.0" in out
        and "loss: forward_kl, teacher raw, student full, tail bucket" in out
    )
    assert "2 steps in" in out
    argv = ["--tiny", "--steps", "2", "--teacher-steps", "0", "--teacher-normalization",
            "renormalize", "--student-normalization", "topk"]  # fmt: skip
    ex.main(argv)
    assert "teacher renormalize, student topk, tail none" in capsys.readouterr().out
