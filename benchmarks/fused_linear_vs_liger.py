"""FusedLinearKDLoss against the plain formula on full logits and Liger-Kernel's fused JSD.

    PYTHONPATH=. python benchmarks/fused_linear_vs_liger.py    # CPU, N=2048, H=1024, V=32000
    PYTHONPATH=. python benchmarks/fused_linear_vs_liger.py --device cuda --dtype bfloat16 \\
        --tokens 8192 --hidden 2048 --teacher-hidden 4096 --vocab 128256

The shared divergence is JSD with beta = 0.5 at temperatures 1 and 2, no hard-label loss:
Liger's ``LigerFusedLinearJSDLoss(weight_hard_loss=0, weight_soft_loss=1, beta)`` computes
beta KL(p||m) + (1 - beta) KL(q||m), m = beta p + (1 - beta) q, on logits / T, without T^2,
averaged over the tokens whose label is not ignore_index: fastkd's ``divergence="jsd"``,
``scale_by_temperature_squared=False``, ``reduction="mean"`` with the same labels.

The plain formula is ``fastkd.bench.formulas.fused_linear_formula`` (TRL's JSD on full
logits, masked mean over the labelled tokens). Each (implementation, temperature) runs in
its own subprocess, so that its peak memory is its own. In that process: one warm-up
(Liger's torch.compile happens there), one timed run, then the implementation and the four
bare matmuls the loss cannot avoid (student and teacher logits, grad_hidden = G W,
grad_weight = G^T h) alternately, ``--repeats`` times; medians are reported, and each time
as a ratio to the bare matmuls of the same process. The peak memory is
``fastkd.bench.measure.PeakMemory``'s from just after the inputs exist and the loss is built
(its imports done) to the end of the first timed run, warm-up included: the peak resident
set on CPU (the whole process: interpreter, torch, inputs; Linux), the peak allocated memory
on CUDA; "inputs" is what was in use when it started. Losses and gradients are compared with
the plain formula's before anything is reported as a result.

(``python -m fastkd.bench --fused-linear`` and ``benchmarks/bench_fused_linear.py`` time the
same implementations in one process against the float64 reference; this script adds the
per-process peak RSS on CPU, the same-process matmul floor and Liger's eager mode.)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile

IMPLEMENTATIONS = ("fastkd", "plain", "liger", "liger_eager")
BETA = 0.5


# --- one implementation, in a subprocess ----------------------------------------------------


def _inputs(args, torch):
    gen = torch.Generator().manual_seed(0)
    dtype = getattr(torch, args.dtype)

    def head(h):
        hidden = torch.randn(args.tokens, h, generator=gen) * 2.0
        weight = torch.randn(args.vocab, h, generator=gen) * (2.0 / math.sqrt(h))
        return hidden.to(args.device, dtype), weight.to(args.device, dtype)

    hs, ws = head(args.hidden)
    ht, wt = head(args.teacher_hidden or args.hidden)
    labels = torch.randint(0, args.vocab, (args.tokens,), generator=gen)
    labels[torch.rand(args.tokens, generator=gen) < args.ignored] = -100
    return hs.requires_grad_(), ws.requires_grad_(), ht, wt, labels.to(args.device)


def _loss_fn(impl: str, temperature: float, args):
    if impl == "fastkd":
        import fastkd

        loss = fastkd.FusedLinearKDLoss(
            "jsd", beta=BETA, temperature=temperature, scale_by_temperature_squared=False,
            memory_budget=args.memory_budget,
        )  # fmt: skip
        return lambda hs, ws, ht, wt, labels: loss(hs, ws, ht, wt, labels)
    if impl.startswith("liger"):
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        # Liger's default compiles its per-chunk loss with torch.compile; "liger_eager" not.
        loss = LigerFusedLinearJSDLoss(
            weight_hard_loss=0.0, weight_soft_loss=1.0, beta=BETA, temperature=temperature,
            compiled=impl == "liger",
        )  # fmt: skip
        return lambda hs, ws, ht, wt, labels: loss(hs, ws, ht, wt, labels)

    from fastkd.bench.formulas import fused_linear_formula

    def plain(hs, ws, ht, wt, labels):
        return fused_linear_formula(
            hs, ws, ht, wt, labels, divergence="jsd", beta=BETA, temperature=temperature,
            scale_by_temperature_squared=False,
        )  # fmt: skip

    return plain


def worker(args) -> None:
    import torch

    from fastkd.bench import measure

    hs, ws, ht, wt, labels = _inputs(args, torch)
    fn = _loss_fn(args.worker, args.temperature, args)

    def step():
        hs.grad = ws.grad = None
        loss = fn(hs, ws, ht, wt, labels)
        loss.backward()
        return loss

    def timed(call) -> float:
        return measure.time_call(call, args.device)[0] / 1e3

    with measure.PeakMemory(args.device) as mem:
        step()  # warm-up: lazy initialisation, Liger's torch.compile
        ms, loss = measure.time_call(step, args.device)
    times = [ms / 1e3]
    torch.save(
        {"loss": loss.detach().cpu(), "hidden": hs.grad.cpu(), "weight": ws.grad.cpu()},
        os.path.join(args.save, f"{args.worker}-{args.temperature}.pt"),
    )

    # The floor: the four matmuls of the loss, at full size, on this device and dtype.
    grad_logits = torch.randn(args.tokens, args.vocab, device=args.device, dtype=hs.dtype)
    h_s, w_s, h_t, w_t = hs.detach(), ws.detach(), ht, wt

    def matmuls():
        h_s @ w_s.T
        h_t @ w_t.T
        grad_logits @ w_s
        grad_logits.T @ h_s

    matmul_times = []
    for _ in range(args.repeats):
        matmul_times.append(timed(matmuls))
        if len(times) < args.repeats:
            times.append(timed(step))
    print(
        json.dumps(
            {
                "time": statistics.median(times),
                "times": times,
                "matmuls": statistics.median(matmul_times),
                "peak": mem.peak,
                "inputs_peak": mem.before,
                "loss": loss.item(),
            }
        )
    )


# --- the driver -----------------------------------------------------------------------------


def _rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _run(args, impl, temperature, save_dir):
    cmd = [sys.executable, __file__, "--worker", impl, "--temperature", str(temperature),
           "--save", save_dir] + _shape_args(args)  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["?"]
        return {"error": tail[0]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _shape_args(args):
    out = ["--tokens", str(args.tokens), "--hidden", str(args.hidden), "--vocab",
           str(args.vocab), "--dtype", args.dtype, "--device", args.device, "--repeats",
           str(args.repeats), "--ignored", str(args.ignored)]  # fmt: skip
    if args.teacher_hidden:
        out += ["--teacher-hidden", str(args.teacher_hidden)]
    if args.memory_budget:
        out += ["--memory-budget", str(args.memory_budget)]
    return out


def _machine(args) -> str:
    import torch

    from fastkd.bench import measure

    return f"{measure.device_name(args.device)}, {os.cpu_count()} CPUs, torch {torch.__version__}"


def main(args) -> dict:
    import torch

    results = {}
    with tempfile.TemporaryDirectory() as save_dir:
        for temperature in args.temperatures:
            for impl in args.impl:
                print(f"running {impl} T={temperature} ...", file=sys.stderr, flush=True)
                result = _run(args, impl, temperature, save_dir)
                path = os.path.join(save_dir, f"{impl}-{float(temperature)}.pt")
                if "error" not in result and os.path.exists(path):
                    result["saved"] = torch.load(path)
                results[(impl, temperature)] = result

        # Agreement with the plain formula, before any figure is reported.
        for (_, temperature), result in results.items():
            plain = results.get(("plain", temperature), {}).get("saved")
            if "saved" in result and plain is not None:
                saved = result["saved"]
                result["err"] = {k: _rel_err(saved[k], plain[k]) for k in saved}
        for result in results.values():
            result.pop("saved", None)

    print(f"\nfused linear JSD(beta={BETA}), N={args.tokens}, H_s={args.hidden}, "
          f"H_t={args.teacher_hidden or args.hidden}, V={args.vocab}, {args.dtype}, "
          f"{_machine(args)}; median of {args.repeats}")  # fmt: skip
    header = (f"{'impl':<12}{'T':>5}{'fwd+bwd s':>11}{'x matmuls':>11}{'matmuls s':>11}"
              f"{'peak GB':>9}{'inputs GB':>11}{'over inputs GB':>16}  rel err vs plain (loss, grad_h, grad_W)")  # fmt: skip  # noqa: E501
    print(header)
    for (impl, temperature), r in results.items():
        if "error" in r:
            print(f"{impl:<12}{temperature:>5}  error: {r['error']}")
            continue
        err = r.get("err")
        errs = (
            "" if err is None else "  ".join(f"{err[k]:.1e}" for k in ("loss", "hidden", "weight"))
        )  # noqa: E501
        if r["peak"] is None:  # no /proc/self/clear_refs here
            memory = f"{'n/a':>9}{'n/a':>11}{'n/a':>16}"
        else:
            memory = (f"{r['peak'] / 1e9:>9.2f}{r['inputs_peak'] / 1e9:>11.2f}"
                      f"{(r['peak'] - r['inputs_peak']) / 1e9:>16.2f}")  # fmt: skip
        print(f"{impl:<12}{temperature:>5}{r['time']:>11.2f}{r['time'] / r['matmuls']:>11.2f}"
              f"{r['matmuls']:>11.2f}{memory}  {errs}")  # fmt: skip
    return {f"{impl} T={t}": r for (impl, t), r in results.items()}


def _parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--teacher-hidden", type=int, default=0, help="default: --hidden")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 2.0])
    p.add_argument("--impl", nargs="+", default=list(IMPLEMENTATIONS), choices=IMPLEMENTATIONS)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ignored", type=float, default=0.0, help="fraction of ignored labels")
    p.add_argument("--memory-budget", type=int, help="fastkd's memory_budget (bytes)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--temperature", type=float, help=argparse.SUPPRESS)
    p.add_argument("--save", help=argparse.SUPPRESS)
    return p


if __name__ == "__main__":
    args = _parser().parse_args()
    if args.worker:
        worker(args)
    else:
        out = main(args)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "results": out}, f, indent=2)
