"""The causal-LM shift two ways: slicing the logits, or shifting the labels (docs/trainers.md).

    python benchmarks/label_shift_memory.py            # B=4, S=512, V=32000, float32, 3 rounds

``kd_loss(logits[:, :-1], teacher[:, :-1], labels[:, 1:])`` and ``kd_loss(logits, teacher,
pad(labels[:, 1:], (0, 1), value=-100))`` give the same loss and gradient. Each variant runs
forward + backward in a fresh subprocess, alternating, and the medians are printed: its time
and its peak memory beyond the inputs (``fastkd.bench.measure``'s ``time_call`` and
``PeakMemory``: on Linux, the peak RSS reset after the inputs exist). The logits come from a
leaf through one multiply, as a model's output would.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

CHILD = """
import sys, torch, torch.nn.functional as F, fastkd
from fastkd.bench.measure import PeakMemory, time_call
mode, B, S, V = sys.argv[1], *map(int, sys.argv[2:5])
torch.manual_seed(0)
leaf = torch.randn(B, S, V, requires_grad=True)
teacher = torch.randn(B, S, V)
labels = torch.randint(0, V, (B, S))
labels[:, : S // 8] = -100  # a prompt
fastkd.kd_loss(leaf[:1, :8] * 1.0, teacher[:1, :8]).backward()  # imports, first-call setup
leaf.grad = None
def step():
    logits = leaf * 1.0
    if mode == "slice":
        loss = fastkd.kd_loss(logits[:, :-1], teacher[:, :-1], labels[:, 1:], temperature=2.0)
    else:
        shifted = F.pad(labels[:, 1:], (0, 1), value=-100)
        loss = fastkd.kd_loss(logits, teacher, shifted, temperature=2.0)
    loss.backward()
    return loss
with PeakMemory("cpu") as peak:
    ms, loss = time_call(step, "cpu")
print(ms / 1e3, "nan" if peak.bytes is None else peak.bytes, loss.item())
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="4x512x32000", help="B x S x V")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    B, S, V = (int(x) for x in args.shape.split("x"))
    runs: dict[str, list[tuple[float, float, float]]] = {"slice": [], "shift-labels": []}
    for _ in range(args.rounds):
        for mode in runs:
            out = subprocess.run(
                [sys.executable, "-c", CHILD, mode, str(B), str(S), str(V)],
                capture_output=True,
                text=True,
                check=True,
            )
            runs[mode].append(tuple(float(x) for x in out.stdout.split()))
    print(f"B={B} S={S} V={V} float32, forward + backward, median of {args.rounds} subprocesses")
    print(f"one N x V float32 tensor: {B * S * V * 4 / 1e9:.2f} GB")
    for mode, rows in runs.items():
        seconds = statistics.median(r[0] for r in rows)
        peak = statistics.median(r[1] for r in rows)
        print(f"{mode:<13} {seconds:6.2f} s   peak beyond the inputs {peak / 1e9:.2f} GB   "
              f"loss {rows[0][2]:.6f}")  # fmt: skip


if __name__ == "__main__":
    main()
