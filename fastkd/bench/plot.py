"""--plot: forward+backward time and peak memory against V and against N (matplotlib).

One figure per (logits or fused linear, divergence, dtype, teacher: dense or top-K with its
tail): time vs V and peak memory vs V at the N with the most vocabulary sizes measured, and
the same against N at the V with the most token counts. An implementation that failed at a
size has no point there.
"""

from __future__ import annotations

import os
from collections import Counter

from .cases import topk_label
from .harness import Result
from .implementations import FWD_BWD


def _groups(results: list[Result]) -> dict[tuple, list[Result]]:
    groups: dict[tuple, list[Result]] = {}
    for r in results:
        if r.mode == FWD_BWD:
            key = (r.fused_linear, r.divergence, r.dtype, r.teacher, r.topk, r.topk_tail)
            groups.setdefault(key, []).append(r)
    return groups


def _path_for(path: str, key: tuple, many: bool) -> str:
    if not many:
        return path
    stem, ext = os.path.splitext(path)
    fused, divergence, dtype, teacher, k, tail = key
    name = f"{stem}-{'fused' if fused else 'logits'}-{divergence}-{dtype}"
    if teacher == "topk":
        name += f"-top{k}" + (f"-{tail}" if tail != "none" else "")
    return name + (ext or ".png")


def _axis(ax_time, ax_mem, rows: list[Result], along: str, fixed: str, name: str) -> None:
    counts = Counter(getattr(r, fixed) for r in rows if r.status == "ok")
    ax_time.set_xlabel(name)
    ax_mem.set_xlabel(name)
    if not counts:
        return

    def coverage(value):
        return len({getattr(r, along) for r in rows if getattr(r, fixed) == value}), value

    held = max(counts, key=coverage)
    chosen = [r for r in rows if getattr(r, fixed) == held]
    label = {"tokens": "N", "vocab": "V"}[fixed]
    ax_time.set_title(f"time vs {name} ({label}={held})")
    ax_mem.set_title(f"peak memory vs {name} ({label}={held})")
    peak = max((r.peak_mem_bytes or 0) for r in chosen)
    unit, scale = ("GB", 1e9) if peak >= 1e9 else ("MB", 1e6)
    for impl in dict.fromkeys(r.implementation for r in chosen):
        points = sorted(
            (getattr(r, along), r.median_ms, r.peak_mem_bytes)
            for r in chosen
            if r.implementation == impl and r.status == "ok"
        )
        if not points:
            continue
        xs = [p[0] for p in points]
        ax_time.plot(xs, [p[1] for p in points], marker="o", label=impl)
        mem = [(x, p[2] / scale) for x, p in zip(xs, points, strict=True) if p[2] is not None]
        if mem:
            ax_mem.plot([m[0] for m in mem], [m[1] for m in mem], marker="o", label=impl)
    ticks = sorted({getattr(r, along) for r in chosen})
    for ax in (ax_time, ax_mem):
        ax.set_xscale("log")
        ax.set_xticks(ticks, [_short(t) for t in ticks])
        ax.minorticks_off()
        ax.grid(True, alpha=0.3)
    ax_time.set_ylabel("median ms (log)")
    ax_time.set_yscale("log")
    ax_mem.set_ylabel(f"{unit} beyond the inputs")


def _short(n: int) -> str:
    """32000 -> 32k, 128256 -> 128k, 1024 -> 1k, 64 -> 64."""
    return f"{n / 1000:.0f}k" if n >= 1000 else str(n)


def plot(results: list[Result], path: str, title: str = "") -> list[str]:
    """Writes the figures; returns their paths. Raises ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _groups(results)
    written = []
    for key, rows in groups.items():
        fig, axes = plt.subplots(2, 2, figsize=(12, 9))
        _axis(axes[0][0], axes[0][1], rows, "vocab", "tokens", "vocabulary size V")
        _axis(axes[1][0], axes[1][1], rows, "tokens", "vocab", "tokens N")
        handles, labels = [], []
        for ax in axes.flat:
            for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
                if lab not in labels:
                    handles.append(h)
                    labels.append(lab)
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5) or 1)
        fused, divergence, dtype, teacher, k, tail = key
        kind = "FusedLinearKDLoss" if fused else "KDLoss"
        if teacher == "topk":
            kind += f" ({topk_label(k, tail)})"
        fig.suptitle(f"{kind} {divergence} {dtype}, forward+backward\n{title}", fontsize=10)
        fig.tight_layout(rect=(0, 0.06, 1, 1))
        out = _path_for(path, key, len(groups) > 1)
        fig.savefig(out, dpi=110)
        plt.close(fig)
        written.append(out)
    return written
