"""Offline distillation from a top-k cache: a teacher pass writes the teacher's top-k
log-probabilities to disk, then ``transformers.Trainer`` distils a student from the cache
alone (the teacher is not loaded during training).

    python examples/offline_topk_distill.py --tiny                    # raw teacher + tail bucket
    python examples/offline_topk_distill.py --tiny --teacher-normalization renormalize
    python examples/offline_topk_distill.py --tiny --teacher-normalization renormalize \\
        --student-normalization topk                                  # axolotl's kd_normalize_topk
    python examples/offline_topk_distill.py --tiny --tail none        # verl's forward_kl_topk

1. Teacher pass (:func:`write_topk_cache`): the teacher's final hidden states and LM head go
   through ``fastkd.topk_logprobs_from_hidden`` (a chunk of rows at a time: the N x V
   teacher logits never exist), and each example's (L, K) pairs are written as one batch of
   a ``fastkd.TopKShardWriter`` (safetensors shards, int32 ids, float16 logprobs). Pairs are
   kept for every position of an example; the loss ignores those whose next token is not
   labelled (a pipeline short of disk would keep only the labelled ones).
2. Training (:class:`TopKDistillationTrainer`): the dataset yields each example with its
   index, and :class:`TopKCollator` reads that example's pairs from a ``fastkd.TopKReader``
   (memory-mapped: only the rows asked for are read), padded like the tokens. The loss is
   ``fastkd.KDLoss`` with a ``fastkd.TopKTeacher``, the labels shifted as in
   hf_trainer_distill.py (row i predicts token i + 1) and ``num_items_in_batch`` passed
   through.

The producer divides the teacher's logits by the loss's temperature before its top-k, and
the cache records it; the loss is told so through ``teacher_temperature``. Models are tiny
random Llama-style ones and the data the synthetic counting task of hf_trainer_distill.py:
nothing is downloaded.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is fetched at run time

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import Trainer, TrainingArguments

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from hf_trainer_distill import (  # noqa: E402
    IGNORE_INDEX,
    PAD,
    CountingTask,
    collate,
    completion_accuracy,
    final_hidden_states,
    pretrain_teacher,
)
from tiny_models import tiny_llama  # noqa: E402

import fastkd  # noqa: E402

# --- 1. The teacher pass ---------------------------------------------------------------------


def write_topk_cache(
    teacher,
    dataset,
    cache_dir: str,
    *,
    k: int,
    temperature: float,
    batch_size: int,
    chunk_size: int | None = None,
    shard_bytes: int = 256 * 2**20,
) -> None:
    """Writes the teacher's top-``k`` pairs at ``temperature`` for every example of
    ``dataset``, in order: batch j of the cache is example j, shaped (len(input_ids), k)."""
    device = next(teacher.parameters()).device
    head = teacher.get_output_embeddings()
    with fastkd.TopKShardWriter(
        cache_dir,
        k=k,
        vocab_size=head.weight.shape[0],
        temperature=temperature,
        shard_bytes=shard_bytes,
        metadata={"teacher": type(teacher).__name__},
    ) as writer:
        for start in range(0, len(dataset), batch_size):
            examples = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            batch = {key: v.to(device) for key, v in collate(examples).items()}
            del batch["labels"]
            with torch.no_grad():
                hidden = final_hidden_states(teacher, batch)
            pairs = fastkd.topk_logprobs_from_hidden(
                hidden, head.weight, k, head.bias, temperature=temperature, chunk_size=chunk_size
            )
            for b, example in enumerate(examples):
                length = len(example["input_ids"])  # right padding: the first `length` rows
                writer.write(
                    fastkd.TopKTeacher(pairs.token_ids[b, :length], pairs.logprobs[b, :length])
                )


# --- 2. Training from the cache --------------------------------------------------------------


class IndexedExamples(torch.utils.data.Dataset):
    """The examples with their index, by which the collator finds their cached pairs (the
    Trainer shuffles)."""

    def __init__(self, examples: torch.utils.data.Dataset):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        return {**self.examples[i], "index": i}


class TopKCollator:
    """``collate`` (right padding) plus the examples' cached pairs: ``teacher_token_ids``
    (B, L, K) int32 and ``teacher_logprobs`` (B, L, K) in the cache's dtype, padded with
    id 0 and logprob -inf (what a TopKTeacher reads as padding)."""

    def __init__(self, reader: fastkd.TopKReader):
        self.reader = reader

    def __call__(self, examples: list[dict]) -> dict[str, Tensor]:
        batch = collate([{k: e[k] for k in ("input_ids", "labels")} for e in examples])
        B, L = batch["input_ids"].shape
        K = self.reader.k
        ids = torch.zeros((B, L, K), dtype=torch.int32)
        lps = torch.full((B, L, K), -math.inf, dtype=self.reader.logprobs_dtype)
        for b, e in enumerate(examples):
            pairs = self.reader.batch(e["index"])  # (len(input_ids), K), memory-mapped
            ids[b, : pairs.token_ids.shape[0]] = pairs.token_ids
            lps[b, : pairs.logprobs.shape[0]] = pairs.logprobs
        return {**batch, "teacher_token_ids": ids, "teacher_logprobs": lps}


class TopKDistillationTrainer(Trainer):
    """A Trainer whose loss is ``loss_fn(student_logits, TopKTeacher, next_tokens,
    num_items_in_batch=...)`` (``fastkd.KDLoss``), the teacher's pairs coming with the batch.

    Gradient accumulation as in hf_trainer_distill.py: the loss is divided by
    ``num_items_in_batch`` whenever the Trainer passes it, which is when the Trainer treats
    the loss as already scaled."""

    def __init__(self, *args, loss_fn, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_fn = loss_fn
        self.micro_batch_losses: list[float] = []  # for the printout and the tests

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        teacher = fastkd.TopKTeacher(
            inputs.pop("teacher_token_ids"), inputs.pop("teacher_logprobs")
        )
        # Row i (logits and pairs at position i) is scored against token i + 1.
        next_tokens = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        outputs = model(**inputs)
        loss = self.loss_fn(
            outputs.logits, teacher, next_tokens, num_items_in_batch=num_items_in_batch
        )
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # as Trainer.compute_loss does
        self.micro_batch_losses.append(loss.detach().item())
        return (loss, outputs) if return_outputs else loss


# --- Running it ------------------------------------------------------------------------------


@dataclass
class RunConfig:
    vocab_size: int = 32000
    student_hidden: int = 256
    student_layers: int = 4
    teacher_hidden: int = 512
    teacher_layers: int = 4
    max_prompt: int = 48
    examples: int = 4096
    batch_size: int = 16
    grad_accum: int = 2
    steps: int = 200
    teacher_steps: int = 200
    lr: float = 1e-3
    k: int = 64
    producer_chunk: int | None = None  # rows per chunk of the teacher pass (None: by memory)
    shard_bytes: int = 256 * 2**20
    divergence: str = "forward_kl"
    temperature: float = 2.0
    kd_weight: float = 0.5
    ce_weight: float = 0.5
    teacher_normalization: str = "raw"
    student_normalization: str = "full"
    topk_tail: str = "bucket"
    backend: str = "auto"
    device: str = "auto"  # "auto" (CUDA when there is one), "cpu" or "cuda"
    seed: int = 0
    output_dir: str = "/tmp/fastkd-offline-topk"


TINY = dict(
    vocab_size=256,
    student_hidden=32,
    student_layers=2,
    teacher_hidden=64,
    teacher_layers=2,
    max_prompt=8,
    examples=256,
    batch_size=8,
    grad_accum=2,
    steps=30,
    teacher_steps=60,
    lr=3e-3,
    k=16,
    producer_chunk=64,  # several chunks per batch, to show the producer's chunking
    shard_bytes=16 * 2**10,  # several shards
)


def _device(cfg: RunConfig) -> str:
    return "cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu"


def build_dataset(cfg: RunConfig) -> CountingTask:
    return CountingTask(cfg.examples, cfg.vocab_size, cfg.max_prompt, seed=cfg.seed)


def build_teacher(cfg: RunConfig, dataset):
    teacher = tiny_llama(
        cfg.vocab_size,
        cfg.teacher_hidden,
        cfg.teacher_layers,
        seed=cfg.seed + 2,
        max_positions=2 * cfg.max_prompt + 3,
        pad_token_id=PAD,
    ).to(_device(cfg))
    pretrain_teacher(
        teacher, dataset, steps=cfg.teacher_steps, batch_size=cfg.batch_size, lr=cfg.lr,
        seed=cfg.seed + 3,
    )  # fmt: skip
    return teacher.eval().requires_grad_(False)


def teacher_pass(cfg: RunConfig, dataset, cache_dir: str):
    """Builds and trains the teacher, writes its cache; returns the teacher."""
    teacher = build_teacher(cfg, dataset)
    write_topk_cache(
        teacher,
        dataset,
        cache_dir,
        k=cfg.k,
        temperature=cfg.temperature,
        batch_size=cfg.batch_size,
        chunk_size=cfg.producer_chunk,
        shard_bytes=cfg.shard_bytes,
    )
    return teacher


def make_loss_fn(cfg: RunConfig, reader: fastkd.TopKReader) -> fastkd.KDLoss:
    return fastkd.KDLoss(
        cfg.divergence,
        temperature=cfg.temperature,
        kd_weight=cfg.kd_weight,
        ce_weight=cfg.ce_weight,
        ignore_index=IGNORE_INDEX,
        teacher_normalization=cfg.teacher_normalization,
        student_normalization=cfg.student_normalization,
        topk_tail=cfg.topk_tail,
        teacher_temperature=reader.temperature,  # what the producer divided by
        backend=cfg.backend,
    )


def build_trainer(cfg: RunConfig, dataset, cache_dir: str) -> TopKDistillationTrainer:
    """The student and the Trainer reading ``cache_dir``; the same seed gives the same run."""
    reader = fastkd.TopKReader(cache_dir)
    if reader.num_batches != len(dataset):
        raise ValueError(f"{cache_dir!r} holds {reader.num_batches} examples, not {len(dataset)}")
    student = tiny_llama(
        cfg.vocab_size,
        cfg.student_hidden,
        cfg.student_layers,
        seed=cfg.seed + 1,
        max_positions=2 * cfg.max_prompt + 3,
        pad_token_id=PAD,
    )
    args = TrainingArguments(
        output_dir=cfg.output_dir,
        max_steps=cfg.steps,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        lr_scheduler_type="constant",
        logging_steps=max(cfg.steps // 5, 1),
        save_strategy="no",
        report_to="none",
        seed=cfg.seed,
        remove_unused_columns=False,  # the collator needs each example's "index"
        dataloader_num_workers=0,
        disable_tqdm=True,
        use_cpu=_device(cfg) == "cpu",
    )
    return TopKDistillationTrainer(
        model=student,
        args=args,
        train_dataset=IndexedExamples(dataset),
        data_collator=TopKCollator(reader),
        loss_fn=make_loss_fn(cfg, reader),
    )


def _cache_size(cache_dir: str) -> tuple[int, int]:
    files = [f for f in os.listdir(cache_dir) if f.endswith(".safetensors")]
    return len(files), sum(os.path.getsize(os.path.join(cache_dir, f)) for f in files)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU-sized models and run")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--teacher-steps", type=int)
    parser.add_argument("--k", type=int, help="pairs per token in the cache")
    parser.add_argument("--divergence", choices=sorted(fastkd.DIVERGENCES), default="forward_kl")
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--kd-weight", type=float, default=0.5)
    parser.add_argument("--ce-weight", type=float, default=0.5)
    parser.add_argument("--teacher-normalization", choices=["raw", "renormalize"], default="raw")
    parser.add_argument("--student-normalization", choices=["full", "topk"], default="full")
    parser.add_argument(
        "--tail", choices=["bucket", "none"], help="default: bucket with a raw teacher, else none"
    )
    parser.add_argument(
        "--backend", choices=["auto", "cpu", "cuda", "triton", "torch"], default="auto"
    )
    parser.add_argument("--cache-dir", help="where the teacher pass writes (default: a temp dir)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    cfg = RunConfig(**(TINY if args.tiny else {}))
    for name in ("steps", "teacher_steps", "k"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    cfg.divergence, cfg.temperature = args.divergence, args.temperature
    cfg.kd_weight, cfg.ce_weight = args.kd_weight, args.ce_weight
    cfg.teacher_normalization = args.teacher_normalization
    cfg.student_normalization = args.student_normalization
    raw_full = args.teacher_normalization == "raw" and args.student_normalization == "full"
    cfg.topk_tail = args.tail or ("bucket" if raw_full else "none")
    cfg.backend, cfg.seed = args.backend, args.seed
    if args.tiny:
        # Ops this small gain nothing from intra-op threads, and on a busy machine the
        # threads' spin-waits make them many times slower.
        torch.set_num_threads(1)

    start = time.perf_counter()
    dataset = build_dataset(cfg)
    with tempfile.TemporaryDirectory(prefix="fastkd-topk-cache-") as scratch:
        cache_dir = args.cache_dir or os.path.join(scratch, "cache")
        teacher = teacher_pass(cfg, dataset, cache_dir)
        shards, size = _cache_size(cache_dir)
        print(
            f"teacher pass: {len(dataset)} examples, top-{cfg.k} at T={cfg.temperature} in "
            f"{shards} shards, {size / 2**10:.1f} KiB; teacher next-token accuracy "
            f"{completion_accuracy(teacher, dataset):.3f}"
        )
        del teacher  # training reads the cache only
        trainer = build_trainer(cfg, dataset, cache_dir)
        print(
            f"student next-token accuracy before: {completion_accuracy(trainer.model, dataset):.3f}"
        )
        trainer.train()
    losses = trainer.micro_batch_losses
    per_step = [sum(losses[i : i + cfg.grad_accum]) for i in range(0, len(losses), cfg.grad_accum)]
    print(
        f"loss: {cfg.divergence}, teacher {cfg.teacher_normalization}, student "
        f"{cfg.student_normalization}, tail {cfg.topk_tail}"
    )
    print(f"loss per optimizer step: first {per_step[0]:.4f}  last {per_step[-1]:.4f}")
    print(f"student next-token accuracy after: {completion_accuracy(trainer.model, dataset):.3f}")
    print(f"{len(per_step)} steps in {time.perf_counter() - start:.1f} s")
    if not all(math.isfinite(x) for x in losses):
        raise SystemExit("non-finite loss")


if __name__ == "__main__":
    main()
