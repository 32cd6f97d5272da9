"""Which (BLOCK, num_warps) the Triton row kernel runs with, by V, from a small table.

The numbers come from the kernels' resource reports (Triton 3.8, ptxas for sm_90,
tests/test_cuda_resources.py) and are explained in docs/performance.md, "Triton launch
table": at most 4 entries a thread (8 spilled, or took the row kernel to 85-95 registers),
at most 64 registers a thread (32 warps an SM, whatever the program's size), and 2048
entries a block over 16 warps for the long rows (two programs an SM at 49-50 registers,
three at 40). A GPU has yet to time them; the table is where its answer goes.
"""

from __future__ import annotations

from typing import NamedTuple

import triton


class RowLaunch(NamedTuple):
    block: int  # vocabulary entries a block (a power of two)
    num_warps: int


# (largest V, BLOCK, num_warps) of kd_row_kernel: the first row whose V bound holds. BLOCK
# None is next_power_of_2(V), at least 16 (one block holds the row).
MULTI_PASS_TABLE = (
    (128, None, 1),
    (256, 256, 2),
    (512, 512, 4),
    (1024, 1024, 8),
    (None, 2048, 16),
)


def row_launch(V: int, divergence: str) -> RowLaunch:
    """(BLOCK, num_warps) of kd_row_kernel for rows of V entries of ``divergence``.

    The divergence does not change the multi-pass configuration today (the same rule fits
    every row of the resource reports); it is an argument because it sets how many programs
    share an SM and which variant of the kernel runs."""
    for largest_v, block, num_warps in MULTI_PASS_TABLE:
        if largest_v is None or largest_v >= V:
            if block is None:
                block = triton.next_power_of_2(max(V, 16))
            return RowLaunch(block, num_warps)
    raise AssertionError("the table's last row holds every V")
