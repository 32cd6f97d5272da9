"""Distillation with a vocab-parallel LM head (tensor parallel, design.md §5), on gloo.

    torchrun --nproc_per_node 2 examples/tensor_parallel_distill.py --tiny
    python examples/tensor_parallel_distill.py --tiny                    # one process

A tiny student (embedding, a two-layer MLP trunk, an LM head) learns from a fixed tiny teacher
of the same shape. With several processes each rank holds its contiguous rows of both LM
heads, as Megatron's ColumnParallelLinear (gather_output=False) does, and the whole trunk;
``fastkd.FusedLinearKDLoss(process_group=...)`` computes the loss of the whole vocabulary from
the shards, exchanging O(N) floats a chunk, never the N x V logits. The loss sums the hidden
states' gradient over the ranks, so every rank's trunk gets the same gradient and stays
identical without DDP; each rank's head rows get their own gradient.

Rank 0 then trains the same models in one process with whole heads (the plain fused loss) and
prints the largest relative difference between the two loss curves: they are one training run.
Nothing is downloaded; everything runs on CPU. ``--json PATH`` writes both curves.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import fastkd
from fastkd.distributed import vocab_shard

TINY = dict(vocab=96, hidden=32, teacher_hidden=48, batch=4, seq=16, steps=12, lr=0.5)


class TinyLM(nn.Module):
    """Embedding, a two-layer MLP trunk, and an LM head: its rows ``head_rows`` of the
    vocabulary (all of them in one process)."""

    def __init__(self, vocab: int, hidden: int, head_rows: slice, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed = nn.Parameter(torch.randn(vocab, hidden, generator=g) * 0.5)
        self.w1 = nn.Parameter(torch.randn(hidden, hidden, generator=g) / hidden**0.5)
        self.w2 = nn.Parameter(torch.randn(hidden, hidden, generator=g) / hidden**0.5)
        head = torch.randn(vocab, hidden, generator=g) / hidden**0.5
        self.head = nn.Parameter(head[head_rows].clone())

    def hidden_states(self, tokens):
        x = self.embed[tokens]
        return x + F.linear(torch.tanh(F.linear(x, self.w1)), self.w2)


def batches(cfg: dict, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(cfg["steps"]):
        tokens = torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["seq"] + 1), generator=g)
        labels = tokens[:, 1:].clone()
        labels[:, : cfg["seq"] // 4] = -100  # a prompt the loss ignores
        yield tokens[:, :-1], labels


def train(cfg: dict, rank: int, world: int, group) -> list[float]:
    """Losses per step of SGD on the student, its head's rows for ``rank`` of ``world``."""
    rows = slice(None) if group is None else vocab_shard(torch.arange(cfg["vocab"]), rank, world)
    if not isinstance(rows, slice):
        rows = slice(int(rows[0]), int(rows[-1]) + 1)
    student = TinyLM(cfg["vocab"], cfg["hidden"], rows, seed=1)
    teacher = TinyLM(cfg["vocab"], cfg["teacher_hidden"], rows, seed=2).requires_grad_(False)
    loss_fn = fastkd.FusedLinearKDLoss(temperature=2.0, ce_weight=0.5, process_group=group)
    optimizer = torch.optim.SGD(student.parameters(), lr=cfg["lr"])
    losses = []
    for tokens, labels in batches(cfg):
        loss = loss_fn(student.hidden_states(tokens), student.head,
                       teacher.hidden_states(tokens), teacher.head, labels)  # fmt: skip
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny preset (the only one)")
    parser.add_argument("--steps", type=int, default=TINY["steps"])
    parser.add_argument("--json", help="write both loss curves here (rank 0)")
    args = parser.parse_args()
    cfg = dict(TINY, steps=args.steps)
    torch.set_num_threads(1)

    world = int(os.environ.get("WORLD_SIZE", "1"))
    group, rank = None, 0
    if world > 1:
        dist.init_process_group("gloo")
        group, rank = dist.group.WORLD, dist.get_rank()
    parallel = train(cfg, rank, world, group)
    if rank == 0:
        single = train(cfg, 0, 1, None) if world > 1 else parallel
        diff = max(abs(a - b) / abs(b) for a, b in zip(parallel, single, strict=True))
        for step, loss in enumerate(parallel):
            print(f"step {step:3d}  loss {loss:.6f}")
        print(f"{world} rank(s): largest relative difference from one process {diff:.2e}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"world": world, "parallel": parallel, "single": single,
                           "max_relative_difference": diff}, f)  # fmt: skip
    if group is not None:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
