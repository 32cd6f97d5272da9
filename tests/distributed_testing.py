"""Multi-process tests on gloo (CPU): run a function on every rank of a fresh process group.

``run_ranks(world, fn, tmp_path, *args)`` spawns ``world`` processes, each joins a gloo group
(file rendezvous in tmp_path, a short timeout so that a mistake fails instead of hanging),
calls ``fn(rank, world, *args)`` and saves what it returns (tensors, numbers, strings) with
torch.save; the parent loads them with ``weights_only=True`` and returns them by rank. An
exception in a rank fails the test with that rank's traceback.
"""

from __future__ import annotations

import datetime
import os
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT_S = 60


def _child(rank, world, fn, rdzv, out_dir, args):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{rdzv}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=TIMEOUT_S),
    )  # fmt: skip
    try:
        result = fn(rank, world, *args)
    except BaseException:
        result = {"error": traceback.format_exc()}
    finally:
        dist.destroy_process_group()
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def run_ranks(world: int, fn, tmp_path, *args) -> list:
    rdzv = tmp_path / "rendezvous"
    out_dir = tmp_path / "out"
    out_dir.mkdir(exist_ok=True)
    mp.start_processes(
        _child, args=(world, fn, str(rdzv), str(out_dir), args), nprocs=world, join=True,
        start_method="spawn",
    )  # fmt: skip
    results = [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(world)]
    failed = [
        f"rank {rank} failed:\n{result['error']}"
        for rank, result in enumerate(results)
        if isinstance(result, dict) and "error" in result
    ]
    if failed:  # every rank's traceback: the first is often a peer's "connection closed"
        raise AssertionError("\n".join(failed))
    return results
