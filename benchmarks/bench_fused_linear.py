"""FusedLinearKDLoss from hidden states and LM-head weights against the plain formula on full
logits (eager and compiled) and Liger-Kernel's fused-linear JSD (Triton and chunked). Until
fastkd has FusedLinearKDLoss its rows are skipped with that reason."""

from _suite import run


def bench_fused_linear(benchmark, kd_case, kd_candidate, kd_mode, kd_rounds):
    run(benchmark, kd_case, kd_candidate, kd_mode, kd_rounds)
