"""Parametrisation of the pytest-benchmark suites: the cases and implementations of
``python -m fastkd.bench``, one benchmark per (case, implementation, mode).

Shapes default to the bench's per-device defaults; override them with the --kd-* options,
e.g. ``pytest benchmarks/ --benchmark-only --kd-vocab 32000,128256 --kd-divergence jsd``.
Save a run with ``--benchmark-save=NAME`` and compare later ones with
``--benchmark-compare``; each benchmark's group is its case and mode, so the comparison
tables put the implementations of one case side by side.
"""

from __future__ import annotations

import pytest
import torch

from fastkd.bench import cli
from fastkd.bench.cases import Case
from fastkd.bench.implementations import MODES, candidates


def pytest_addoption(parser):
    group = parser.getgroup("fastkd benchmarks")
    group.addoption("--kd-device", choices=("cpu", "cuda"), help="default: cuda if present")
    group.addoption("--kd-tokens", help="rows N, comma-separated")
    group.addoption("--kd-vocab", help="vocabulary sizes V, comma-separated")
    group.addoption("--kd-dtype", help="float32, bfloat16 or float16")
    group.addoption("--kd-divergence", default="forward_kl,jsd", help="default forward_kl,jsd")
    group.addoption("--kd-temperature", type=float, default=1.0)
    group.addoption("--kd-hidden", type=int, help="hidden size for the fused-linear suite")
    group.addoption("--kd-impl", help="implementations (names or shell patterns)")
    group.addoption("--kd-rounds", type=int, help="timed rounds per benchmark")


def _ints(text):
    return [int(x) for x in text.split(",")] if text else None


def _cases(config, fused: bool) -> list[Case]:
    device = config.getoption("kd_device") or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = config.getoption("kd_dtype")
    return cli.make_cases(
        device,
        config.getoption("kd_divergence").split(","),
        tokens=_ints(config.getoption("kd_tokens")),
        vocab=_ints(config.getoption("kd_vocab")),
        dtype=[dtype] if dtype else None,
        fused_linear=fused,
        hidden=config.getoption("kd_hidden"),
        temperature=config.getoption("kd_temperature"),
    )


def pytest_generate_tests(metafunc):
    if "kd_case" not in metafunc.fixturenames:
        return
    fused = metafunc.module.__name__.endswith("fused_linear")
    patterns = metafunc.config.getoption("kd_impl")
    patterns = patterns.split(",") if patterns else None
    params = []
    for case in _cases(metafunc.config, fused):
        for cand in cli._selected(candidates(case), patterns):
            for mode in MODES:
                if mode not in cand.modes:
                    continue
                shape = f"N{case.tokens}-V{case.vocab}" + (f"-H{case.hidden}" if fused else "")
                ident = f"{case.divergence}-{shape}-{case.dtype}-{cand.name}-{mode}"
                marks = [pytest.mark.skip(reason=f"{cand.name}: {cand.skip}")] if cand.skip else []
                params.append(pytest.param(case, cand, mode, id=ident, marks=marks))
    metafunc.parametrize(("kd_case", "kd_candidate", "kd_mode"), params)


@pytest.fixture
def kd_rounds(request, kd_case):
    rounds = request.config.getoption("kd_rounds")
    return rounds or (30 if kd_case.device == "cuda" else 5)
