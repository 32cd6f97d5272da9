"""Measured over expected, per case of a benchmark run: the time docs/performance.md's pass
plan gives a fastkd path (bytes an entry by path and divergence) at the run's measured copy
bandwidth, next to the median the sweep measured.

    python benchmarks/expected_times.py RESULTS/bench.json     # a markdown table

gpu_check.sh runs it after the sweep and adds the table to bench.md. A ratio near 1 is a
kernel at the copy bandwidth for its traffic; well above 1, a kernel slower than its bytes
(instruction-bound, too few programs, or spills), which a profile then explains. The
fused-linear rows are matmul-bound (their "% floor" column is against FLOPs), and the
reference backend and the other implementations have no pass plan: they are left out.
"""

from __future__ import annotations

import argparse
import json

from fastkd.divergences import DIVERGENCES

ELEMENT_SIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
# fastkd-<backend>[-inplace]: the kernel backends (fastkd-torch is the reference under
# autograd, with no pass plan).
KERNEL_IMPLEMENTATIONS = [["fastkd", "triton"], ["fastkd", "cuda"], ["fastkd", "cpu"]]


def path_bytes(implementation: str, mode: str, divergence: str, tokens: int, vocab: int,
               dtype: str) -> int:  # fmt: skip
    """Device-memory bytes of a fastkd call on the logits path (docs/performance.md, "Pass
    plan and bytes"): each pass reads both rows, the gradient is written once, and the
    backward with grad_output == 1 touches nothing. The Triton backend holds rows of up to
    fastkd/triton/launch.py's ON_CHIP_MAX_V entries on chip: one pass."""
    grad = mode == "fwd+bwd"
    one_pass_loss = DIVERGENCES[divergence].one_pass_loss
    passes = (2 if one_pass_loss else 3) if grad else (1 if one_pass_loss else 2)
    if "triton" in implementation:
        from fastkd.triton.launch import ON_CHIP_MAX_V

        passes = 1 if vocab <= ON_CHIP_MAX_V else passes
    entries = tokens * vocab * ELEMENT_SIZE[dtype]
    return entries * (2 * passes + (1 if grad else 0))


def rows_with_expectations(bench: dict) -> list[dict]:
    """The timed rows of fastkd's kernel backends on the logits path in a bench.json, each
    with expected_bytes, expected_ms (at meta.copy_GBps) and measured_over_expected."""
    gbps = bench["meta"].get("copy_GBps")
    out = []
    for r in bench["results"]:
        if (r["implementation"].split("-")[:2] not in KERNEL_IMPLEMENTATIONS or r["fused_linear"]
                or r["status"] != "ok" or not r.get("median_ms") or not gbps):  # fmt: skip
            continue
        nbytes = path_bytes(r["implementation"], r["mode"], r["divergence"], r["tokens"],
                            r["vocab"], r["dtype"])  # fmt: skip
        expected_ms = nbytes / (gbps * 1e9) * 1e3
        out.append(dict(r, expected_bytes=nbytes, expected_ms=expected_ms,
                        measured_over_expected=r["median_ms"] / expected_ms))  # fmt: skip
    return out


def markdown(bench: dict) -> str:
    rows = rows_with_expectations(bench)
    gbps = bench["meta"].get("copy_GBps")
    if not rows:
        return "## Measured over expected\n\nNo timed fastkd logits rows (or no copy bandwidth).\n"
    lines = [
        "## Measured over expected",
        "",
        f"Expected: docs/performance.md's bytes for the path at this run's copy bandwidth "
        f"({gbps:.0f} GB/s).",
        "",
        "| implementation | mode | divergence | N | V | dtype | bytes / entry | expected ms "
        "| measured ms | measured / expected |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        per_entry = r["expected_bytes"] / (r["tokens"] * r["vocab"])
        lines.append(
            f"| {r['implementation']} | {r['mode']} | {r['divergence']} | {r['tokens']} "
            f"| {r['vocab']} | {r['dtype']} | {per_entry:g} | {r['expected_ms']:.3f} "
            f"| {r['median_ms']:.3f} | {r['measured_over_expected']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench_json")
    args = parser.parse_args()
    with open(args.bench_json) as f:
        print(markdown(json.load(f)), end="")


if __name__ == "__main__":
    main()
