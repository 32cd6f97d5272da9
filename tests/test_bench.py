"""The benchmark harness and CLI (fastkd.bench): tiny sizes, CPU, a few seconds.

The timings themselves are not asserted (they are the benchmark's output, not a test
oracle); what is asserted is that every field is there and consistent, that the floors are
the design.md §3 byte counts, and that a wrong implementation is caught before timing.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fastkd
from fastkd import _backends
from fastkd.bench import cli, harness, implementations, measure, report
from fastkd.bench.cases import Case
from fastkd.bench.formulas import fused_linear_formula, kd_formula, topk_formula
from fastkd.bench.implementations import FWD, FWD_BWD, MATMULS, Candidate, candidates
from fastkd.reference import kd_loss_reference
from fastkd.topk_reference import topk_loss_reference

ROOT = Path(__file__).resolve().parents[1]
TINY_PLAN = measure.TimingPlan(0.0, 0, 0.0, 2, 2)
OPTIONS = dict(divergence="forward_kl", temperature=2.0, beta=0.5, alpha=0.1)


def _case(tokens=300, vocab=96, **kw) -> Case:
    # 300 rows > the check's period of 251: the periodic check inputs wrap around.
    return Case(tokens=tokens, vocab=vocab, dtype="float32", device="cpu", **OPTIONS, **kw)


def _run(case: Case, cands: list[Candidate], modes=(FWD_BWD, FWD), deadline=None):
    ceilings = harness.Ceilings(copy_bytes_per_s=1e10)
    return harness.run_case(case, cands, [], modes, TINY_PLAN, ceilings, 0, deadline=deadline)


# --- deliberately wrong implementations ------------------------------------------------


class _GradTampered(torch.autograd.Function):
    """The right loss; its gradient passed through ``tamper`` on the way back."""

    @staticmethod
    def forward(ctx, student, teacher, tamper):
        with torch.enable_grad():
            s = student.detach().requires_grad_()
            loss = kd_formula(s, teacher, **OPTIONS)
            (grad,) = torch.autograd.grad(loss, s)
        ctx.save_for_backward(tamper(grad))
        return loss.detach()

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad * grad_output, None, None


def _candidate(name, fn) -> Candidate:
    return Candidate(name, "test", lambda case: fn)


def _zero_rows_past_period(grad):
    out = grad.clone()
    out[251:] = 0  # right on the first 251 rows, wrong after: caught only at full size
    return out


def _nan_column(grad):
    return grad.index_fill(1, torch.tensor([3]), math.nan)


def _raise(exc):
    def fn(student, teacher):
        raise exc

    return fn


def test_harness_catches_wrong_results_and_keeps_going():
    right = _candidate("right", lambda s, t: kd_formula(s, t, **OPTIONS))
    wrong_loss = _candidate("wrong-loss", lambda s, t: kd_formula(s, t, **OPTIONS) * 1.001)
    wrong_grad = _candidate(
        "wrong-grad", lambda s, t: _GradTampered.apply(s, t, lambda g: g * 1.01)
    )
    wrong_rows = _candidate(
        "wrong-rows", lambda s, t: _GradTampered.apply(s, t, _zero_rows_past_period)
    )
    nan_grad = _candidate("nan-grad", lambda s, t: _GradTampered.apply(s, t, _nan_column))
    oom = _candidate("oom", _raise(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate")))
    broken = _candidate("broken", _raise(RuntimeError("kernel exploded")))
    cands = [right, wrong_loss, wrong_grad, wrong_rows, nan_grad, oom, broken]

    results = {(r.implementation, r.mode): r for r in _run(_case(), cands)}

    assert results["right", FWD_BWD].status == "ok"
    assert results["right", FWD_BWD].grad_rel_err < 1e-6
    assert results["right", FWD].status == "ok"
    assert results["wrong-loss", FWD_BWD].status == "wrong"
    assert results["wrong-loss", FWD].status == "wrong"
    # The right loss with a wrong gradient: only the backward check can see it.
    assert results["wrong-grad", FWD].status == "ok"
    assert results["wrong-grad", FWD_BWD].status == "wrong"
    assert 5e-3 < results["wrong-grad", FWD_BWD].grad_rel_err < 2e-2
    assert results["wrong-rows", FWD_BWD].status == "wrong"
    assert results["nan-grad", FWD_BWD].status == "wrong"
    assert results["nan-grad", FWD_BWD].grad_rel_err == math.inf
    for name in ("wrong-loss", "wrong-grad", "wrong-rows", "nan-grad"):
        r = results[name, FWD_BWD]
        assert r.median_ms is None and r.reps == 0, "a wrong implementation must not be timed"
        assert r.reason.startswith("check failed")
    assert results["oom", FWD_BWD].status == "OOM"
    assert results["broken", FWD].status == "error"
    assert "kernel exploded" in results["broken", FWD].reason


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient scaled on the way back."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def test_harness_checks_the_weight_gradient_of_fused_linear():
    fused = dict(fused_linear=True, hidden=16, teacher_hidden=24)
    case = _case(tokens=300, vocab=64, **fused)

    def right(hs, ws, ht, wt):
        return fused_linear_formula(hs, ws, ht, wt, **OPTIONS)

    def wrong_weight_grad(hs, ws, ht, wt):
        return fused_linear_formula(hs, _ScaleGrad.apply(ws, 1.01), ht, wt, **OPTIONS)

    cands = [_candidate("right", right), _candidate("wrong-weight", wrong_weight_grad)]
    results = {(r.implementation, r.mode): r for r in _run(case, cands, modes=(FWD_BWD,))}
    assert results["right", FWD_BWD].status == "ok"
    assert results["right", FWD_BWD].grad_rel_err < 1e-5
    assert results["wrong-weight", FWD_BWD].status == "wrong"
    assert 5e-3 < results["wrong-weight", FWD_BWD].grad_rel_err < 2e-2


def test_time_limit_skips_the_rest():
    right = _candidate("right", lambda s, t: kd_formula(s, t, **OPTIONS))
    results = _run(_case(), [right], deadline=time.monotonic() - 1)
    assert [r.status for r in results] == ["skipped", "skipped"]
    assert all(r.reason == "time limit reached" for r in results)


def test_floors_are_the_design_byte_counts():
    case = Case("forward_kl", 8192, 128256, "bfloat16", "cpu")
    result = harness._result(case, _candidate("x", None), FWD_BWD, "ok", median_ms=2.0)
    harness.add_floors(result, case, harness.Ceilings(copy_bytes_per_s=4.3e12))
    assert result.floor_bytes == 6 * 8192 * 128256  # design.md §3: 6.3 GB, 1.47 ms
    assert result.floor_ms == pytest.approx(1.466, abs=1e-3)
    assert result.pct_of_floor == pytest.approx(100 * result.floor_ms / 2.0)
    assert result.achieved_GBps == pytest.approx(6 * 8192 * 128256 / 2e-3 / 1e9)


def test_triton_on_cpu_is_skipped_with_a_reason_unless_interpreting(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    by_name = {c.name: c for c in candidates(_case())}
    assert "fastkd-torch" in by_name and by_name["fastkd-torch"].skip is None
    assert "TRITON_INTERPRET" in by_name["fastkd-triton"].skip
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    by_name = {c.name: c for c in candidates(_case())}
    assert by_name["fastkd-triton"].skip is None
    assert "interpreter" in by_name["fastkd-triton"].note


def _bench(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    # One thread: on a tiny case two threads only add wake-up latency.
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "fastkd.bench", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_quick_run_writes_a_complete_json(tmp_path):
    out = tmp_path / "bench.json"
    args = ["--quick", "--device", "cpu", "--impl", "fastkd-torch,torch-eager", "--json"]
    proc = _bench(*args, str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "implementation" in proc.stdout and "torch-eager" in proc.stdout

    data = json.loads(out.read_text())
    meta = data["meta"]
    assert meta["device"] == "cpu" and meta["copy_GBps"] > 0
    for key in ("device_name", "torch", "fastkd", "date", "command", "timing_plan"):
        assert meta[key]
    rows = {(r["implementation"], r["mode"]): r for r in data["results"]}
    assert set(rows) == {(i, m) for i in ("fastkd-torch", "torch-eager") for m in (FWD_BWD, FWD)}
    N, V = cli.DEFAULTS["quick"]["tokens"][0], cli.DEFAULTS["quick"]["vocab"][0]
    for (impl, mode), r in rows.items():
        assert r["status"] == "ok", r
        assert (r["tokens"], r["vocab"], r["dtype"]) == (N, V, "float32")
        assert r["reps"] >= 3
        assert 0 < r["min_ms"] <= r["p25_ms"] <= r["median_ms"] <= r["p75_ms"] <= r["max_ms"]
        assert r["spread_pct"] >= 0
        assert r["floor_bytes"] == (3 if mode == FWD_BWD else 2) * N * V * 4
        assert r["achieved_GBps"] == pytest.approx(r["floor_bytes"] / r["median_ms"] / 1e6)
        assert r["pct_of_floor"] == pytest.approx(100 * r["floor_ms"] / r["median_ms"])
        assert r["peak_mem_bytes"] is None or r["peak_mem_bytes"] >= 0
        assert r["loss_rel_err"] <= 1e-4
        assert (r["grad_rel_err"] is not None) == (mode == FWD_BWD)
        eager = rows["torch-eager", mode]["median_ms"]
        assert r["speedup_vs_eager"] == pytest.approx(eager / r["median_ms"])


# A run killed (SIGKILL, the device tool's limit) when the third case starts: no cleanup.
_KILLED_AT_THIRD_CASE = """
import os, sys
from fastkd.bench import cli, harness
run_case, calls = harness.run_case, []
def dying(*args, **kwargs):
    calls.append(1)
    if len(calls) == 3:
        os._exit(137)
    return run_case(*args, **kwargs)
harness.run_case = dying
sys.exit(cli.main(sys.argv[1:]))
"""

_THREE_CASES = ["--quick", "--device", "cpu", "--impl", "torch-eager", "--mode", FWD]
_THREE_CASES += ["--vocab", "64,96,128"]


def _json_rows(path: Path) -> dict:
    data = json.loads(path.read_text())  # valid JSON, whole
    assert data["schema"] == report.SCHEMA and data["meta"]["device"] == "cpu"
    return {(r["vocab"], r["implementation"]): r for r in data["results"]}


def test_json_written_after_each_case_survives_a_hard_stop(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_AT_THIRD_CASE, *_THREE_CASES, "--json", str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 137, proc.stderr
    rows = _json_rows(out)
    assert set(rows) == {(64, "torch-eager"), (96, "torch-eager")}
    assert all(r["status"] == "ok" for r in rows.values())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json"]  # no temporary left


def test_sigint_reports_what_was_measured_and_fails(tmp_path, monkeypatch, capsys):
    run_case, calls = harness.run_case, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return run_case(*args, **kwargs)

    monkeypatch.setattr(harness, "run_case", interrupted)
    out = tmp_path / "bench.json"
    assert cli.main([*_THREE_CASES, "--json", str(out)]) == 130
    assert set(_json_rows(out)) == {(64, "torch-eager"), (96, "torch-eager")}
    assert "torch-eager" in capsys.readouterr().out  # the table of what was measured


def test_compiled_implementations_run_in_a_last_pass(tmp_path, monkeypatch, capsys):
    order = []

    def record(case, chosen, skipped, modes, *args, **kwargs):
        order.append((case.vocab, [c.name for c in chosen]))
        return [
            harness._result(case, c, m, "skipped", reason="recorded") for c in chosen for m in modes
        ]

    monkeypatch.setattr(harness, "run_case", record)
    args = ["--quick", "--device", "cpu", "--impl", "torch-eager,torch-compile", "--mode", FWD]
    out = tmp_path / "bench.json"
    assert cli.main([*args, "--vocab", "64,96", "--json", str(out)]) == 0
    assert order == [
        (64, ["torch-eager"]),
        (96, ["torch-eager"]),
        (64, ["torch-compile"]),
        (96, ["torch-compile"]),
    ]
    # The files keep the case order: each case's rows together.
    rows = [(r["vocab"], r["implementation"]) for r in json.loads(out.read_text())["results"]]
    assert rows == [(64, "torch-eager"), (64, "torch-compile")] + [
        (96, "torch-eager"),
        (96, "torch-compile"),
    ]


def test_report_from_json_table_markdown_and_plot(tmp_path, capsys):
    right = _candidate("right", lambda s, t: kd_formula(s, t, **OPTIONS))
    eager = Candidate("torch-eager", "torch", lambda case: lambda s, t: kd_formula(s, t, **OPTIONS))
    results = []
    for vocab in (64, 128):
        results += _run(_case(tokens=32, vocab=vocab), [right, eager], modes=(FWD_BWD,))
    path = tmp_path / "r.json"
    report.write_json(str(path), {"device_name": "test cpu"}, results)

    args = ["--from-json", str(path), "--markdown", str(tmp_path / "r.md")]
    try:
        import matplotlib  # noqa: F401

        args += ["--plot", str(tmp_path / "r.png")]
    except ImportError:
        print("matplotlib is not installed: the plot part of this test is not run")
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "right" in printed and "1.00x" in printed
    markdown = (tmp_path / "r.md").read_text()
    assert "| V | implementation | mode |" in markdown
    if "--plot" in args:
        assert (tmp_path / "r.png").stat().st_size > 10_000


def test_fused_linear_quick_reports_fastkd(capsys):
    args = "--quick --device cpu --fused-linear --mode fwd+bwd --impl fastkd-torch,torch-eager"
    assert cli.main(args.split()) == 0
    printed = capsys.readouterr().out
    for name in ("fastkd-torch", "torch-eager"):
        row = next(line for line in printed.splitlines() if line.startswith(name))
        assert " ms " in row, row


# --- the toolkit: the formula, the clocks, peak memory ---------------------------------


@pytest.mark.parametrize("divergence", sorted(fastkd.DIVERGENCES))
def test_formula_is_the_reference(divergence):
    """kd_formula (what every benchmark compares with) is fastkd's loss, reduction="mean":
    ignored rows, the CE term and the T^2 switch included."""
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(40, 33, generator=gen, dtype=torch.float64) * 3
    t = torch.randn(40, 33, generator=gen, dtype=torch.float64) * 3
    labels = torch.randint(0, 33, (40,), generator=gen)
    labels[::3] = -100
    options = dict(divergence=divergence, temperature=1.7, beta=0.3, alpha=0.2)
    for extra in (
        dict(),
        dict(labels=labels),
        dict(labels=labels, kd_weight=0.4, ce_weight=0.6, scale_by_temperature_squared=False),
    ):
        ours = kd_formula(s, t, **options, **extra)
        ref, _, _ = kd_loss_reference(s, t, **options, **extra)
        assert float(ours) == pytest.approx(float(ref), rel=1e-5), extra
    all_ignored = torch.full_like(labels, -100)
    assert float(kd_formula(s, t, all_ignored, ce_weight=1.0, **options)) == 0.0


def test_peak_memory_and_time_call():
    nbytes = 64 << 20
    with measure.PeakMemory("cpu") as mem:
        ms, x = measure.time_call(lambda: torch.ones(nbytes // 4), "cpu")
    assert ms > 0 and x.numel() == nbytes // 4
    if mem.bytes is None:
        pytest.skip("no resettable peak RSS here (/proc/self/clear_refs)")
    assert mem.bytes >= 0.9 * nbytes  # the tensor is written, so its pages are resident
    assert mem.bytes == mem.peak - mem.before and mem.before > 0


# --- a top-k teacher (design.md §4) ------------------------------------------------------


def _topk_pairs(gen, rows, vocab, k, temperature, dtype=torch.float64):
    teacher = torch.randn(rows, vocab, generator=gen, dtype=dtype) * 3
    return fastkd.topk_logprobs(teacher, k, temperature=temperature)


@pytest.mark.parametrize("divergence", sorted(fastkd.DIVERGENCES))
def test_topk_formula_is_the_reference(divergence):
    """topk_formula (what the top-k benchmark times as torch-eager and torch-compile) is
    fastkd.topk_loss_reference, reduction="mean", in float64: loss and student gradient, for
    every normalisation, the tail, teacher_temperature, ignored rows and the CE term."""
    gen = torch.Generator().manual_seed(1)
    s = torch.randn(40, 97, generator=gen, dtype=torch.float64) * 3
    T = 1.7
    pairs = _topk_pairs(gen, 40, 97, 13, T)
    labels = torch.randint(0, 97, (40,), generator=gen)
    labels[::4] = -100
    options = dict(divergence=divergence, temperature=T, beta=0.3, alpha=0.2)
    for extra in (
        dict(),
        dict(topk_tail="bucket"),
        dict(teacher_normalization="renormalize"),
        dict(teacher_normalization="renormalize", student_normalization="topk"),
        dict(teacher_normalization="renormalize", teacher_temperature=1.1),
        dict(topk_tail="bucket", labels=labels, ce_weight=0.6, kd_weight=0.4),
        dict(labels=labels, scale_by_temperature_squared=False),
    ):
        ours_s = s.clone().requires_grad_()
        ref_s = s.clone().requires_grad_()
        ours = topk_formula(ours_s, pairs.token_ids, pairs.logprobs, **options, **extra)
        ref, _, _ = topk_loss_reference(ref_s, pairs, **options, **extra)
        (ours_grad,) = torch.autograd.grad(ours, ours_s)
        (ref_grad,) = torch.autograd.grad(ref, ref_s)
        assert float(ours.detach()) == pytest.approx(float(ref.detach()), rel=1e-12), extra
        assert float((ours_grad - ref_grad).norm() / ref_grad.norm()) < 1e-12, extra


def _topk_case(tail="none", **kw) -> Case:
    return _case(teacher="topk", topk=7, topk_tail=tail, **kw)


def test_harness_checks_a_topk_case_against_the_topk_reference():
    """The top-k case's check is the top-k reference: the formula passes, the same formula
    without the tail the case asks for is caught (its loss and gradient are off)."""

    def formula(tail):
        def loss(s, teacher):
            return topk_formula(s, teacher.token_ids, teacher.logprobs, **OPTIONS, topk_tail=tail)

        return loss

    cands = [_candidate("right", formula("bucket")), _candidate("no-tail", formula("none"))]
    results = {(r.implementation, r.mode): r for r in _run(_topk_case("bucket"), cands)}
    for mode in (FWD_BWD, FWD):
        right = results["right", mode]
        assert right.status == "ok", right
        assert right.loss_rel_err < 1e-5
        assert (right.teacher, right.topk, right.topk_tail) == ("topk", 7, "bucket")
        assert results["no-tail", mode].status == "wrong"
    assert results["right", FWD_BWD].grad_rel_err < 1e-5
    # design.md §4's floor: read the student and the K pairs, write the gradient.
    N, V = 300, 96
    assert results["right", FWD_BWD].floor_bytes == 2 * N * V * 4 + N * 7 * (8 + 4)
    assert results["right", FWD].floor_bytes == N * V * 4 + N * 7 * (8 + 4)


def _quick_json(tmp_path, *args: str) -> list[dict]:
    out = tmp_path / "bench.json"
    assert cli.main(["--quick", "--device", "cpu", *args, "--json", str(out)]) == 0
    return json.loads(out.read_text())["results"]


def test_cli_topk_logits_quick_run(tmp_path, capsys):
    impls = "fastkd-torch,torch-eager,liger"
    rows = _quick_json(
        tmp_path, "--teacher", "topk", "--topk", "8,20", "--topk-tail", "bucket", "--impl", impls
    )
    printed = capsys.readouterr().out
    assert "top-k teacher, tail bucket" in printed and "Liger-Kernel has no top-k" in printed
    N, V = cli.DEFAULTS["quick"]["tokens"][0], cli.DEFAULTS["quick"]["vocab"][0]
    by_key = {(r["implementation"], r["mode"], r["topk"]): r for r in rows}
    expected = {(i, m, k) for i in ("fastkd-torch", "torch-eager") for m in (FWD_BWD, FWD)
                for k in (8, 20)}  # fmt: skip
    assert {key for key, r in by_key.items() if r["status"] != "skipped"} == expected
    assert by_key["liger", FWD_BWD, 8]["status"] == "skipped"
    for (impl, mode, k), r in by_key.items():
        assert (r["teacher"], r["topk_tail"], r["tokens"], r["vocab"]) == ("topk", "bucket", N, V)
        if r["status"] == "skipped":
            continue
        assert r["status"] == "ok", r
        assert r["loss_rel_err"] <= 1e-4
        assert (r["grad_rel_err"] is not None) == (mode == FWD_BWD)
        assert mode == FWD or r["grad_rel_err"] <= 1e-4
        assert r["floor_bytes"] == (2 if mode == FWD_BWD else 1) * N * V * 4 + N * k * 12
        eager = by_key["torch-eager", mode, k]["median_ms"]
        assert r["speedup_vs_eager"] == pytest.approx(eager / r["median_ms"])


def _kernel_backends_here() -> list[str]:
    cpu = torch.device("cpu")
    return [b for b in _backends.KERNEL_BACKENDS if _backends.is_available(b, cpu)[0]]


@pytest.mark.parametrize("backend", _kernel_backends_here())
def test_cli_topk_runs_each_available_kernel(tmp_path, backend):
    """Every kernel backend available here (the C++ CPU kernel once built, Triton under its
    interpreter) is benchmarked on a top-k teacher, checked against the reference."""
    skip = implementations._topk_kernels_missing(backend)
    if skip is not None:
        pytest.skip(f"fastkd-{backend}: {skip}")
    args = ["--teacher", "topk", "--topk", "8", "--tokens", "32", "--vocab", "256"]
    rows = _quick_json(tmp_path, *args, "--impl", f"fastkd-{backend}", "--mode", FWD_BWD)
    assert len(rows) == 1
    (r,) = rows
    assert (r["implementation"], r["teacher"], r["topk"]) == (f"fastkd-{backend}", "topk", 8)
    assert r["status"] == "ok", r
    assert r["loss_rel_err"] <= 1e-4 and r["grad_rel_err"] <= 1e-4


def test_cli_topk_fused_linear_against_its_matmuls_and_the_dense_loss(tmp_path):
    impls = f"fastkd-torch,torch-eager,{MATMULS},fastkd-torch-dense"
    args = ["--teacher", "topk", "--fused-linear", "--teacher-hidden", "48", "--mode", FWD_BWD]
    rows = {r["implementation"]: r for r in _quick_json(tmp_path, *args, "--impl", impls)}
    assert set(rows) == {"fastkd-torch", "torch-eager", MATMULS, "fastkd-torch-dense"}
    N, V = cli.DEFAULTS["quick"]["tokens"][0], cli.DEFAULTS["quick"]["vocab"][0]
    H = cli.DEFAULTS["quick"]["hidden"]
    for name, r in rows.items():
        assert r["status"] == "ok", r
        assert (r["teacher"], r["topk"], r["hidden"]) == ("topk", 20, H)
        assert r["x_matmuls"] == pytest.approx(r["median_ms"] / rows[MATMULS]["median_ms"])
    for name in ("fastkd-torch", "torch-eager"):  # checked against the reference
        assert rows[name]["loss_rel_err"] <= 1e-4 and rows[name]["grad_rel_err"] <= 1e-3
        assert rows[name]["floor_flops"] == 2 * N * V * 3 * H  # no teacher matmul
    for name in (MATMULS, "fastkd-torch-dense"):  # baselines: timed, never checked
        assert rows[name]["loss_rel_err"] is None and "not checked" in rows[name]["note"]
    assert rows["fastkd-torch-dense"]["floor_flops"] == 2 * N * V * (3 * H + 48)


def test_bare_matmuls_are_the_three_matmuls():
    """The matmuls baseline's backward is g W and g^T h with its fixed g (float64 here, so
    equal to the products up to rounding), whatever its placeholder loss."""
    gen = torch.Generator().manual_seed(2)
    h = torch.randn(30, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(96, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    g = torch.randn(30, 96, generator=gen, dtype=torch.float64)
    loss = implementations._BareMatmuls.apply(h, w, g)
    grad_h, grad_w = torch.autograd.grad(loss, (h, w))
    torch.testing.assert_close(grad_h, g @ w.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(grad_w, g.T @ h.detach(), rtol=1e-12, atol=0)


def test_topk_list_is_truthful(monkeypatch, capsys):
    """--list names the top-k candidates and why some do not run: Liger, and a kernel
    backend whose top-k kernels are not in this build."""

    def missing(backend):
        raise AttributeError(f"module has no attribute 'topk_row_stats' ({backend})")

    monkeypatch.setattr(_backends, "topk_kernels", missing)
    args = "--quick --device cpu --teacher topk --fused-linear --list"
    assert cli.main(args.split()) == 0
    listed = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "runs" in listed[MATMULS] and "runs" in listed["fastkd-torch"]
    assert "no top-k teacher loss" in listed["liger"]
    if _backends.is_available("cpu", torch.device("cpu"))[0]:
        assert "no top-k kernels in this build" in listed["fastkd-cpu"]
        assert "runs" in listed["fastkd-cpu-dense"]  # the dense kernel needs no top-k one


def test_topk_options_are_checked():
    quick = ["--quick", "--device", "cpu", "--list"]
    with pytest.raises(SystemExit, match="need --teacher topk"):
        cli.main([*quick, "--topk", "8"])
    with pytest.raises(SystemExit, match="more than the vocabulary"):
        cli.main([*quick, "--teacher", "topk", "--topk", "1024", "--vocab", "512"])
