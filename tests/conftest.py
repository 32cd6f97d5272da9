"""Test setup: run Triton kernels under the interpreter when there is no GPU."""

import os

import torch

if not torch.cuda.is_available():
    # Must happen before fastkd.triton.* is imported (the kernels are imported lazily).
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kd_testing import WORST_ERRORS  # noqa: E402


def pytest_terminal_summary(terminalreporter):
    """Print the largest relative errors measured against the float64 reference."""
    if not WORST_ERRORS:
        return
    terminalreporter.section("worst relative error vs float64 reference")
    for key in sorted(WORST_ERRORS):
        loss_err, grad_err = WORST_ERRORS[key]
        terminalreporter.write_line(f"{key:<28} loss {loss_err:.2e}   grad {grad_err:.2e}")


def pytest_report_header(config):
    from kd_testing import FUZZ_SEED_ENV, fuzz_seed

    return f"fastkd fuzz seed: {fuzz_seed()} (reproduce with {FUZZ_SEED_ENV}={fuzz_seed()})"
