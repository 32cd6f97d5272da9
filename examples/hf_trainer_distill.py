"""Distil a teacher into a student inside ``transformers.Trainer``, with fastkd as the loss.

    python examples/hf_trainer_distill.py --tiny                 # logits + fastkd.KDLoss
    python examples/hf_trainer_distill.py --tiny --fused-linear  # hidden states + FusedLinearKDLoss
    python examples/hf_trainer_distill.py --tiny --loss torch    # the plain formula fastkd replaces
    python examples/hf_trainer_distill.py --tiny --divergence reverse_kl  # any fastkd divergence

The integration is :class:`DistillationTrainer` (a ``compute_loss`` override, 30 lines):

- causal-LM shift: the logits (or final hidden state) at position i are scored against the
  token at i + 1. The labels are shifted, not the logits: ``labels[:, 1:]`` padded with -100
  at the end, so the last position drops out and the logits go in whole (a ``[:, :-1]``
  slice would make the loss copy both N x V tensors). The KD rows are exactly the CE rows
  (labels of -100, i.e. prompt and padding, drop out of both);
- ``num_items_in_batch`` (the Trainer's count of ``labels[:, 1:] != -100`` over all the
  micro-batches of one optimizer step) is passed through, so gradient accumulation divides
  by the tokens of the whole accumulated batch, like the Trainer's own causal-LM loss;
- ``--fused-linear`` takes the base model's final hidden states (no logits are computed)
  and both ``lm_head`` weights into ``fastkd.FusedLinearKDLoss``.

The models are small randomly initialised Llama-style models built from a config and the
data is a synthetic counting task, so nothing is downloaded. With
``--teacher-steps`` the teacher is first trained on the task, so that it has something to
teach.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is fetched at run time

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import Trainer, TrainingArguments

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from loss_head_memory import print_memory_report  # noqa: E402
from tiny_models import tiny_llama  # noqa: E402

import fastkd  # noqa: E402

IGNORE_INDEX = -100  # the Trainer's and Hugging Face models' label for "no loss here"
PAD, BOS, SEP, EOS = 0, 1, 2, 3  # special token ids of the synthetic task; content ids follow


# --- The plain-PyTorch formulas fastkd replaces (the tests run the example with both) -------


def plain_kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    *,
    temperature: float,
    kd_weight: float,
    ce_weight: float,
    num_items_in_batch: Tensor | int | None = None,
) -> Tensor:
    """Hinton KD as usually written: T^2 * KL(teacher || student) at temperature T plus the
    hard-label cross-entropy, summed over the rows whose label is not -100 and divided by
    ``num_items_in_batch`` (or by the number of those rows). Materialises several float32
    copies of the rows' logits."""
    V = student_logits.size(-1)
    keep = labels.reshape(-1) != IGNORE_INDEX
    s = student_logits.reshape(-1, V)[keep].float()
    t = teacher_logits.reshape(-1, V)[keep].float()
    y = labels.reshape(-1)[keep]
    kl = F.kl_div(
        F.log_softmax(s / temperature, dim=-1),
        F.log_softmax(t / temperature, dim=-1),
        reduction="sum",
        log_target=True,
    )
    ce = F.cross_entropy(s, y, reduction="sum")
    total = kd_weight * temperature**2 * kl + ce_weight * ce
    denominator = keep.sum() if num_items_in_batch is None else num_items_in_batch
    return total / torch.as_tensor(denominator, device=total.device).clamp_min(1)


def plain_fused_linear_kd_loss(
    student_hidden, student_weight, teacher_hidden, teacher_weight, labels, **options
) -> Tensor:
    """What FusedLinearKDLoss replaces: the full logits of both heads, then the formula."""
    s_logits = F.linear(student_hidden, student_weight)
    t_logits = F.linear(teacher_hidden, teacher_weight)
    return plain_kd_loss(s_logits, t_logits, labels, **options)


# --- The integration -----------------------------------------------------------------------


def final_hidden_states(model, inputs: dict) -> Tensor:
    """The base model's last (normed) hidden states, through the model's own forward (so DDP
    and other wrappers see the call), with no logits computed: ``logits_to_keep`` selects no
    position for the LM head."""
    no_position = torch.empty(0, dtype=torch.long, device=inputs["input_ids"].device)
    out = model(**inputs, output_hidden_states=True, logits_to_keep=no_position)
    return out.hidden_states[-1]


class DistillationTrainer(Trainer):
    """A Trainer whose loss distils ``teacher_model`` into the trained model.

    ``loss_fn`` is called as ``loss_fn(student_logits, teacher_logits, labels,
    num_items_in_batch=...)`` (``fastkd.KDLoss``), or with ``fused_linear=True`` as
    ``loss_fn(student_hidden, student_lm_head_weight, teacher_hidden, teacher_lm_head_weight,
    labels, num_items_in_batch=...)`` (``fastkd.FusedLinearKDLoss``).

    Gradient accumulation: the loss is divided by ``num_items_in_batch`` whenever the Trainer
    passes it, and that is exactly when the Trainer's default rule (``loss_is_scaled_for_ga``
    left None) treats the loss as already scaled, so no extra division by the number of
    accumulation steps happens.
    """

    def __init__(self, *args, teacher_model, loss_fn, fused_linear: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher_model = teacher_model.to(self.args.device).eval().requires_grad_(False)
        self.loss_fn = loss_fn
        self.fused_linear = fused_linear
        self.micro_batch_losses: list[float] = []  # for the printout and the tests

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels = inputs.pop("labels")  # the loss is ours: the model computes none
        # Row i (logits at position i) is scored against token i + 1; the last has none.
        next_tokens = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        outputs = None
        if self.fused_linear:
            student_hidden = final_hidden_states(model, inputs)
            with torch.no_grad():
                teacher_hidden = final_hidden_states(self.teacher_model, inputs)
            student_head = self.accelerator.unwrap_model(model).get_output_embeddings()
            teacher_head = self.teacher_model.get_output_embeddings()
            loss = self.loss_fn(
                student_hidden,
                student_head.weight,
                teacher_hidden,
                teacher_head.weight,
                next_tokens,
                num_items_in_batch=num_items_in_batch,
            )
        else:
            outputs = model(**inputs)
            with torch.no_grad():
                teacher_logits = self.teacher_model(**inputs).logits
            loss = self.loss_fn(
                outputs.logits,
                teacher_logits,
                next_tokens,
                num_items_in_batch=num_items_in_batch,
            )
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # num_items_in_batch counts every process's tokens and DDP averages the gradients
            # over processes: undo that average, as the Trainer's own compute_loss does.
            loss = loss * self.accelerator.num_processes
        # .item() syncs with the device once per micro-batch: fine here, drop it in production.
        self.micro_batch_losses.append(loss.detach().item())
        return (loss, outputs) if return_outputs else loss


def make_loss_fn(
    kind: str, *, fused_linear: bool, divergence, temperature, kd_weight, ce_weight, backend
):
    """fastkd's loss module, or the plain formula it replaces, with one set of options."""
    options = dict(temperature=temperature, kd_weight=kd_weight, ce_weight=ce_weight)
    if kind == "torch":
        if divergence != "forward_kl":
            raise ValueError(f"the plain formula is forward_kl's, got divergence={divergence!r}")
        plain = plain_fused_linear_kd_loss if fused_linear else plain_kd_loss
        return lambda *args, num_items_in_batch=None: plain(
            *args, num_items_in_batch=num_items_in_batch, **options
        )
    options.update(divergence=divergence, ignore_index=IGNORE_INDEX, backend=backend)
    if fused_linear:
        return fastkd.FusedLinearKDLoss(**options)
    return fastkd.KDLoss(**options)


# --- Synthetic data --------------------------------------------------------------------------


class CountingTask(torch.utils.data.Dataset):
    """``BOS prompt SEP completion EOS``: the prompt is 3..max_prompt random content tokens,
    the completion counts on from the prompt's last token for as many tokens (content ids
    wrap around). Prompts differ in length, so batches need padding. Only the completion
    and EOS are labelled: BOS, the prompt and SEP carry -100."""

    def __init__(self, size: int, vocab_size: int, max_prompt: int, seed: int):
        gen = torch.Generator().manual_seed(seed)
        n_content = vocab_size - 4
        self.examples = []
        for _ in range(size):
            length = int(torch.randint(3, max_prompt + 1, (), generator=gen))
            prompt = torch.randint(0, n_content, (length,), generator=gen)
            completion = (prompt[-1] + torch.arange(1, length + 1)) % n_content
            ids = [BOS, *(prompt + 4).tolist(), SEP, *(completion + 4).tolist(), EOS]
            labels = [IGNORE_INDEX] * (length + 2) + ids[length + 2 :]
            self.examples.append({"input_ids": ids, "labels": labels})

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        return self.examples[i]


def collate(examples: list[dict]) -> dict[str, Tensor]:
    """Right-pads to the longest example: PAD ids, attention 0, label -100."""
    width = max(len(e["input_ids"]) for e in examples)
    batch = {"input_ids": [], "attention_mask": [], "labels": []}
    for e in examples:
        pad = width - len(e["input_ids"])
        batch["input_ids"].append(e["input_ids"] + [PAD] * pad)
        batch["attention_mask"].append([1] * len(e["input_ids"]) + [0] * pad)
        batch["labels"].append(e["labels"] + [IGNORE_INDEX] * pad)
    return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}


def pretrain_teacher(teacher, dataset, *, steps: int, batch_size: int, lr: float, seed: int):
    """A few steps of plain next-token training, so the teacher knows the task."""
    if steps == 0:
        return
    gen = torch.Generator().manual_seed(seed)
    device = next(teacher.parameters()).device
    optimizer = torch.optim.AdamW(teacher.parameters(), lr=lr)
    teacher.train()
    for _ in range(steps):
        idx = torch.randint(0, len(dataset), (batch_size,), generator=gen).tolist()
        batch = {k: v.to(device) for k, v in collate([dataset[i] for i in idx]).items()}
        teacher(**batch).loss.backward()  # the model's own shifted, masked CE
        optimizer.step()
        optimizer.zero_grad()
    teacher.eval()


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
    optim: str = "adamw_torch"
    divergence: str = "forward_kl"  # any of fastkd.DIVERGENCES with loss="fastkd"
    temperature: float = 2.0
    kd_weight: float = 0.5
    ce_weight: float = 0.5
    loss: str = "fastkd"  # "fastkd" or "torch" (the plain formula)
    fused_linear: bool = False
    backend: str = "auto"
    device: str = "auto"  # "auto" (CUDA when there is one), "cpu" or "cuda"
    seed: int = 0
    output_dir: str = "/tmp/fastkd-hf-distill"


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
)


def build_trainer(cfg: RunConfig) -> DistillationTrainer:
    """Models, data and the Trainer for one run; the same seed gives the same run."""
    use_cuda = cfg.device != "cpu" and torch.cuda.is_available()
    dataset = CountingTask(cfg.examples, cfg.vocab_size, cfg.max_prompt, seed=cfg.seed)
    positions = 2 * cfg.max_prompt + 3
    student = tiny_llama(
        cfg.vocab_size,
        cfg.student_hidden,
        cfg.student_layers,
        seed=cfg.seed + 1,
        max_positions=positions,
        pad_token_id=PAD,
    )
    teacher = tiny_llama(
        cfg.vocab_size,
        cfg.teacher_hidden,
        cfg.teacher_layers,
        seed=cfg.seed + 2,
        max_positions=positions,
        pad_token_id=PAD,
    ).to("cuda" if use_cuda else "cpu")
    pretrain_teacher(
        teacher,
        dataset,
        steps=cfg.teacher_steps,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        seed=cfg.seed + 3,
    )
    args = TrainingArguments(
        output_dir=cfg.output_dir,
        max_steps=cfg.steps,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        optim=cfg.optim,
        lr_scheduler_type="constant",
        logging_steps=max(cfg.steps // 5, 1),
        save_strategy="no",
        report_to="none",
        seed=cfg.seed,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
        use_cpu=not use_cuda,
    )
    loss_fn = make_loss_fn(
        cfg.loss,
        fused_linear=cfg.fused_linear,
        divergence=cfg.divergence,
        temperature=cfg.temperature,
        kd_weight=cfg.kd_weight,
        ce_weight=cfg.ce_weight,
        backend=cfg.backend,
    )
    return DistillationTrainer(
        model=student,
        args=args,
        train_dataset=dataset,
        data_collator=collate,
        teacher_model=teacher,
        loss_fn=loss_fn,
        fused_linear=cfg.fused_linear,
    )


def run(cfg: RunConfig) -> DistillationTrainer:
    trainer = build_trainer(cfg)
    trainer.train()
    return trainer


def completion_accuracy(model, dataset, n: int = 64) -> float:
    """Greedy next-token accuracy on the labelled positions of the first n examples."""
    batch = collate([dataset[i] for i in range(min(n, len(dataset)))])
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    labels = batch.pop("labels")
    with torch.no_grad():
        predicted = model(**batch).logits[:, :-1].argmax(-1)
    scored = labels[:, 1:] != IGNORE_INDEX
    return (predicted == labels[:, 1:])[scored].float().mean().item()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU-sized models and run")
    parser.add_argument("--fused-linear", action="store_true", help="FusedLinearKDLoss path")
    parser.add_argument("--loss", choices=["fastkd", "torch"], default="fastkd")
    parser.add_argument("--backend", choices=["auto", "triton", "torch"], default="auto")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--teacher-steps", type=int)
    parser.add_argument("--divergence", choices=sorted(fastkd.DIVERGENCES), default="forward_kl")
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--kd-weight", type=float, default=0.5)
    parser.add_argument("--ce-weight", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--report-vocab",
        type=int,
        default=128256,
        help="--fused-linear: the larger vocabulary of the memory printout (Llama 3's)",
    )
    args = parser.parse_args(argv)

    cfg = RunConfig(**(TINY if args.tiny else {}))
    cfg.loss, cfg.fused_linear, cfg.backend, cfg.seed = (
        args.loss,
        args.fused_linear,
        args.backend,
        args.seed,
    )
    cfg.temperature, cfg.kd_weight, cfg.ce_weight = args.temperature, args.kd_weight, args.ce_weight
    cfg.divergence = args.divergence
    if args.steps is not None:
        cfg.steps = args.steps
    if args.teacher_steps is not None:
        cfg.teacher_steps = args.teacher_steps

    if args.tiny:
        # Ops this small gain nothing from intra-op threads, and on a busy machine the
        # threads' spin-waits make them many times slower.
        torch.set_num_threads(1)
    start = time.perf_counter()
    trainer = build_trainer(cfg)
    dataset = trainer.train_dataset
    teacher_accuracy = completion_accuracy(trainer.teacher_model, dataset)
    print(
        f"next-token accuracy on the completions: teacher {teacher_accuracy:.3f}, "
        f"student before {completion_accuracy(trainer.model, dataset):.3f}"
    )
    trainer.train()
    losses = trainer.micro_batch_losses
    per_step = [sum(losses[i : i + cfg.grad_accum]) for i in range(0, len(losses), cfg.grad_accum)]
    path = "hidden states + FusedLinearKDLoss" if cfg.fused_linear else "logits + KDLoss"
    what = f"{path}, {cfg.divergence}" if cfg.loss == "fastkd" else "plain PyTorch formula"
    print(f"loss={cfg.loss} ({what})")
    print(f"loss per optimizer step: first {per_step[0]:.4f}  last {per_step[-1]:.4f}")
    print(f"student next-token accuracy after: {completion_accuracy(trainer.model, dataset):.3f}")
    print(f"{len(per_step)} steps in {time.perf_counter() - start:.1f} s")
    if cfg.fused_linear:
        tokens = cfg.batch_size * (2 * cfg.max_prompt + 3)
        print_memory_report(
            n_rows=tokens,
            student_hidden=cfg.student_hidden,
            teacher_hidden=cfg.teacher_hidden,
            vocab_sizes=(cfg.vocab_size, args.report_vocab),
            temperature=cfg.temperature,
        )
    if not all(math.isfinite(x) for x in losses):
        raise SystemExit("non-finite loss")


if __name__ == "__main__":
    main()
