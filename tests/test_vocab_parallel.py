"""Vocab-parallel KD (design.md §5) on 2 and 3 gloo ranks against the single-process float64
reference on the concatenated logits; DTensor logits; the collectives' bytes; the errors; and
the data-parallel token count under DDP."""

from __future__ import annotations

import random

import pytest
import torch
import torch.distributed as dist
from distributed_testing import run_ranks
from kd_testing import GRAD_TOL, LOSS_TOL, make_labels, make_logits, rel_err

import fastkd
from fastkd.distributed import count_collectives, global_num_items
from fastkd.divergences import DIVERGENCES

LEAD = (3, 5)  # N = 15 rows, 3-D logits
SEED = random.randrange(1 << 30)  # fresh inputs every run; printed on failure


def _inputs(seed: int, case: dict, V: int):
    g = torch.Generator().manual_seed(seed + case["id"])
    dtype = getattr(torch, case.get("dtype", "float32"))
    s = make_logits((*LEAD, V), dtype, "cpu", g)
    t = make_logits((*LEAD, V), dtype, "cpu", g)
    labels = make_labels(LEAD, case.get("vocab_size", V), case.get("labels", "some"), g, "cpu")
    if labels is not None and case.get("labels_in") is not None:
        lo, hi = case["labels_in"]
        labels = torch.where(labels >= 0, lo + labels % (hi - lo), labels)
    if case.get("vocab_size") is not None:
        # Padding columns that would show if they were read: large, not zero.
        s[..., case["vocab_size"] :] = 30.0
        t[..., case["vocab_size"] :] = -30.0
    weight = 0.5 + torch.rand(LEAD if case.get("reduction") == "none" else (), generator=g)
    return s, t, labels, weight


def _options(case: dict) -> dict:
    keys = ("divergence", "temperature", "ce_weight", "softcap", "reduction", "kd_weight",
            "scale_by_temperature_squared", "inplace_backward", "beta", "alpha",
            "vocab_size", "backend")  # fmt: skip
    return {k: case[k] for k in keys if k in case}


def _shard(x, widths, rank):
    lo = sum(widths[:rank])
    return x[..., lo : lo + widths[rank]]


def _rank_cases(rank, world, seed, widths, cases, device="cpu"):
    out = []
    for case in cases:
        s, t, labels, weight = _inputs(seed, case, sum(widths))
        leaf = _shard(s, widths, rank).clone().to(device).requires_grad_(True)
        student = leaf * 1.0 if case.get("inplace_backward") else leaf
        labels = None if labels is None else labels.to(device)
        with count_collectives() as log:
            loss = fastkd.kd_loss(
                student, _shard(t, widths, rank).to(device), labels,
                process_group=dist.group.WORLD, num_items_in_batch=case.get("num_items"),
                **_options(case),
            )  # fmt: skip
        (loss * weight.to(device)).sum().backward()
        out.append({
            "loss": loss.detach().cpu(), "grad": leaf.grad.cpu(),
            "calls": [c for c, _ in log.calls], "bytes": [b for _, b in log.calls],
        })  # fmt: skip
    return out


def _reference(case, s, t, labels, weight):
    V = case.get("vocab_size") or s.shape[-1]
    s64 = s.double().requires_grad_(True)
    opts = _options(case)
    opts.pop("inplace_backward", None)
    opts.pop("vocab_size", None)
    opts.pop("backend", None)
    ref, _, _ = fastkd.kd_loss_reference(
        s64[..., :V], t.double()[..., :V], labels, num_items_in_batch=case.get("num_items"),
        **opts,
    )  # fmt: skip
    (ref * weight.double()).sum().backward()
    return ref.detach(), s64.grad


def _check(results, cases, widths):
    for i, case in enumerate(cases):
        s, t, labels, weight = _inputs(SEED, case, sum(widths))
        ref_loss, ref_grad = _reference(case, s, t, labels, weight)
        losses = [r[i]["loss"] for r in results]
        for rank_loss in losses[1:]:  # the whole loss, bit for bit, on every rank
            assert torch.equal(rank_loss, losses[0]), (case, losses)
        grad = torch.cat([r[i]["grad"] for r in results], -1)
        loss_err, grad_err = rel_err(losses[0], ref_loss), rel_err(grad, ref_grad)
        dtype = getattr(torch, case.get("dtype", "float32"))
        msg = f"case {case} seed {SEED}: loss {loss_err:.2e} grad {grad_err:.2e}"
        assert losses[0].dtype == torch.float32
        assert torch.isfinite(grad).all(), msg
        assert loss_err <= LOSS_TOL and grad_err <= GRAD_TOL[dtype], msg
        if case.get("vocab_size") is not None:
            assert torch.all(grad[..., case["vocab_size"] :] == 0), msg
        _check_collectives(results, i, case)


def _check_collectives(results, i, case):
    """One handshake and one round of statistics (two for the mixtures, TVD, Hellinger), each
    O(N): at most 8 float64 a row, never a factor of V."""
    rounds = ["handshake", "statistics"]
    if case["divergence"] not in ("forward_kl", "soft_ce", "reverse_kl"):
        rounds.append("divergence_terms")
    n_rows = LEAD[0] * LEAD[1]
    for r in results:
        assert r[i]["calls"] == rounds, (case, r[i]["calls"])
        handshake, *stats = r[i]["bytes"]
        assert handshake <= 64
        assert all(b <= 8 * 8 * n_rows for b in stats), (case, r[i]["bytes"])


def _cases_every_divergence(extra=None):
    cases = []
    for k, div in enumerate(DIVERGENCES):
        case = {"divergence": div, "temperature": 2.0, "ce_weight": 0.3}
        if k % 2:
            case["softcap"] = 20.0
        cases.append({**case, **(extra or {})})
    return cases


CASES_2 = _cases_every_divergence() + [
    {"divergence": "forward_kl", "reduction": "sum"},
    {"divergence": "jsd", "reduction": "none", "beta": 0.3},
    {"divergence": "reverse_kl", "reduction": "batchmean", "labels": "none"},
    {"divergence": "skew_forward_kl", "num_items": 7.5, "alpha": 0.2},
    {"divergence": "forward_kl", "scale_by_temperature_squared": False, "kd_weight": 0.7,
     "temperature": 3.0},
    {"divergence": "forward_kl", "dtype": "bfloat16", "ce_weight": 0.5},
    {"divergence": "jsd", "dtype": "bfloat16"},
    {"divergence": "tvd", "dtype": "float16", "ce_weight": 0.2},
    {"divergence": "forward_kl", "inplace_backward": True, "ce_weight": 0.4},
    {"divergence": "hellinger", "inplace_backward": True},
    {"divergence": "soft_ce", "labels": "all", "ce_weight": 1.0},
    # Every label in rank 0's shard: rank 1 holds none (widths (19, 30)).
    {"divergence": "reverse_kl", "ce_weight": 1.0, "labels_in": (0, 19)},
    {"divergence": "forward_kl", "vocab_size": 44, "ce_weight": 0.5},
    {"divergence": "jsd", "vocab_size": 44, "inplace_backward": True},
    # backend="torch": the phases in float64 PyTorch (the others above run the CPU kernel's).
    {"divergence": "forward_kl", "backend": "torch", "ce_weight": 0.5, "softcap": 20.0},
    {"divergence": "reverse_kl", "backend": "torch", "reduction": "sum"},
    {"divergence": "tvd", "backend": "torch", "dtype": "float16", "ce_weight": 0.2},
    {"divergence": "jsd", "backend": "torch", "vocab_size": 44, "inplace_backward": True},
]  # fmt: skip
CASES_3 = _cases_every_divergence({"temperature": 1.5}) + [
    {"divergence": "forward_kl", "vocab_size": 40, "ce_weight": 0.5},
    {"divergence": "tvd", "reduction": "sum", "labels": "none"},
    {"divergence": "skew_reverse_kl", "backend": "torch", "ce_weight": 0.5},
]
# backend="triton": the phases as fastkd/triton/kd_vocab_parallel.py's kernels (under
# TRITON_INTERPRET=1 here), every divergence and the options that change their code paths.
CASES_TRITON_2 = _cases_every_divergence({"backend": "triton"}) + [
    {"divergence": "jsd", "reduction": "none", "beta": 0.3, "labels": "none"},
    {"divergence": "reverse_kl", "ce_weight": 1.0, "labels_in": (0, 19)},
    {"divergence": "forward_kl", "dtype": "bfloat16", "ce_weight": 0.5, "inplace_backward": True},
    {"divergence": "tvd", "dtype": "float16", "ce_weight": 0.2},
    {"divergence": "skew_forward_kl", "vocab_size": 44, "ce_weight": 0.5, "num_items": 7.5},
]
for c in CASES_TRITON_2[len(DIVERGENCES) :]:
    c["backend"] = "triton"
CASES_TRITON_3 = [
    {"divergence": "forward_kl", "vocab_size": 40, "ce_weight": 0.5, "backend": "triton"},
    {"divergence": "tvd", "softcap": 20.0, "ce_weight": 0.3, "backend": "triton"},
]
for n, c in enumerate(CASES_2 + CASES_3 + CASES_TRITON_2 + CASES_TRITON_3):
    c["id"] = n


def test_two_ranks_uneven_shards(tmp_path):
    widths = (19, 30)
    _check(run_ranks(2, _rank_cases, tmp_path, SEED, widths, CASES_2), CASES_2, widths)


def test_three_ranks_one_empty_shard(tmp_path):
    # The middle rank holds no column at all: its statistics are empty sums.
    widths = (12, 0, 37)
    _check(run_ranks(3, _rank_cases, tmp_path, SEED, widths, CASES_3), CASES_3, widths)


def _triton_or_skip():
    from fastkd import _backends

    ok, why = _backends.is_available("triton", torch.device("cpu"))
    if not ok:
        pytest.skip(f"the gloo ranks run on CPU tensors: {why}")


def test_two_ranks_triton_kernel_phases(tmp_path):
    _triton_or_skip()
    widths = (19, 30)
    results = run_ranks(2, _rank_cases, tmp_path, SEED, widths, CASES_TRITON_2)
    _check(results, CASES_TRITON_2, widths)


def test_three_ranks_triton_kernel_phases_one_empty_shard(tmp_path):
    _triton_or_skip()
    widths = (12, 0, 37)
    results = run_ranks(3, _rank_cases, tmp_path, SEED, widths, CASES_TRITON_3)
    _check(results, CASES_TRITON_3, widths)


def test_two_ranks_triton_phases_on_cuda(tmp_path):
    # The Triton phases compiled for the GPU (the interpreter runs Python semantics): two
    # gloo ranks on one GPU, gloo staging the gathers through the host.
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the Triton phases ran under the interpreter above")
    widths = (19, 30)
    results = run_ranks(2, _rank_cases, tmp_path, SEED, widths, CASES_TRITON_2, "cuda")
    _check(results, CASES_TRITON_2, widths)


# --- errors: the same ValueError on every rank, never a hang ---------------------------------


def _rank_errors(rank, world, seed):
    g = torch.Generator().manual_seed(seed)
    s, t = make_logits((6, 20), torch.float32, "cpu", g), make_logits((6, 20), torch.float32,
                                                                     "cpu", g)  # fmt: skip
    labels = torch.randint(0, 20, (6,), generator=g)
    shard = slice(rank * 10, rank * 10 + 10)
    group = dist.group.WORLD
    attempts = {
        "rows": lambda: fastkd.kd_loss(s[: 6 - rank, shard], t[: 6 - rank, shard],
                                       process_group=group),
        "labels": lambda: fastkd.kd_loss(s[:, shard], t[:, shard], (labels + rank) % 20,
                                         process_group=group),
        "label range": lambda: fastkd.kd_loss(s[:, shard], t[:, shard], labels + 20,
                                              process_group=group),
        "options": lambda: fastkd.kd_loss(s[:, shard], t[:, shard], temperature=1.0 + rank,
                                          process_group=group),
        "vocab_size": lambda: fastkd.kd_loss(s[:, shard], t[:, shard], vocab_size=21,
                                             process_group=group),
        "student/teacher widths": lambda: fastkd.kd_loss(s[:, shard], t[:, :3],
                                                         process_group=group),
        # Rank 1 alone passes a bad teacher: rank 0 must not wait for it.
        "one rank refused": lambda: fastkd.kd_loss(s[:, shard], t[:, shard][:, : 10 - rank],
                                                   process_group=group),
        # As many rows, another leading shape.
        "lead shape": lambda: fastkd.kd_loss(
            *(x[:, shard].reshape((2, 3, 10) if rank else (6, 10)) for x in (s, t)),
            process_group=group),
        "labels shape on one rank": lambda: fastkd.kd_loss(s[:, shard], t[:, shard],
                                                           labels[: 6 - rank],
                                                           process_group=group),
        "num_items_in_batch": lambda: fastkd.kd_loss(s[:, shard], t[:, shard], labels,
                                                     num_items_in_batch=5.0 + rank,
                                                     process_group=group),
        # A leaf written over in place on rank 1 only: refused there, named on rank 0.
        "inplace leaf": lambda: fastkd.kd_loss(
            s[:, shard].clone().requires_grad_() if rank else s[:, shard].clone(),
            t[:, shard], inplace_backward=True, process_group=group),
    }  # fmt: skip
    messages = {}
    for name, attempt in attempts.items():
        try:
            attempt()
            messages[name] = "no error"
        except ValueError as e:
            messages[name] = str(e)
    # The group still works afterwards: nothing was left half-way.
    ok = fastkd.kd_loss(s[:, shard].clone().requires_grad_(), t[:, shard], process_group=group)
    messages["after"] = str(float(ok))
    return messages


def test_disagreements_are_errors_on_every_rank(tmp_path):
    results = run_ranks(2, _rank_errors, tmp_path, SEED)
    expected = {
        "rows": "leading shape", "labels": "the labels", "label range": "[0, 20)",
        "options": "options", "vocab_size": "vocab_size=21",
        "student/teacher widths": "same width",
    }  # fmt: skip
    for name, words in expected.items():
        for rank, messages in enumerate(results):
            assert words in messages[name], (name, rank, messages[name])
    assert "rank(s) [1]" in results[0]["one rank refused"]
    assert "same width" in results[1]["one rank refused"]
    agreed = {"lead shape": "leading shape", "num_items_in_batch": "num_items_in_batch"}
    for name, words in agreed.items():
        for messages in results:
            assert words in messages[name], (name, messages[name])
    for name, words in {"labels shape on one rank": "labels must have the leading shape",
                        "inplace leaf": "would overwrite student_logits"}.items():  # fmt: skip
        assert "rank(s) [1]" in results[0][name], (name, results[0][name])
        assert words in results[1][name], (name, results[1][name])
    g = torch.Generator().manual_seed(SEED)
    s, t = make_logits((6, 20), torch.float32, "cpu", g), make_logits((6, 20), torch.float32,
                                                                     "cpu", g)  # fmt: skip
    ref = fastkd.kd_loss(s.double(), t.double())
    assert abs(float(results[0]["after"]) - float(ref)) <= 1e-5 * abs(float(ref))


def _rank_mixed_phases(rank, world, seed):
    g = torch.Generator().manual_seed(seed)
    s, t = make_logits((6, 20), torch.float32, "cpu", g), make_logits((6, 20), torch.float32,
                                                                     "cpu", g)  # fmt: skip
    shard = slice(rank * 10, rank * 10 + 10)
    try:
        fastkd.kd_loss(s[:, shard], t[:, shard], backend="triton" if rank == 0 else "cpu",
                       process_group=dist.group.WORLD)  # fmt: skip
    except ValueError as e:
        return str(e)
    return "no error"


def test_kernel_phases_on_some_ranks_only_is_an_error(tmp_path):
    # What the ranks gather differs between the Triton phases and the float64 ones.
    _triton_or_skip()
    for message in run_ranks(2, _rank_mixed_phases, tmp_path, SEED):
        assert "phases' implementation" in message, message


def _rank_one_dimensional(rank, world, seed):
    g = torch.Generator().manual_seed(seed)
    s, t = make_logits((20,), torch.float32, "cpu", g), make_logits((20,), torch.float32, "cpu", g)
    leaf = s[rank * 7 : 20 if rank else 7].clone().requires_grad_(True)
    loss = fastkd.kd_loss(leaf, t[rank * 7 : 20 if rank else 7], reduction="batchmean",
                          temperature=2.0, process_group=dist.group.WORLD)  # fmt: skip
    loss.backward()
    return {"loss": loss.detach(), "grad": leaf.grad}


def test_one_dimensional_logits_batchmean_divides_by_the_whole_vocabulary(tmp_path):
    # batchmean divides by the logits' first dimension: for 1-D logits the vocabulary's width
    # (as torch.nn.functional.kl_div does), the whole one, not a shard's.
    results = run_ranks(2, _rank_one_dimensional, tmp_path, SEED)
    g = torch.Generator().manual_seed(SEED)
    s, t = make_logits((20,), torch.float32, "cpu", g), make_logits((20,), torch.float32, "cpu", g)
    s64 = s.double().requires_grad_(True)
    ref = fastkd.kd_loss(s64, t.double(), reduction="batchmean", temperature=2.0)
    ref.backward()
    for r in results:
        assert rel_err(r["loss"], ref) <= LOSS_TOL, (r["loss"], ref)
    grad = torch.cat([r["grad"] for r in results])
    assert rel_err(grad, s64.grad) <= GRAD_TOL[torch.float32]


# --- DTensor logits (torchtitan's loss_parallel layout) --------------------------------------


def _rank_dtensor(rank, world, seed):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    g = torch.Generator().manual_seed(seed)
    s, t = make_logits((8, 37), torch.float32, "cpu", g), make_logits((8, 37), torch.float32,
                                                                     "cpu", g)  # fmt: skip
    labels = make_labels((8,), 37, "some", g, "cpu")
    mesh = init_device_mesh("cpu", (world,))
    ds = distribute_tensor(s, mesh, [Shard(-1)]).requires_grad_(True)
    dt = distribute_tensor(t, mesh, [Shard(-1)])
    loss = fastkd.KDLoss("jsd", temperature=2.0, ce_weight=0.5)(ds, dt, labels)
    loss.backward()
    return {"loss": loss.detach(), "grad": ds.grad.full_tensor(), "local": ds.to_local().shape[-1]}


def test_dtensor_sharded_on_the_vocabulary(tmp_path):
    results = run_ranks(2, _rank_dtensor, tmp_path, SEED)
    g = torch.Generator().manual_seed(SEED)
    s, t = make_logits((8, 37), torch.float32, "cpu", g), make_logits((8, 37), torch.float32,
                                                                     "cpu", g)  # fmt: skip
    labels = make_labels((8,), 37, "some", g, "cpu")
    s64 = s.double().requires_grad_(True)
    ref = fastkd.kd_loss(s64, t.double(), labels, divergence="jsd", temperature=2.0,
                         ce_weight=0.5)  # fmt: skip
    ref.backward()
    assert [r["local"] for r in results] == [19, 18]
    for r in results:
        assert rel_err(r["loss"], ref) <= LOSS_TOL
        assert rel_err(r["grad"], s64.grad) <= GRAD_TOL[torch.float32]


# --- data parallel: global_num_items under DDP equals one process on the whole batch ---------


def _dp_batch(seed, n_rows, V, H):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_rows, H, generator=g)
    teacher = make_logits((n_rows, V), torch.float32, "cpu", g)
    labels = make_labels((n_rows,), V, "some", g, "cpu")
    weight = torch.randn(V, H, generator=g) * 0.3
    return x, teacher, labels, weight


def _rank_ddp(rank, world, seed):
    from torch.nn.parallel import DistributedDataParallel

    x, teacher, labels, weight = _dp_batch(seed, 24, 16, 8)
    head = torch.nn.Linear(8, 16, bias=False)
    with torch.no_grad():
        head.weight.copy_(weight)
    model = DistributedDataParallel(head)
    # Uneven halves, each in two micro-batches of gradient accumulation.
    mine = torch.arange(24)[(torch.arange(24) % 3 == 0) == (rank == 0)]
    micro = torch.tensor_split(mine, 2)
    num_items = global_num_items(*(labels[m] for m in micro))
    for k, m in enumerate(micro):
        loss = fastkd.kd_loss(model(x[m]), teacher[m], labels[m], ce_weight=0.5,
                              num_items_in_batch=num_items)  # fmt: skip
        ctx = model.no_sync() if k == 0 else torch.enable_grad()
        with ctx:
            (loss * world).backward()
    return {"grad": head.weight.grad, "num_items": num_items}


def test_global_num_items_under_ddp(tmp_path):
    results = run_ranks(2, _rank_ddp, tmp_path, SEED)
    x, teacher, labels, weight = _dp_batch(SEED, 24, 16, 8)
    w = weight.double().requires_grad_(True)
    ref = fastkd.kd_loss(x.double() @ w.T, teacher.double(), labels, ce_weight=0.5)
    ref.backward()
    count = int((labels != -100).sum())
    for r in results:
        assert int(r["num_items"]) == count
        assert rel_err(r["grad"], w.grad) <= 1e-5


def test_global_num_items_alone():
    labels = torch.tensor([[1, -100, 3], [-100, -100, 2]])
    assert int(global_num_items(labels)) == 3
    assert int(global_num_items(labels, labels[:1])) == 5
    assert int(global_num_items(labels, shift=True)) == 2
    with pytest.raises(TypeError, match="labels"):
        global_num_items(labels.float())
