"""Vocab-parallel KD from a top-k teacher (design.md §4 on §5's shards), on 2 and 3 gloo
ranks, against the float64 top-k spec on the concatenated student logits."""

from __future__ import annotations

import random

import torch
import torch.distributed as dist
from distributed_testing import run_ranks
from kd_testing import GRAD_TOL, LOSS_TOL, make_logits, rel_err
from test_topk_loss import CONVENTIONS, make_labels, make_teacher

import fastkd
from fastkd.distributed import count_collectives

N, K = 12, 6
SEED = random.randrange(1 << 30)


def _inputs(seed, case, V):
    g = torch.Generator().manual_seed(seed + case["id"])
    dtype = getattr(torch, case.get("dtype", "float32"))
    student = make_logits((N, V), dtype, "cpu", g)
    vocab = case.get("vocab_size", V)
    teacher = make_teacher(N, vocab, K, g)
    labels = make_labels(N, vocab, g) if case.get("ce_weight") else None
    if labels is not None and "ignore_index" in case:
        # A pad id as ignore_index: the labels at the later shards' first columns (12 and 19
        # here) are that id's column there, and must not be taken for ignored rows.
        labels = torch.where(labels == -100, case["ignore_index"], labels)
        labels[2:6] = torch.tensor([12, 19, 13, 20])
    if "vocab_size" in case:
        student[:, vocab:] = 30.0
    weight = 0.5 + torch.rand(N if case.get("reduction") == "none" else (), generator=g)
    return student, teacher, labels, weight


def _options(case):
    skip = ("id", "dtype", "convention")
    return {**CONVENTIONS[case.get("convention", "raw")],
            **{k: v for k, v in case.items() if k not in skip}}  # fmt: skip


def _rank_cases(rank, world, seed, widths, cases):
    out = []
    lo = sum(widths[:rank])
    for case in cases:
        student, teacher, labels, weight = _inputs(seed, case, sum(widths))
        leaf = student[:, lo : lo + widths[rank]].clone().requires_grad_(True)
        s = leaf * 1.0 if case.get("inplace_backward") else leaf
        with count_collectives() as log:
            loss = fastkd.kd_loss(s, teacher, labels, process_group=dist.group.WORLD,
                                  **_options(case))  # fmt: skip
        (loss * weight).sum().backward()
        out.append({"loss": loss.detach(), "grad": leaf.grad, "bytes": log.bytes_of("statistics"),
                    "calls": len(log.calls)})  # fmt: skip
    return out


def _check(results, cases, widths):
    for i, case in enumerate(cases):
        student, teacher, labels, weight = _inputs(SEED, case, sum(widths))
        opts = _options(case)
        opts.pop("inplace_backward", None)
        opts.pop("backend", None)
        s64 = student.double().requires_grad_(True)
        ref = fastkd.kd_loss(s64, teacher, labels, backend="torch", **opts)
        (ref * weight.double()).sum().backward()
        losses = [r[i]["loss"] for r in results]
        assert all(torch.equal(x, losses[0]) for x in losses), (case, losses)
        grad = torch.cat([r[i]["grad"] for r in results], -1)
        dtype = getattr(torch, case.get("dtype", "float32"))
        loss_err, grad_err = rel_err(losses[0], ref), rel_err(grad, s64.grad)
        msg = f"case {case} seed {SEED}: loss {loss_err:.2e} grad {grad_err:.2e}"
        assert loss_err <= LOSS_TOL and grad_err <= GRAD_TOL[dtype], msg
        for r in results:  # a handshake and one gather of (N, 6 + K) float32
            assert r[i]["calls"] == 2 and r[i]["bytes"] == N * (6 + K) * 4, msg


CASES = [
    {"divergence": div, "convention": conv, "temperature": 2.0}
    for div, conv in [("forward_kl", "raw"), ("reverse_kl", "bucket"), ("jsd", "renormalize"),
                      ("tvd", "topk-student"), ("skew_forward_kl", "bucket"),
                      ("hellinger", "raw"), ("soft_ce", "renormalize")]
] + [
    {"divergence": "forward_kl", "convention": "bucket", "ce_weight": 0.5, "softcap": 20.0},
    {"divergence": "jsd", "convention": "raw", "ce_weight": 1.0, "reduction": "none"},
    {"divergence": "forward_kl", "convention": "raw", "dtype": "bfloat16", "ce_weight": 0.3},
    {"divergence": "reverse_kl", "convention": "bucket", "inplace_backward": True,
     "ce_weight": 0.2},
    {"divergence": "forward_kl", "convention": "bucket", "vocab_size": 40, "ce_weight": 0.5},
    {"divergence": "forward_kl", "convention": "bucket", "backend": "triton", "ce_weight": 0.5},
    {"divergence": "jsd", "convention": "bucket", "ce_weight": 0.5, "ignore_index": 0},
]  # fmt: skip
for n, c in enumerate(CASES):
    c["id"] = n


def test_topk_two_ranks(tmp_path):
    widths = (19, 30)
    _check(run_ranks(2, _rank_cases, tmp_path, SEED, widths, CASES), CASES, widths)


def test_topk_three_ranks_one_empty_shard(tmp_path):
    widths = (12, 0, 37)
    cases = [c for c in CASES if c.get("backend") != "triton"]
    _check(run_ranks(3, _rank_cases, tmp_path, SEED, widths, cases), cases, widths)
