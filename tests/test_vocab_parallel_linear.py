"""FusedLinearKDLoss with a vocab-parallel LM head (design.md §5) on 2 gloo ranks, each
holding its rows of both weights (and the student's bias), against the float64 loss on the
whole head: the loss, and the gradients of the hidden states, the weight and the bias."""

from __future__ import annotations

import random

import torch
import torch.distributed as dist
from distributed_testing import run_ranks
from kd_testing import make_labels, rel_err
from test_topk_loss import make_teacher

import fastkd
from fastkd import _backends
from fastkd.distributed import count_collectives

LEAD, H_S, H_T = (3, 4), 8, 6
SEED = random.randrange(1 << 30)


def _inputs(seed, case, V):
    g = torch.Generator().manual_seed(seed + case["id"])
    n = LEAD[0] * LEAD[1]
    h_s = torch.randn(*LEAD, H_S, generator=g)
    w_s = torch.randn(V, H_S, generator=g)
    b_s = torch.randn(V, generator=g)
    h_t = torch.randn(*LEAD, H_T, generator=g)
    w_t = torch.randn(V, H_T, generator=g) * 1.5
    labels = make_labels(LEAD, V, "some", g, "cpu") if case.get("ce_weight") else None
    teacher = None
    if case.get("topk"):
        teacher = make_teacher(n, V, 5, g)
        teacher = fastkd.TopKTeacher(teacher.token_ids.reshape(*LEAD, 5),
                                     teacher.logprobs.reshape(*LEAD, 5),
                                     teacher.mask.reshape(*LEAD, 5))  # fmt: skip
    weight = 0.5 + torch.rand(LEAD if case.get("reduction") == "none" else (), generator=g)
    return h_s, w_s, b_s, h_t, w_t, labels, teacher, weight


def _options(case):
    return {k: v for k, v in case.items() if k not in ("id", "topk")}


def _rank_cases(rank, world, seed, widths, cases):
    out = []
    lo = sum(widths[:rank])
    rows = slice(lo, lo + widths[rank])
    for case in cases:
        h_s, w_s, b_s, h_t, w_t, labels, teacher, weight = _inputs(seed, case, sum(widths))
        h = h_s.clone().requires_grad_(True)
        w = w_s[rows].clone().requires_grad_(True)
        b = b_s[rows].clone().requires_grad_(True)
        loss_fn = fastkd.FusedLinearKDLoss(process_group=dist.group.WORLD, chunk_size=5,
                                           **_options(case))  # fmt: skip
        with count_collectives() as log:
            if teacher is None:
                loss = loss_fn(h, w, h_t, w_t[rows], labels, student_bias=b)
            else:
                loss = loss_fn(h, w, labels=labels, student_bias=b, teacher=teacher)
            (loss * weight).sum().backward()
        out.append({"loss": loss.detach(), "h": h.grad, "w": w.grad, "b": b.grad,
                    "bytes": log.bytes})  # fmt: skip
    return out


CASES = [
    {"divergence": "forward_kl", "ce_weight": 0.5, "temperature": 2.0},
    {"divergence": "jsd", "reduction": "none"},
    {"divergence": "reverse_kl", "reduction": "sum", "softcap": 10.0},
    {"divergence": "forward_kl", "topk": True, "topk_tail": "bucket", "ce_weight": 0.3},
]
if _backends.is_available("triton", torch.device("cpu"))[0]:
    # The phases as Triton kernels (fastkd/triton/kd_vocab_parallel.py), interpreted here.
    CASES.append({"divergence": "tvd", "ce_weight": 0.4, "softcap": 10.0, "backend": "triton"})
for n, c in enumerate(CASES):
    c["id"] = n


def test_fused_linear_two_ranks(tmp_path):
    widths = (19, 30)
    results = run_ranks(2, _rank_cases, tmp_path, SEED, widths, CASES)
    for i, case in enumerate(CASES):
        h_s, w_s, b_s, h_t, w_t, labels, teacher, weight = _inputs(SEED, case, sum(widths))
        h, w, b = (x.double().requires_grad_(True) for x in (h_s, w_s, b_s))
        student = h @ w.T + b
        opts = {k: v for k, v in _options(case).items() if k != "backend"}
        if teacher is None:
            ref = fastkd.kd_loss(student, h_t.double() @ w_t.double().T, labels, **opts)
        else:
            ref = fastkd.kd_loss(student, teacher, labels, backend="torch", **opts)
        (ref * weight.double()).sum().backward()
        msg = f"case {case} seed {SEED}"
        for r in results:
            assert rel_err(r[i]["loss"], ref) <= 1e-5, msg
            assert rel_err(r[i]["h"], h.grad) <= 1e-5, msg  # summed over the ranks
            assert r[i]["bytes"] < 4 * sum(widths) * h_s.numel(), msg
        assert rel_err(torch.cat([r[i]["w"] for r in results]), w.grad) <= 1e-5, msg
        assert rel_err(torch.cat([r[i]["b"] for r in results]), b.grad) <= 1e-5, msg


def _rank_row_mismatch(rank, world, seed):
    g = torch.Generator().manual_seed(seed)
    w_s, w_t = torch.randn(10, H_S, generator=g), torch.randn(10, H_T, generator=g)
    rows = 8 + 4 * rank  # a mistake: every rank must hold every row
    h_s = torch.randn(rows, H_S, generator=g).requires_grad_(True)
    h_t = torch.randn(rows, H_T, generator=g)
    loss_fn = fastkd.FusedLinearKDLoss(process_group=dist.group.WORLD, chunk_size=4)
    try:
        loss_fn(h_s, w_s[rank * 5 : rank * 5 + 5], h_t, w_t[rank * 5 : rank * 5 + 5])
    except ValueError as e:
        return str(e)
    return "no error"


def test_fused_linear_rows_that_differ_are_an_error_on_every_rank(tmp_path):
    # Not a hang: the chunks would differ in number between the ranks.
    for message in run_ranks(2, _rank_row_mismatch, tmp_path, SEED):
        assert "disagree on the rows of student_hidden" in message, message


def _rank_one_row(rank, world, seed, widths):
    g = torch.Generator().manual_seed(seed)
    h_s, w_s = torch.randn(H_S, generator=g), torch.randn(sum(widths), H_S, generator=g)
    h_t, w_t = torch.randn(H_T, generator=g), torch.randn(sum(widths), H_T, generator=g)
    rows = slice(sum(widths[:rank]), sum(widths[: rank + 1]))
    h = h_s.clone().requires_grad_(True)
    loss = fastkd.FusedLinearKDLoss(reduction="batchmean", process_group=dist.group.WORLD)(
        h, w_s[rows], h_t, w_t[rows]
    )
    loss.backward()
    return {"loss": loss.detach(), "h": h.grad}


def test_fused_linear_one_row_of_hidden_states_batchmean(tmp_path):
    # 1-D hidden states are one row of logits (V,): batchmean divides by the whole V, as one
    # process does, not by a shard's rows or by 1.
    widths = (7, 11)
    results = run_ranks(2, _rank_one_row, tmp_path, SEED, widths)
    g = torch.Generator().manual_seed(SEED)
    h_s, w_s = torch.randn(H_S, generator=g), torch.randn(sum(widths), H_S, generator=g)
    h_t, w_t = torch.randn(H_T, generator=g), torch.randn(sum(widths), H_T, generator=g)
    h = h_s.double().requires_grad_(True)
    ref = fastkd.kd_loss(h @ w_s.double().T, h_t.double() @ w_t.double().T,
                         reduction="batchmean")  # fmt: skip
    ref.backward()
    for r in results:
        assert rel_err(r["loss"], ref) <= 1e-5, (r["loss"], ref)
        assert rel_err(r["h"], h.grad) <= 1e-5
