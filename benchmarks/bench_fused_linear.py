"""FusedLinearKDLoss from hidden states and LM-head weights, with every fastkd backend, against
the plain formula on full logits (eager and compiled) and Liger-Kernel's fused-linear JSD
(Triton and chunked). See conftest.py for the options."""

from _suite import run


def bench_fused_linear(benchmark, kd_case, kd_candidate, kd_mode, kd_rounds):
    run(benchmark, kd_case, kd_candidate, kd_mode, kd_rounds)
