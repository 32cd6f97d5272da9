"""KDLoss on logits: every fastkd backend against plain PyTorch (eager and compiled) and
Liger-Kernel, forward+backward and forward only. See conftest.py for the options."""

from _suite import run


def bench_kd_loss(benchmark, kd_case, kd_candidate, kd_mode, kd_rounds):
    run(benchmark, kd_case, kd_candidate, kd_mode, kd_rounds)
