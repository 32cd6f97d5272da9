"""KDLoss forward + backward on CPU: fastkd's C++ kernel against the plain-PyTorch formula,
eager and under torch.compile (issue 3's benchmark).

    python benchmarks/cpu_kernel_vs_torch.py                    # the issue's four cases
    python benchmarks/cpu_kernel_vs_torch.py --repeats 3 --cases 4096x32000 --no-memory
    python benchmarks/cpu_kernel_vs_torch.py --cases 64x512 --repeats 1 --warmup 1   # a smoke run

Cases: float32 logits, T = 2, forward_kl (the F.kl_div formula with batchmean and T^2, which
KDLoss replaces) and jsd (TRL's generalized_jsd_loss formula, beta = 0.5, no T^2, mean over
rows), at N x V = 4096 x 32000 and 1024 x 128256; the formulas are fastkd.bench.formulas's.
Time: every variant of a case runs in this one process, interleaved round by round, after a
warm-up (which includes torch.compile's compilation); the median of the rounds is reported.
Memory: each variant runs again in a fresh subprocess, which reports the peak RSS of a
forward + backward after a warm-up one, and that peak over the RSS the process had just
before it (its inputs, 2 * N * V * 4 bytes, and its libraries), as
fastkd.bench.measure.PeakMemory measures them (Linux); the gradient itself is N * V * 4 bytes.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys

import torch

import fastkd
from fastkd.bench import measure
from fastkd.bench.formulas import kd_formula

T = 2.0
BETA = 0.5
CASES = ("4096x32000", "1024x128256")  # N x V
DIVERGENCES = ("forward_kl", "jsd")
VARIANTS = ("fastkd", "torch_eager", "torch_compile")


def options(divergence: str) -> dict:
    """The loss of a case, as kd_loss's arguments: batchmean and T^2 for forward_kl (the
    F.kl_div formula), TRL's JSD (beta on the teacher, no T^2) for jsd."""
    if divergence == "forward_kl":
        return dict(divergence=divergence, temperature=T)
    return dict(divergence=divergence, temperature=T, beta=BETA, scale_by_temperature_squared=False)


def loss_fn(variant: str, divergence: str):
    if variant == "fastkd":
        reduction = "batchmean" if divergence == "forward_kl" else "mean"  # the same on (N, V)
        return fastkd.KDLoss(backend="cpu", reduction=reduction, **options(divergence))
    formula = functools.partial(kd_formula, **options(divergence))
    if variant == "torch_eager":
        return formula
    return torch.compile(formula, fullgraph=True, dynamic=False)


def make_inputs(n_rows: int, vocab: int):
    gen = torch.Generator().manual_seed(0)
    student = (torch.randn(n_rows, vocab, generator=gen) * 3).requires_grad_(True)
    teacher = torch.randn(n_rows, vocab, generator=gen) * 3
    return student, teacher


def step(fn, student, teacher) -> tuple[float, torch.Tensor]:
    """One forward + backward; returns (seconds, loss). autograd.grad: no accumulation."""

    def call():
        loss = fn(student, teacher)
        torch.autograd.grad(loss, student)
        return loss.detach()

    ms, loss = measure.time_call(call, "cpu")
    return ms / 1e3, loss


def time_case(n_rows: int, vocab: int, divergence: str, repeats: int, warmup: int) -> dict:
    student, teacher = make_inputs(n_rows, vocab)
    fns = {v: loss_fn(v, divergence) for v in VARIANTS}
    losses = {}
    for variant, fn in fns.items():  # warm-up, compilation included
        for _ in range(warmup):
            _, losses[variant] = step(fn, student, teacher)
    times = {v: [] for v in VARIANTS}
    for _ in range(repeats):
        for variant, fn in fns.items():
            elapsed, _ = step(fn, student, teacher)
            times[variant].append(elapsed)
    ref = losses["torch_eager"].item()
    return {
        v: {
            "median_s": statistics.median(ts),
            "min_s": min(ts),
            "loss_rel_diff": abs(losses[v].item() - ref) / abs(ref),
        }
        for v, ts in times.items()
    }


def shape(case: str) -> tuple[int, int]:
    """'4096x32000' -> (4096, 32000)."""
    n_rows, vocab = (int(x) for x in case.split("x"))
    return n_rows, vocab


def memory_worker(variant: str, case: str, divergence: str) -> None:
    """Runs one variant in this (fresh) process and prints, as JSON, the peak RSS of one
    forward + backward after a warm-up one (which compiles), and the RSS before it: the
    inputs and whatever the process holds anyway (null where it can't be measured)."""
    n_rows, vocab = shape(case)
    fn = loss_fn(variant, divergence)
    student, teacher = make_inputs(n_rows, vocab)
    step(fn, student, teacher)
    with measure.PeakMemory("cpu") as mem:
        step(fn, student, teacher)
    print(json.dumps({"peak_bytes": mem.peak, "with_inputs_bytes": mem.before}))


def measure_memory(variant: str, case: str, divergence: str) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--memory-worker", variant, case, divergence],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def machine() -> str:
    return (
        f"{measure.device_name('cpu')}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"fastkd CPU kernel: {fastkd.build_info()['cpu_kernel']}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), help="N x V shapes, e.g. 64x512")
    parser.add_argument("--divergences", nargs="+", default=list(DIVERGENCES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-memory", action="store_true", help="skip the RSS subprocesses")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--memory-worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_worker:
        memory_worker(*args.memory_worker)
        return

    print(f"# {machine()}")
    print(f"# float32, T = {T}, forward + backward; median of {args.repeats} rounds")
    header = f"{'case':<12} {'divergence':<11} {'variant':<14} {'median s':>9} {'speed-up':>9}"
    if not args.no_memory:
        header += f" {'peak RSS GB':>12} {'over inputs GB':>15}"
    print(header)
    results = []
    for case in args.cases:
        n_rows, vocab = shape(case)
        for divergence in args.divergences:
            timed = time_case(n_rows, vocab, divergence, args.repeats, args.warmup)
            for variant in VARIANTS:
                row = {"case": case, "divergence": divergence, "variant": variant}
                row.update(timed[variant])
                row["speedup_vs_this"] = timed[variant]["median_s"] / timed["fastkd"]["median_s"]
                line = (
                    f"{case:<12} {divergence:<11} {variant:<14} {row['median_s']:>9.3f} "
                    f"{row['speedup_vs_this']:>8.2f}x"
                )
                if not args.no_memory:
                    mem = measure_memory(variant, case, divergence)
                    row.update(mem)
                    if mem["peak_bytes"] is None:
                        line += f" {'n/a':>12} {'n/a':>15}"
                    else:
                        over = (mem["peak_bytes"] - mem["with_inputs_bytes"]) / 1e9
                        line += f" {mem['peak_bytes'] / 1e9:>12.2f} {over:>15.2f}"
                print(line, flush=True)
                results.append(row)
    print("# speed-up: the variant's median time over fastkd's (how much faster fastkd is)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
