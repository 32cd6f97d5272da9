"""Helpers for the tests that run the examples/ scripts as libraries."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def import_example(name: str, *needs: str):
    """examples/<name>.py as a module; skips (with the reason) when a package it needs is
    missing. The examples import each other as siblings, so examples/ goes on sys.path."""
    for package in needs:
        pytest.importorskip(package, reason=f"examples/{name}.py needs {package} (the test extra)")
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    return __import__(name)


@contextmanager
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine the threads'
    spin-waits make each step many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def max_relative_difference(a: list[float], b: list[float]) -> float:
    a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    assert a.shape == b.shape, f"{len(a)} losses against {len(b)}"
    return ((a - b).abs() / b.abs()).max().item()


def weights_relative_difference(model_a, model_b) -> float:
    """Largest ||a - b|| / ||b|| over the parameter tensors of two models of one config."""
    worst = 0.0
    pairs = zip(model_a.named_parameters(), model_b.named_parameters(), strict=True)
    for (name_a, a), (name_b, b) in pairs:
        assert name_a == name_b
        worst = max(worst, ((a.detach() - b.detach()).norm() / b.detach().norm()).item())
    return worst
