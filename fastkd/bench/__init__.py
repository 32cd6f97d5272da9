"""``python -m fastkd.bench``: fastkd against plain PyTorch and Liger-Kernel, checked, timed.

cases (shapes, inputs, floors) -> implementations (what is compared) -> harness (check,
time, peak memory) -> report (table, markdown, JSON) and plot. cli.py wires them.
"""
