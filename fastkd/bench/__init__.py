"""``python -m fastkd.bench``: fastkd against plain PyTorch and Liger-Kernel, checked, timed;
and the measurement toolkit every benchmark script, example and test imports.

cases (shapes, inputs, floors) -> implementations (what is compared) -> harness (check,
time, peak memory) -> report (table, markdown, JSON) and plot. cli.py wires them.
The toolkit: measure.py (clocks, peak memory, the device's ceilings and name) and
formulas.py (the loss in plain PyTorch, the baseline every comparison uses).
"""
