"""``python -m fastkd.bench``: the command line (options, defaults per device, the run)."""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import itertools
import platform
import sys
import time

import torch
from tqdm import tqdm

import fastkd
from fastkd._config import TOPK_TAILS

from . import harness, implementations, measure, report
from .cases import DTYPE_ALIASES, DTYPES, TEACHERS, Case
from .implementations import MODES

# Default shapes: real ones on a GPU (design.md §3's floor example), small on a CPU so the
# default run ends in about a minute on two cores, tiny with --quick (CI).
# K of a top-k teacher: vLLM's and the caches' range (20-1024); an API gives at most 20.
DEFAULTS = {
    "cuda": dict(tokens=[8192], vocab=[128256], dtype=["bfloat16"], hidden=4096, topk=[64]),
    "cpu": dict(tokens=[1024], vocab=[32000], dtype=["float32"], hidden=512, topk=[64]),
    "quick": dict(tokens=[64], vocab=[512], hidden=32, topk=[20]),
}

EPILOG = """\
examples:
  python -m fastkd.bench                                   # defaults for this device
  python -m fastkd.bench --divergence forward_kl,jsd --vocab 32000,128256,256000
  python -m fastkd.bench --fused-linear --hidden 2048 --teacher-hidden 4096
  python -m fastkd.bench --teacher topk --topk 20,64,1024 --topk-tail bucket
  python -m fastkd.bench --teacher topk --fused-linear --hidden 1024   # vs its bare matmuls
  python -m fastkd.bench --impl 'fastkd-*,torch-eager' --json out.json --plot out.png
  python -m fastkd.bench --from-json a.json b.json --markdown out.md --plot out.png
  python -m fastkd.bench --list                            # what runs here, and what not
"""


def _list(kind):
    def parse(text: str):
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError("empty list")
        return [kind(t) for t in items]

    return parse


def _size(text: str) -> int:
    # No "32k" shorthand: 32k means 32000 for a vocabulary and 32768 for a row count.
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"sizes are whole numbers, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"sizes must be > 0, got {text!r}")
    return value


def _dtype(text: str) -> str:
    name = DTYPE_ALIASES.get(text, text)
    if name not in DTYPES:
        raise argparse.ArgumentTypeError(f"dtype must be one of {sorted(DTYPES)}, got {text!r}")
    return name


def _mode(text: str) -> str:
    if text not in MODES:
        raise argparse.ArgumentTypeError(f"mode must be one of {list(MODES)}, got {text!r}")
    return text


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fastkd.bench",
        description="Time and check fastkd's distillation losses against plain PyTorch (eager "
        "and torch.compile) and Liger-Kernel on this machine. Lists are comma-separated.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--divergence",
        type=_list(str),
        default=["forward_kl"],
        help="divergences (default forward_kl)",
    )
    p.add_argument("--tokens", "-N", type=_list(_size), help="rows N (default: per device)")
    p.add_argument("--vocab", "-V", type=_list(_size), help="vocabulary sizes V")
    p.add_argument("--dtype", type=_list(_dtype), help="float32, bfloat16, float16")
    p.add_argument("--temperature", type=float, default=1.0, help="T (default 1; T^2 on)")
    p.add_argument("--beta", type=float, default=0.5, help="jsd weight (default 0.5)")
    p.add_argument("--alpha", type=float, default=0.1, help="skew KL weight (default 0.1)")
    p.add_argument(
        "--sweep",
        choices=("grid", "star"),
        default="grid",
        help="grid: every N with every V; star: every V at the first N, every N at the first V",
    )
    p.add_argument(
        "--mode", type=_list(_mode), default=list(MODES), help="fwd+bwd and/or fwd (default both)"
    )
    p.add_argument(
        "--impl",
        type=_list(str),
        help="implementations to run: names or shell patterns ('fastkd-*')",
    )
    p.add_argument(
        "--fused-linear",
        action="store_true",
        help="FusedLinearKDLoss from hidden states and LM-head weights",
    )
    p.add_argument("--hidden", type=_size, help="student hidden size H (with --fused-linear)")
    p.add_argument(
        "--teacher-hidden",
        type=_size,
        help="teacher hidden size (default H; with --teacher topk, the dense baseline's)",
    )
    p.add_argument(
        "--teacher",
        choices=TEACHERS,
        default="dense",
        help="dense: the teacher's full logits (default); topk: a fastkd.TopKTeacher of its "
        "top-K log-probabilities (made once per case from random logits, not timed)",
    )
    p.add_argument("--topk", type=_list(_size), help="K with --teacher topk (lists sweep)")
    p.add_argument(
        "--topk-tail",
        choices=TOPK_TAILS,
        default="none",
        help="with --teacher topk: none (default), or the tail bucket of the mass outside K",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if present")
    p.add_argument("--quick", action="store_true", help="tiny sizes and few repeats (CI)")
    p.add_argument("--seed", type=int, default=0, help="random inputs' seed")
    p.add_argument(
        "--time-limit",
        type=float,
        metavar="SECONDS",
        help="stop starting new measurements after this long; the rest are "
        "reported as skipped (the run still writes its table and files)",
    )
    p.add_argument("--json", metavar="PATH", help="write every result as JSON")
    p.add_argument("--markdown", metavar="PATH", help="write the table as a markdown page")
    p.add_argument(
        "--plot", metavar="PATH", help="time and peak memory vs V and vs N (needs matplotlib)"
    )
    p.add_argument(
        "--from-json",
        nargs="+",
        metavar="JSON",
        help="no run: report, merge and plot earlier --json files",
    )
    p.add_argument("--list", action="store_true", help="list implementations and exit")
    return p


def _device(args) -> str:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but torch sees no CUDA device")
    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


# make_cases's options, named as the command line's: _cases passes them through.
CASE_OPTIONS = (
    "divergence", "tokens", "vocab", "dtype", "fused_linear", "hidden", "teacher_hidden",
    "teacher", "topk", "topk_tail", "quick", "sweep", "temperature", "beta", "alpha",
)  # fmt: skip


def make_cases(
    device: str,
    divergence: list[str],
    *,
    tokens: list[int] | None = None,
    vocab: list[int] | None = None,
    dtype: list[str] | None = None,
    fused_linear: bool = False,
    hidden: int | None = None,
    teacher_hidden: int | None = None,
    teacher: str = "dense",
    topk: list[int] | None = None,
    topk_tail: str = "none",
    quick: bool = False,
    sweep: str = "grid",
    **loss_options,
) -> list[Case]:
    """The cases of one run (also the pytest-benchmark suites'). Lists sweep; what is not
    given takes the device's default (:data:`DEFAULTS`). ``loss_options``: temperature, beta,
    alpha. ``teacher="topk"``: a top-K teacher for each K of ``topk``, with ``topk_tail``.

    grid: every N with every V; star: every V at the first N, every N at the first V. Shapes
    outermost: under --time-limit the first shape is measured for every K and divergence.
    """
    defaults = dict(DEFAULTS[device])
    if quick:
        defaults.update(DEFAULTS["quick"])
    tokens = tokens or defaults["tokens"]
    vocab = vocab or defaults["vocab"]
    hidden = hidden or defaults["hidden"]
    if sweep == "grid":
        shapes = list(itertools.product(tokens, vocab))
    else:
        shapes = [(tokens[0], v) for v in vocab] + [(n, vocab[0]) for n in tokens[1:]]
    for name in divergence:
        if name not in fastkd.DIVERGENCES:
            raise SystemExit(
                f"error: --divergence must name one of {sorted(fastkd.DIVERGENCES)}, got {name!r}"
            )
    sizes = dict(hidden=hidden, teacher_hidden=teacher_hidden or hidden) if fused_linear else {}
    teachers = _teachers(teacher, topk, topk_tail, defaults["topk"], shapes)
    return [
        Case(div, n, v, dt, device, fused_linear=fused_linear, **sizes, **kind, **loss_options)
        for n, v in shapes
        for dt in dtype or defaults["dtype"]
        for kind in teachers
        for div in divergence
    ]


def _teachers(
    teacher: str, ks: list[int] | None, tail: str, default_ks: list[int], shapes
) -> list[dict]:
    """The teacher fields of the cases: one dense teacher, or one top-K teacher per K."""
    if teacher == "dense":
        if ks or tail != "none":
            raise SystemExit("error: --topk and --topk-tail need --teacher topk")
        return [{}]
    if teacher not in TEACHERS:
        raise SystemExit(f"error: --teacher must be one of {list(TEACHERS)}, got {teacher!r}")
    ks = ks or default_ks
    smallest = min(v for _, v in shapes)
    if max(ks) > smallest:
        raise SystemExit(
            f"error: --topk {max(ks)} is more than the vocabulary size --vocab {smallest}"
        )
    return [dict(teacher="topk", topk=k, topk_tail=tail) for k in ks]


def _cases(args, device: str) -> list[Case]:
    return make_cases(device, **{name: getattr(args, name) for name in CASE_OPTIONS})


def _selected(cands, patterns):
    if not patterns:
        return cands
    return [c for c in cands if any(fnmatch.fnmatchcase(c.name, p) for p in patterns)]


def _versions() -> dict:
    out = {"fastkd": fastkd.__version__, "torch": torch.__version__}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    out["liger_kernel"] = implementations.liger_version()
    return out


def _meta(args, device: str, argv: list[str], ceilings: harness.Ceilings) -> dict:
    meta = {
        "device": device,
        "device_name": measure.device_name(device),
        **_versions(),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python -m fastkd.bench", *argv]),
        "triton_interpret": implementations.interpreting(),
        "copy_GBps": ceilings.copy_bytes_per_s / 1e9,
        "matmul_TFLOPs": {k: v / 1e12 for k, v in ceilings.matmul_flops_per_s.items()},
        "timing_plan": vars(measure.plan_for(device, args.quick)),
        "tolerances": {
            f"{'fused' if k[0] else 'logits'}/{k[1]}": v for k, v in harness.TOLERANCES.items()
        },
    }
    return meta


def _emit(args, meta: dict, results: list[harness.Result]) -> None:
    for kind in report.by_kind(results):
        print(report.title(meta, kind))
        print(report.text_table(kind))
        print()
    print(report.LEGEND)
    if args.json:
        report.write_json(args.json, meta, results)
        print(f"wrote {args.json}")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(report.markdown_report(meta, results))
        print(f"wrote {args.markdown}")
    if args.plot:
        from . import plot

        try:
            for path in plot.plot(results, args.plot, meta.get("device_name", "")):
                print(f"wrote {path}")
        except ImportError:
            print("--plot needs matplotlib (pip install matplotlib); no plot written")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    if args.from_json:
        meta, results = report.read_json(args.from_json)
        harness.add_speedups(results)
        _emit(args, meta, results)
        return 0

    device = _device(args)
    all_cases = _cases(args, device)
    modes = tuple(m for m in MODES if m in args.mode)

    if args.list:
        for case in all_cases[:1]:
            for c in _selected(implementations.candidates(case), args.impl):
                state = "runs" if c.skip is None else f"skipped: {c.skip}"
                print(f"{c.name:28s} {state}" + (f" ({c.note})" if c.note else ""))
        return 0

    deadline = None if args.time_limit is None else time.monotonic() + args.time_limit
    torch.manual_seed(args.seed)
    ceilings = harness.Ceilings(measure.copy_bandwidth(device, args.quick))
    if args.fused_linear:
        for dtype in dict.fromkeys(c.dtype for c in all_cases):
            ceilings.matmul_flops_per_s[dtype] = measure.matmul_rate(
                device, DTYPES[dtype], args.quick
            )
    plan = measure.plan_for(device, args.quick)

    # Two passes: every case's implementations that do not compile, then those that go
    # through torch.compile (tens of seconds each on a GPU), so that a time limit or a hard
    # stop cuts the compiled rows first. The table keeps the case order.
    passes = ([], [])
    for index, case in enumerate(all_cases):
        cands = _selected(implementations.candidates(case), args.impl)
        chosen = [c for c in cands if c.skip is None]
        skipped = [c for c in cands if c.skip is not None]
        for last, plan_pass in enumerate(passes):
            mine = [c for c in chosen if c.compiles == bool(last)]
            not_run = [c for c in skipped if c.compiles == bool(last)]
            if mine or not_run:
                plan_pass.append((index, case, mine, not_run))
    plans = passes[0] + passes[1]
    total = sum(len([m for m in modes if m in c.modes]) for *_, chosen, _ in plans for c in chosen)

    meta = _meta(args, device, argv, ceilings)
    done: list[tuple[int, list[harness.Result]]] = []

    def results_so_far() -> list[harness.Result]:
        ordered = sorted(done, key=lambda item: item[0])  # stable: pass order within a case
        out = [r for _, rs in ordered for r in rs]
        harness.add_speedups(out)
        return out

    interrupted = False
    # disable=None: the bar is shown on a terminal, silent in logs and pipes.
    with tqdm(total=total, disable=None, unit="run", dynamic_ncols=True, file=sys.stderr) as bar:
        step = _stepper(bar)
        try:
            for index, case, chosen, skipped in plans:
                done.append(
                    (
                        index,
                        harness.run_case(
                            case,
                            chosen,
                            skipped,
                            modes,
                            plan,
                            ceilings,
                            args.seed,
                            progress=lambda label, case=case: step(
                                f"N={case.tokens} V={case.vocab} {label}"
                            ),
                            deadline=deadline,
                        ),
                    )
                )
                if args.json:
                    # After every case, atomically: a run stopped hard keeps what it measured.
                    report.write_json(args.json, meta, results_so_far())
        except KeyboardInterrupt:
            # SIGINT (timeout -s INT, Ctrl-C): report what was measured, then fail.
            interrupted = True
            print("interrupted: reporting the cases measured so far", file=sys.stderr)
        bar.update(bar.total - bar.n)
    _emit(args, meta, results_so_far())
    return 130 if interrupted else 0


def _stepper(bar: tqdm):
    """Progress callback: each new pair's label first advances the bar past the previous
    pair (the last one is counted at the end of the run)."""
    started = False

    def step(label: str) -> None:
        nonlocal started
        if started:
            bar.update(1)
        started = True
        bar.set_description(label)

    return step


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
