"""TRL's GKD trainer with its loss replaced by fastkd's generalised JSD.

    python examples/trl_gkd.py --tiny              # GKDTrainer + fastkd
    python examples/trl_gkd.py --tiny --loss trl   # TRL's own generalized_jsd_loss
    python examples/trl_gkd.py --tiny --lmbda 0.5  # half the batches generated on-policy

GKDTrainer computes its loss in the staticmethod ``generalized_jsd_loss(student_logits,
teacher_logits, labels, beta, temperature, reduction, num_items_in_batch)``: log-softmaxes,
their log-mixture and two ``F.kl_div`` terms, all of size N x V. The whole integration is
overriding that staticmethod with :func:`fastkd_generalized_jsd_loss`, which computes the
same number with ``fastkd.kd_loss(divergence="jsd", scale_by_temperature_squared=False)``
(beta and temperature mean the same; beta = 0 and 1 are TRL's forward and reverse KL).

The models are small randomly initialised Llama-style models built from a config, the
tokenizer a word-level one built in memory with a chat template, and the data a synthetic
counting chat ("count from 17" -> "18 19 20 21"), so nothing is downloaded.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is fetched at run time
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # GKD lives in trl.experimental

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

try:
    from trl.experimental.gkd import GKDConfig, GKDTrainer
except ImportError:  # older TRL releases had GKD at the top level
    from trl import GKDConfig, GKDTrainer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from tiny_models import tiny_llama  # noqa: E402

import fastkd  # noqa: E402

TRL_GENERALIZED_JSD_LOSS = GKDTrainer.generalized_jsd_loss  # TRL's own, for comparison


# --- The integration -----------------------------------------------------------------------


def fastkd_generalized_jsd_loss(
    student_logits,
    teacher_logits,
    labels=None,
    beta=0.5,
    temperature=1.0,
    reduction="batchmean",
    num_items_in_batch=None,
    *,
    backend="auto",
):
    """``GKDTrainer.generalized_jsd_loss``, same arguments and value, through fastkd.

    JSD_beta = beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q, p the
    teacher's and q the student's softmax at ``temperature`` (no T^2 factor); TRL takes
    beta = 0 as KL(p || q) and beta = 1 as KL(q || p). Positions whose label is -100 are
    left out. Reductions as TRL's: the sum over the kept positions divided by
    ``num_items_in_batch`` when given, else "batchmean" divides by the kept positions (by
    the batch size without labels), "sum" does not divide, "mean" divides by every kept
    element of the N x V loss. ``reduction="none"`` (TRL's element-wise N x V loss) is
    handed to TRL's own function: that tensor is the thing fastkd exists not to build.
    """
    if reduction not in ("batchmean", "sum", "mean", "none"):
        raise ValueError(f"reduction must be batchmean, sum, mean or none, got {reduction!r}")
    if reduction == "none":
        return TRL_GENERALIZED_JSD_LOSS(
            student_logits, teacher_logits, labels, beta, temperature, reduction, num_items_in_batch
        )
    if beta == 0:
        divergence = "forward_kl"
    elif beta == 1:
        divergence = "reverse_kl"
    else:
        divergence = "jsd"
    options = dict(
        divergence=divergence,
        beta=float(beta),
        temperature=float(temperature),
        scale_by_temperature_squared=False,
        ignore_index=-100,
        backend=backend,
    )
    if num_items_in_batch is not None:
        return fastkd.kd_loss(
            student_logits,
            teacher_logits,
            labels,
            reduction="mean",
            num_items_in_batch=num_items_in_batch,
            **options,
        )
    if reduction == "batchmean":
        # With labels: over the kept positions (0 when none is kept); without: over size(0).
        fastkd_reduction = "mean" if labels is not None else "batchmean"
        return fastkd.kd_loss(
            student_logits, teacher_logits, labels, reduction=fastkd_reduction, **options
        )
    total = fastkd.kd_loss(student_logits, teacher_logits, labels, reduction="sum", **options)
    if reduction == "sum":
        return total
    V = student_logits.shape[-1]  # "mean": over the N x V elements TRL's loss has
    rows = student_logits.numel() // V if labels is None else (labels != -100).sum()
    return total / (rows * V)


class FastKDGKDTrainer(GKDTrainer):
    """GKDTrainer whose loss is fastkd's: the one line a GKD user changes."""

    generalized_jsd_loss = staticmethod(fastkd_generalized_jsd_loss)


# --- Tokenizer, data, models -----------------------------------------------------------------

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|> ' + message['content'] + "
    "' </s> ' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}"
)


def word_tokenizer(n_numbers: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer (split on spaces) over the special tokens, "count", "from"
    and the numbers 0..n_numbers-1, with a chat template ``<|role|> text </s>``."""
    words = [*SPECIAL_TOKENS, "count", "from", *map(str, range(n_numbers))]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=512,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def counting_chats(size: int, n_numbers: int, max_count: int, seed: int) -> Dataset:
    """ "count from a" -> "a+1 a+2 ... a+k" with k in 2..max_count (numbers wrap around)."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(size):
        start = int(torch.randint(0, n_numbers, (), generator=gen))
        k = int(torch.randint(2, max_count + 1, (), generator=gen))
        answer = " ".join(str((start + i) % n_numbers) for i in range(1, k + 1))
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"count from {start}"},
                    {"role": "assistant", "content": answer},
                ]
            }
        )
    return Dataset.from_list(rows)


def pretrain_teacher(teacher, tokenizer, chats, *, steps, batch_size, lr, seed):
    """A few steps of plain next-token training on the chats, so the teacher has something
    to teach."""
    if steps == 0:
        return
    gen = torch.Generator().manual_seed(seed)
    device = next(teacher.parameters()).device
    optimizer = torch.optim.AdamW(teacher.parameters(), lr=lr)
    teacher.train()
    for _ in range(steps):
        idx = torch.randint(0, len(chats), (batch_size,), generator=gen).tolist()
        texts = [tokenizer.apply_chat_template(chats[i]["messages"], tokenize=False) for i in idx]
        batch = tokenizer(texts, padding=True, add_special_tokens=False, return_tensors="pt")
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        batch = {k: v.to(device) for k, v in batch.items()}
        teacher(**batch, labels=labels.to(device)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    teacher.eval()


# --- Running it ------------------------------------------------------------------------------


@dataclass
class RunConfig:
    n_numbers: int = 1000
    student_hidden: int = 256
    student_layers: int = 4
    teacher_hidden: int = 512
    teacher_layers: int = 4
    max_count: int = 16
    examples: int = 4096
    batch_size: int = 16
    grad_accum: int = 2
    steps: int = 200
    teacher_steps: int = 200
    lr: float = 1e-3
    beta: float = 0.5
    temperature: float = 0.9  # GKDConfig's default: the sampling temperature
    lmbda: float = 0.5
    max_new_tokens: int = 16
    loss: str = "fastkd"  # "fastkd" or "trl"
    backend: str = "auto"
    device: str = "auto"  # "auto" (CUDA when there is one), "cpu" or "cuda"
    seed: int = 0
    output_dir: str = "/tmp/fastkd-trl-gkd"


TINY = dict(
    n_numbers=100,
    student_hidden=32,
    student_layers=2,
    teacher_hidden=64,
    teacher_layers=2,
    max_count=6,
    examples=256,
    batch_size=8,
    grad_accum=2,
    steps=20,
    teacher_steps=60,
    lr=3e-3,
    max_new_tokens=8,
)


class LossRecorder:
    """Keeps each micro-batch's loss, for the printout and the tests."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.micro_batch_losses: list[float] = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self.micro_batch_losses.append((out[0] if return_outputs else out).detach().item())
        return out


def build_trainer(cfg: RunConfig):
    """Tokenizer, models, data and the trainer for one run; the same seed, the same run."""
    use_cuda = cfg.device != "cpu" and torch.cuda.is_available()
    tokenizer = word_tokenizer(cfg.n_numbers)
    ids = dict(
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    V = len(tokenizer)
    student = tiny_llama(V, cfg.student_hidden, cfg.student_layers, seed=cfg.seed + 1, **ids)
    teacher = tiny_llama(V, cfg.teacher_hidden, cfg.teacher_layers, seed=cfg.seed + 2, **ids)
    teacher.to("cuda" if use_cuda else "cpu")
    chats = counting_chats(cfg.examples, cfg.n_numbers, cfg.max_count, cfg.seed)
    pretrain_teacher(
        teacher,
        tokenizer,
        chats,
        steps=cfg.teacher_steps,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        seed=cfg.seed + 3,
    )
    args = GKDConfig(
        output_dir=cfg.output_dir,
        max_steps=cfg.steps,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        lr_scheduler_type="constant",
        lmbda=cfg.lmbda,
        beta=cfg.beta,
        temperature=cfg.temperature,
        max_new_tokens=cfg.max_new_tokens,
        max_length=64,
        activation_checkpointing=False,
        bf16=False,
        logging_steps=max(cfg.steps // 5, 1),
        save_strategy="no",
        report_to="none",
        seed=cfg.seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
        use_cpu=not use_cuda,
    )
    if cfg.loss == "fastkd":
        base = FastKDGKDTrainer
        if cfg.backend != "auto":
            loss = functools.partial(fastkd_generalized_jsd_loss, backend=cfg.backend)
            base = type("FastKDGKDTrainer", (FastKDGKDTrainer,), {})
            base.generalized_jsd_loss = staticmethod(loss)
    elif cfg.loss == "trl":
        base = GKDTrainer
    else:
        raise ValueError(f"loss must be 'fastkd' or 'trl', got {cfg.loss!r}")
    trainer_class = type(base.__name__, (LossRecorder, base), {})
    return trainer_class(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=chats,
        processing_class=tokenizer,
    )


def greedy_answer(trainer, question: str) -> str:
    """The student's greedy completion of one user turn."""
    tokenizer = trainer.processing_class
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    model = trainer.model
    with torch.no_grad():
        out = model.generate(
            input_ids=ids.to(model.device),
            attention_mask=torch.ones_like(ids).to(model.device),
            max_new_tokens=8,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def run(cfg: RunConfig):
    trainer = build_trainer(cfg)
    trainer.train()
    return trainer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU-sized models and run")
    parser.add_argument("--loss", choices=["fastkd", "trl"], default="fastkd")
    parser.add_argument("--backend", choices=["auto", "triton", "torch"], default="auto")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--teacher-steps", type=int)
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--lmbda", type=float, default=0.5, help="on-policy fraction")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    cfg = RunConfig(**(TINY if args.tiny else {}))
    cfg.loss, cfg.backend, cfg.beta, cfg.lmbda, cfg.seed = (
        args.loss,
        args.backend,
        args.beta,
        args.lmbda,
        args.seed,
    )
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
    question = f"count from {cfg.n_numbers // 3}"
    print(f"student before: {question!r} -> {greedy_answer(trainer, question)!r}")
    trainer.train()
    print(f"student after:  {question!r} -> {greedy_answer(trainer, question)!r}")
    losses = trainer.micro_batch_losses
    per_step = [sum(losses[i : i + cfg.grad_accum]) for i in range(0, len(losses), cfg.grad_accum)]
    print(f"loss={cfg.loss}  beta={cfg.beta}  lmbda={cfg.lmbda}")
    print(f"loss per optimizer step: first {per_step[0]:.4f}  last {per_step[-1]:.4f}")
    print(f"{len(per_step)} steps in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
