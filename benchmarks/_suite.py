"""The body shared by the suites: check against the reference, then let pytest-benchmark
time the call (the same steps as ``python -m fastkd.bench``'s harness, whose pieces these
are)."""

from __future__ import annotations

import pytest

from fastkd.bench import cases, harness, measure
from fastkd.bench.cases import Case
from fastkd.bench.implementations import FWD_BWD, Candidate

SEED = 0
_EXPECTED: dict[Case, harness.Expected] = {}


def _expected(case: Case, inputs: cases.Inputs) -> harness.Expected:
    """The reference for the case's (seeded, so always identical) check inputs, once."""
    if case not in _EXPECTED:
        import torch

        generator = torch.Generator(device=case.device)
        generator.manual_seed(SEED)
        period = min(cases.CHECK_PERIOD, case.tokens)
        cases.fill_check_(inputs, generator, period)
        _EXPECTED[case] = harness.reference(case, inputs, period)
    return _EXPECTED[case]


def run(benchmark, case: Case, cand: Candidate, mode: str, rounds: int) -> None:
    inputs = cases.make_inputs(case)
    expected = _expected(case, inputs)
    call = harness.prepare(case, cand, mode, inputs)
    try:
        outcome = harness.check(case, call, mode, inputs, expected, SEED)
        if outcome.failure is not None:
            pytest.fail(f"{cand.name} {mode}: {outcome.failure}")
        reset = harness.refill_for_timing(inputs, cand, SEED, case.device)

        def setup():
            if reset is not None:
                reset()
            measure.synchronize(case.device)

        def target():
            call()
            measure.synchronize(case.device)

        backward = mode == FWD_BWD
        benchmark.group = f"{case.label()} {mode}"
        benchmark.extra_info.update(
            implementation=cand.name,
            mode=mode,
            loss_rel_err=outcome.loss_rel_err,
            grad_rel_err=outcome.grad_rel_err,
            first_call_ms=outcome.first_call_ms,
        )
        if case.fused_linear:
            benchmark.extra_info["floor_flops"] = cases.floor_flops(case, backward)
        else:
            benchmark.extra_info["floor_bytes"] = cases.floor_bytes(case, backward)
        benchmark.pedantic(target, setup=setup, rounds=rounds, warmup_rounds=1, iterations=1)
    finally:
        harness.release(inputs, case.device)
