"""Vocab-parallel KD against one process on the whole logits: time and bytes per call.

    torchrun --nproc_per_node 2 benchmarks/vocab_parallel.py            # gloo, CPU tensors
    torchrun --nproc_per_node 2 benchmarks/vocab_parallel.py --backend nccl --dtype bfloat16 \
        --tokens 8192 --vocab 128256                                     # one GPU per rank
    python benchmarks/vocab_parallel.py --world 2                        # no torchrun: spawns
                                                                         # gloo ranks itself

Every rank makes the same whole student and teacher logits (N x V, one seed) and keeps its
contiguous vocabulary shard (``fastkd.distributed.vocab_shard``); the labels (and a top-k
teacher, ``--teacher topk``) are global. In one run, side by side:

- **vocab-parallel**: one forward + backward of ``fastkd.kd_loss(shard_s, shard_t, labels,
  process_group=...)`` on every rank. Each call starts after a barrier; its time is the
  slowest rank's (``fastkd.bench.measure.time_call`` on each rank, then the maximum over the
  ranks); the median over ``--repeats`` calls after one warm-up call is reported.
- **bytes per call**: what this rank hands to collectives during one call, as
  ``fastkd.distributed.count_collectives`` records it (the handshake, the statistics, the
  mixtures' second round), against the bytes of one logits tensor gathered whole (N·V·itemsize,
  what an all-gather of the shards assembles on every rank; a dense teacher needs two) and
  this rank's share of it (N·V_r·itemsize, what it would send).
- **single process**: the same loss, with the same options, of rank 0 alone on the whole
  logits (``fastkd.kd_loss`` without ``process_group``, the backend "auto" picks), timed the
  same way while the other ranks wait at a barrier.

On the CPU each rank runs ``--threads`` threads (default: the cores over the ranks), and the
single process as many as one rank: the comparison is one rank's resources against the same
resources holding the whole vocabulary, as one GPU against two. Rank 0 prints a table and
writes ``--json``; both losses are recorded (they must agree within 1e-5 relative).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile

import torch
import torch.distributed as dist

import fastkd
from fastkd import _backends
from fastkd.bench.measure import device_name, time_call
from fastkd.distributed import count_collectives, vocab_shard

TIMEOUT = datetime.timedelta(seconds=120)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=2048, help="N, rows of logits (default 2048)")
    p.add_argument("--vocab", type=int, default=32000, help="V, the whole vocabulary")
    p.add_argument("--divergence", default="forward_kl")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--ce-weight", type=float, default=0.0)
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--teacher", choices=("dense", "topk"), default="dense")
    p.add_argument("--topk", type=int, default=64, help="K, with --teacher topk")
    p.add_argument("--backend", choices=("gloo", "nccl"), default="gloo",
                   help="gloo: CPU tensors; nccl: CUDA, one GPU per rank (LOCAL_RANK)")  # fmt: skip
    p.add_argument("--repeats", type=int, default=5, help="timed calls, after one warm-up")
    p.add_argument("--threads", type=int, default=None, help="torch threads per rank (CPU)")
    p.add_argument("--world", type=int, default=2,
                   help="ranks to spawn when not started by torchrun")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results here (rank 0)")
    return p


def _inputs(args, device):
    """The whole logits (the same on every rank: one seed), the labels and the teacher."""
    g = torch.Generator(device=device).manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    N, V = args.tokens, args.vocab
    s = (torch.randn(N, V, generator=g, device=device) * 2.0).to(dtype)
    t = (torch.randn(N, V, generator=g, device=device) * 3.0).to(dtype)
    labels = torch.randint(0, V, (N,), generator=g, device=device)
    labels[torch.rand(N, generator=g, device=device) < 0.1] = -100  # some padding
    return s, t, labels


def _options(args) -> dict:
    return {"divergence": args.divergence, "temperature": args.temperature,
            "ce_weight": args.ce_weight}  # fmt: skip


def _slowest(ms: float, device) -> float:
    """The largest of the ranks' times of one call (an all_reduce outside the clock)."""
    x = torch.tensor([ms], dtype=torch.float64, device=device)
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return float(x)


def _time(step, repeats: int, device, everyone: bool) -> tuple[list[float], torch.Tensor]:
    """(milliseconds of each timed call, the warm-up's loss). ``everyone``: every rank calls
    ``step`` and a call's time is the slowest rank's; otherwise rank 0 alone calls it."""
    times, loss = [], None
    alone = not everyone and dist.get_rank() != 0
    for i in range(repeats + 1):
        dist.barrier()
        ms = 0.0
        if not alone:
            ms, out = time_call(step, device)
            loss = out if loss is None else loss
        if everyone:
            ms = _slowest(ms, device)
        if i:  # the first call is the warm-up
            times.append(ms)
    return times, loss


def run(rank: int, world: int, args, device) -> dict | None:
    whole_s, whole_t, labels = _inputs(args, device)
    shard_s = vocab_shard(whole_s, rank, world).clone().requires_grad_(True)
    shard_t = vocab_shard(whole_t, rank, world).clone()
    teacher = shard_t
    whole_teacher = whole_t
    if args.teacher == "topk":
        whole_teacher = fastkd.topk_logprobs(whole_t, k=args.topk, temperature=args.temperature)
        teacher = whole_teacher
    if rank != 0:  # rank 0 keeps the whole logits for the single-process loss
        del whole_s, whole_t, whole_teacher
    group = dist.group.WORLD
    options = _options(args)

    def parallel_step():
        shard_s.grad = None
        loss = fastkd.kd_loss(shard_s, teacher, labels, process_group=group, **options)
        loss.backward()
        return loss.detach()

    with count_collectives() as log:
        parallel_step()
    parallel_ms, parallel_loss = _time(parallel_step, args.repeats, device, everyone=True)
    all_losses = [torch.zeros_like(parallel_loss) for _ in range(world)]
    dist.all_gather(all_losses, parallel_loss)
    shard_s = shard_t = teacher = None  # the shards' memory back before the single process

    single_step = None
    if rank == 0:
        single_s = whole_s.requires_grad_(True)

        def single_step():
            single_s.grad = None
            loss = fastkd.kd_loss(single_s, whole_teacher, labels, **options)
            loss.backward()
            return loss.detach()

    single_ms, single_loss = _time(single_step, args.repeats, device, everyone=False)
    if rank != 0:
        return None

    N, V = args.tokens, args.vocab
    itemsize = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    width = vocab_shard(torch.empty(0, V), 0, world).shape[-1]
    bytes_per_call = sum(b for _, b in log.calls)
    return {
        "meta": {
            "script": "benchmarks/vocab_parallel.py",
            "argv": sys.argv[1:],
            "world": world,
            "backend": args.backend,
            "device": device_name(device),
            "threads_per_rank": torch.get_num_threads() if device.type == "cpu" else None,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "date": datetime.date.today().isoformat(),
        },
        "case": {
            "tokens": N,
            "vocab": V,
            "dtype": args.dtype,
            "teacher": args.teacher,
            "topk": args.topk if args.teacher == "topk" else None,
            **options,
            "repeats": args.repeats,
        },
        "vocab_parallel": {
            "median_ms": statistics.median(parallel_ms),
            "times_ms": parallel_ms,
            "loss": float(parallel_loss),
            "losses_by_rank": [float(x) for x in all_losses],
            "collectives": [{"name": name, "bytes": b} for name, b in log.calls],
            "bytes_per_call": bytes_per_call,
            "bytes_per_row": bytes_per_call / N,
        },
        "single_process": {
            "median_ms": statistics.median(single_ms),
            "times_ms": single_ms,
            "loss": float(single_loss),
            "backend": _backends.resolve("auto", device, getattr(torch, args.dtype)),
        },
        "allgather_logits": {
            "gathered_bytes": N * V * itemsize,
            "rank0_sends_bytes": N * width * itemsize,
            "tensors_to_gather": 2 if args.teacher == "dense" else 1,
        },
        "loss_rel_diff": abs(float(parallel_loss) - float(single_loss))
        / max(abs(float(single_loss)), 1e-30),
    }


def _fmt_bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def report(result: dict) -> str:
    c, m = result["case"], result["meta"]
    vp, sp, ag = result["vocab_parallel"], result["single_process"], result["allgather_logits"]
    teacher = "dense teacher" if c["teacher"] == "dense" else f"top-{c['topk']} teacher"
    lines = [
        f"{c['divergence']}, N={c['tokens']} V={c['vocab']} {c['dtype']}, {teacher}, "
        f"{m['world']} ranks on {m['backend']} ({m['device']}, "
        f"{m['threads_per_rank'] or '-'} threads a rank), forward+backward, "
        f"median of {c['repeats']}",
        f"{'':<34}{'median':>12}{'bytes/call':>14}{'loss':>14}",
        f"{'vocab-parallel (every rank)':<34}{vp['median_ms']:>9.1f} ms"
        f"{_fmt_bytes(vp['bytes_per_call']):>14}{vp['loss']:>14.7f}",
        f"{'single process (rank 0, whole V)':<34}{sp['median_ms']:>9.1f} ms"
        f"{'-':>14}{sp['loss']:>14.7f}   (backend {sp['backend']})",
        f"{'all-gather of one logits tensor':<34}{'':>12}{_fmt_bytes(ag['gathered_bytes']):>14}"
        f"   (rank 0 would send {_fmt_bytes(ag['rank0_sends_bytes'])})",
        "collectives per call: "
        + ", ".join(f"{x['name']} {x['bytes']} B" for x in vp["collectives"])
        + f"  ({vp['bytes_per_row']:.1f} B a row)",
        f"loss relative difference {result['loss_rel_diff']:.1e}",
    ]
    return "\n".join(lines)


def _rank_main(rank: int, world: int, args, init_method: str | None) -> None:
    if args.backend == "nccl":
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
        threads = args.threads or max(1, (os.cpu_count() or 1) // world)
        torch.set_num_threads(threads)
    kwargs = {"timeout": TIMEOUT}
    if init_method is not None:
        kwargs.update(init_method=init_method, rank=rank, world_size=world)
    if args.backend == "nccl":
        kwargs["device_id"] = device
    dist.init_process_group(args.backend, **kwargs)
    try:
        result = run(dist.get_rank(), dist.get_world_size(), args, device)
    finally:
        dist.destroy_process_group()
    if result is not None:
        print(report(result), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun
        _rank_main(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args, None)
        return
    if args.backend != "gloo":
        raise SystemExit("without torchrun, only --backend gloo (CPU ranks) is spawned")
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        init = f"file://{os.path.join(tmp, 'rendezvous')}"
        mp.start_processes(_rank_main, args=(args.world, args, init), nprocs=args.world,
                           join=True, start_method="spawn")  # fmt: skip


if __name__ == "__main__":
    main()
