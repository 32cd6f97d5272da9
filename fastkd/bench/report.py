"""The results as one table (plain text for the terminal, or markdown) and as JSON."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import fields

from .cases import topk_label
from .harness import Result

SCHEMA = 1
_CASE_FIELDS = (
    "divergence", "fused_linear", "teacher", "topk", "topk_tail", "tokens", "vocab", "hidden",
    "dtype", "temperature",
)  # fmt: skip


# --- number formats ---------------------------------------------------------------------


def fmt_ms(ms: float | None) -> str:
    if ms is None:
        return ""
    if ms >= 1000:
        return f"{ms / 1000:.2f} s"
    if ms >= 100:
        return f"{ms:.0f} ms"
    if ms >= 10:
        return f"{ms:.1f} ms"
    return f"{ms:.3f} ms"


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}" if abs(n) < 10 * size else f"{n / size:.1f} {unit}"
    return f"{n} B"


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "" if value is None else f"{value:{spec}}{suffix}"


def fmt_rate(value: float | None) -> str:
    """Three significant digits, no exponent: 4123, 412, 41.2, 4.12, 0.412."""
    if value is None:
        return ""
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.3g}"


# --- the table ---------------------------------------------------------------------------


def _varying(results: list[Result]) -> list[str]:
    """The case fields that differ between rows: they become columns."""
    out = []
    for name in _CASE_FIELDS:
        if len({getattr(r, name) for r in results}) > 1:
            out.append(name)
    return out


_CASE_HEADERS = {
    "divergence": "divergence",
    "fused_linear": "fused",
    "teacher": "teacher",
    "topk": "K",
    "topk_tail": "tail",
    "tokens": "N",
    "vocab": "V",
    "hidden": "H",
    "dtype": "dtype",
    "temperature": "T",
}


def _is_static_skip(r: Result) -> bool:
    """Skipped for a reason that holds in every case (not the time limit)."""
    return r.status == "skipped" and r.reason != "time limit reached"


# Ratio columns beyond "vs eager", shown when some row has them: (header, Result field).
_RATIOS = (("vs compile", "speedup_vs_compile"), ("x matmuls", "x_matmuls"))


def table_rows(results: list[Result]) -> tuple[list[str], list[list[str]]]:
    """Header and cells: implementation, mode, median, spread, achieved rate, % of the
    floor, peak memory beyond the inputs, speed-up over eager (and over torch.compile, and
    the multiple of the bare matmuls, where measured), and notes.

    Implementations skipped for a standing reason (not available here) come last, once
    each, whatever the number of cases and modes.
    """
    varying = _varying(results)
    ratios = [(h, f) for h, f in _RATIOS if any(getattr(r, f) is not None for r in results)]
    rate = "TFLOP/s" if results and all(r.fused_linear for r in results) else "GB/s"
    header = [_CASE_HEADERS[v] for v in varying]
    header += ["implementation", "mode", "median", "spread", rate, "% floor", "peak mem"]
    header += ["vs eager", *(h for h, _ in ratios), "notes"]
    blanks = 5 + len(ratios)  # the cells after the status of a row without timings
    rows = []
    for r in results:
        if _is_static_skip(r):
            continue
        cells = [_case_cell(r, v) for v in varying]
        cells += [r.implementation, r.mode]
        if r.status != "ok":
            cells += [r.status, *[""] * blanks, _note(r)]
        else:
            achieved = r.achieved_TFLOPs if r.fused_linear else r.achieved_GBps
            cells += [
                fmt_ms(r.median_ms),
                _fmt(r.spread_pct, ".1f", "%") and "±" + _fmt(r.spread_pct, ".1f", "%"),
                fmt_rate(achieved),
                _fmt(r.pct_of_floor, ".0f", "%"),
                fmt_bytes(r.peak_mem_bytes),
                _fmt(r.speedup_vs_eager, ".2f", "x"),
                *(_fmt(getattr(r, f), ".2f", "x") for _, f in ratios),
                _note(r),
            ]
        rows.append(cells)
    seen = set()
    for r in results:
        if _is_static_skip(r) and (r.implementation, r.reason) not in seen:
            seen.add((r.implementation, r.reason))
            cells = [""] * len(varying) + [r.implementation, "", "skipped"]
            rows.append(cells + [""] * blanks + [_note(r)])
    return header, rows


def _case_cell(r: Result, field: str) -> str:
    value = getattr(r, field)
    return "" if value is None else str(value)


def _note(r: Result) -> str:
    if r.status == "skipped":
        return r.reason or ""
    if r.status in ("wrong", "OOM", "error"):
        return (r.reason or "")[:120]
    return r.note


def by_kind(results: list[Result]) -> list[list[Result]]:
    """The results split into logits and fused-linear runs (their rate columns differ)."""
    kinds = [[r for r in results if not r.fused_linear], [r for r in results if r.fused_linear]]
    return [k for k in kinds if k]


def text_table(results: list[Result]) -> str:
    header, rows = table_rows(results)
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]

    # Notes are long and last: they are not padded.
    def line(cells):
        padded = (c.ljust(w) for c, w in zip(cells[:-1], widths[:-1], strict=True))
        return "  ".join(padded) + "  " + cells[-1]

    out = [line(header), "  ".join("-" * w for w in widths[:-1]) + "  -----"]
    out += [line(r).rstrip() for r in rows]
    return "\n".join(out)


def markdown_table(results: list[Result]) -> str:
    header, rows = table_rows(results)
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |")
    return "\n".join(out)


def title(meta: dict, results: list[Result]) -> str:
    """One line on what was run where, and the ceilings the floor is taken from."""
    first = results[0] if results else None
    parts = [meta.get("device_name", "?")]
    if first is not None:
        same = {f: getattr(first, f) for f in _CASE_FIELDS if f not in _varying(results)}
        if "divergence" in same:
            parts.append(same["divergence"])
        if same.get("fused_linear") is not None:
            parts.append("FusedLinear (hidden states in)" if same["fused_linear"] else "logits")
        if same.get("teacher") == "topk":  # K and the tail are columns where they vary
            parts.append(topk_label(same.get("topk"), same.get("topk_tail", "none")))
        shape = " ".join(
            f"{k}={same[f]}"
            for f, k in (("tokens", "N"), ("vocab", "V"), ("hidden", "H"))
            if same.get(f) is not None
        )
        if shape:
            parts.append(shape)
        if "dtype" in same:
            parts.append(same["dtype"])
        if "temperature" in same:
            parts.append(f"T={same['temperature']:g}")
    bw = meta.get("copy_GBps")
    ceilings = f"copy bandwidth {bw:.0f} GB/s" if bw else ""
    flops = meta.get("matmul_TFLOPs") or {}
    if flops:
        ceilings += ", matmul " + ", ".join(f"{fmt_rate(v)} TFLOP/s {k}" for k, v in flops.items())
    return " | ".join(parts) + (f"  ({ceilings}, measured in this run)" if ceilings else "")


LEGEND = (
    "median: of the timed calls; spread: half the interquartile range, as % of the median. "
    "GB/s: the floor's bytes (inputs read once, gradient written once: design.md §3; a "
    "top-k teacher read as its K pairs: §4) over the median; TFLOP/s for fused linear (its "
    "matmuls). % floor: floor time at the copy bandwidth (matmul rate) measured in this run "
    "over the median. peak mem: allocated beyond the inputs during one call, outputs "
    "included. vs eager, vs compile: torch-eager's, torch-compile's median over this one; x "
    "matmuls: this median over the bare matmuls'. Every row was checked against the float64 "
    "reference before timing, but the baselines whose notes say 'not checked'."
)


# --- JSON --------------------------------------------------------------------------------


def to_json(meta: dict, results: list[Result]) -> dict:
    return {"schema": SCHEMA, "meta": meta, "results": [r.to_json() for r in results]}


def write_json(path: str, meta: dict, results: list[Result]) -> None:
    """Atomically: written beside ``path``, then renamed over it, so a run stopped at any
    moment leaves the previous complete file (the command line rewrites it after each
    case)."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=folder)
    try:
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp's 0600 otherwise
        with os.fdopen(fd, "w") as f:
            json.dump(to_json(meta, results), f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_json(paths: list[str]) -> tuple[dict, list[Result]]:
    """Results of one or more JSON files (as written by --json), merged: the meta of the
    first, with the matmul rates and commands of all."""
    names = {f.name for f in fields(Result)}
    meta, results = {}, []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        this = data.get("meta", {})
        if not meta:
            meta = dict(this)
            meta["matmul_TFLOPs"] = dict(meta.get("matmul_TFLOPs") or {})
            meta["commands"] = []
        meta["matmul_TFLOPs"].update(this.get("matmul_TFLOPs") or {})
        if this.get("command"):
            meta["commands"].append(this["command"])
        for row in data["results"]:
            results.append(Result(**{k: v for k, v in row.items() if k in names}))
    return meta, results


def markdown_report(meta: dict, results: list[Result]) -> str:
    """A markdown page: the environment, the table, how to read it."""
    lines = ["# fastkd benchmark", ""]
    for key in ("device_name", "torch", "triton", "fastkd", "liger_kernel", "date"):
        if meta.get(key) is not None:
            lines.append(f"- {key}: `{meta[key]}`")
    for command in meta.get("commands") or [meta.get("command")]:
        if command:
            lines.append(f"- command: `{command}`")
    lines += ["", title(meta, results), ""]
    groups: dict[tuple, list[Result]] = {}
    for r in results:
        key = (r.fused_linear, r.divergence, r.teacher, r.topk, r.topk_tail)
        groups.setdefault(key, []).append(r)
    for (fused, divergence, teacher, k, tail), rows in groups.items():
        heading = f"## {divergence}, {'FusedLinearKDLoss' if fused else 'KDLoss (logits)'}"
        if teacher == "topk":
            heading += f", {topk_label(k, tail)}"
        lines += [heading, "", markdown_table(rows), ""]
    lines += [LEGEND, ""]
    return "\n".join(lines)
