"""benchmarks/expected_times.py (gpu_check.sh's measured over expected) against the figures
docs/performance.md writes down by hand for N = 8192, V = 128256, bf16."""

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("triton")  # the Triton rows' on-chip threshold comes from its launch table

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "expected_times.py"
spec = importlib.util.spec_from_file_location("expected_times", SCRIPT)
expected_times = importlib.util.module_from_spec(spec)
spec.loader.exec_module(expected_times)

N, V = 8192, 128256


@pytest.mark.parametrize(
    "implementation,mode,divergence,gigabytes",
    [
        ("fastkd-triton", "fwd+bwd", "forward_kl", 10.51),
        ("fastkd-cuda-inplace", "fwd+bwd", "reverse_kl", 10.51),
        ("fastkd-triton", "fwd+bwd", "jsd", 14.71),
        ("fastkd-cuda", "fwd+bwd", "tvd", 14.71),
        ("fastkd-triton", "fwd", "soft_ce", 4.20),
        ("fastkd-cuda", "fwd", "hellinger", 8.41),
    ],
)
def test_bytes_are_the_pass_plan(implementation, mode, divergence, gigabytes):
    nbytes = expected_times.path_bytes(implementation, mode, divergence, N, V, "bfloat16")
    assert round(nbytes / 1e9, 2) == gigabytes


def test_short_rows_on_chip_in_triton_only():
    """6 bytes an entry for Triton's on-chip kernel (0.40 GB at N = V = 8192), the CUDA
    kernel's passes otherwise."""
    triton = expected_times.path_bytes("fastkd-triton", "fwd+bwd", "jsd", 8192, 8192, "bfloat16")
    cuda = expected_times.path_bytes("fastkd-cuda", "fwd+bwd", "jsd", 8192, 8192, "bfloat16")
    assert round(triton / 1e9, 2) == 0.40
    assert cuda == 14 * 8192 * 8192


def test_measured_over_expected_at_the_copy_bandwidth():
    """H200 at 4.3 TB/s copy: 2.44 ms expected for forward_kl's forward + backward (the
    docs' table); a row measured at 3.0 ms is 1.23 of it. The reference backend, the
    fused-linear rows and untimed rows have no expectation."""
    row = dict(implementation="fastkd-triton", mode="fwd+bwd", divergence="forward_kl",
               tokens=N, vocab=V, dtype="bfloat16", fused_linear=False, status="ok",
               median_ms=3.0)  # fmt: skip
    others = [
        dict(row, implementation="fastkd-torch"),
        dict(row, fused_linear=True),
        dict(row, status="skipped", median_ms=None),
    ]
    bench = {"meta": {"copy_GBps": 4300.0}, "results": [row, *others]}
    (out,) = expected_times.rows_with_expectations(bench)
    assert round(out["expected_ms"], 2) == 2.44
    assert round(out["measured_over_expected"], 2) == 1.23
    assert "| 10 | 2.443 | 3.000 | 1.23 |" in expected_times.markdown(bench)
