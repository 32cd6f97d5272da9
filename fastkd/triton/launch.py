"""Which Triton row kernel runs, with which (BLOCK, num_warps) and how many programs a row:
by V, the divergence and the number of rows, from small tables.

The numbers come from the kernels' resource reports (Triton 3.8, ptxas for sm_90,
tests/test_cuda_resources.py) and are explained in docs/performance.md, "Triton launch
table": at most 64 registers a thread (32 warps an SM, whatever the program's size) and no
spill. Rows up to ON_CHIP_MAX_V entries are held whole by kd_onchip.kd_row_onchip_kernel (4
or 8 entries a thread: one read of the row); longer ones take kd_kernels.kd_row_kernel's passes
(4 entries a thread; 8 spilled, or took it to 85-95 registers), 2048 entries a block over 16
warps for the long rows (two programs an SM at 49-50 registers, three at 40), cut across
programs (kd_split.py) when there are too few rows to fill the GPU. A GPU has yet to time
them; the tables are where its answer goes.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton

MULTI_PASS = "multi_pass"
ON_CHIP = "on_chip"
SPLIT = "split"


class RowLaunch(NamedTuple):
    kernel: str  # MULTI_PASS, ON_CHIP or SPLIT
    block: int  # vocabulary entries a block (a power of two)
    num_warps: int
    chunks: int = 1  # SPLIT: programs a row


# (largest V, BLOCK, num_warps), the first row whose V bound holds; BLOCK None is
# next_power_of_2(V), at least 16 (one block holds the row).
# kd_row_kernel: 4 entries a thread.
MULTI_PASS_TABLE = (
    (128, None, 1),
    (256, 256, 2),
    (512, 512, 4),
    (1024, 1024, 8),
    (None, 2048, 16),
)
# kd_row_onchip_kernel: the whole row, 4 entries a thread up to 2048 and 8 above (16
# spilled in every divergence but tvd at 16384 over 32 warps; 8 took skew_forward_kl to 69
# registers over one warp, and spilled 4 bytes in tvd at 2048 over 8 warps).
ON_CHIP_TABLE = (
    (128, None, 1),
    (256, 256, 2),
    (512, 512, 4),
    (1024, 1024, 8),
    (2048, 2048, 16),
    (4096, 4096, 16),
    (8192, 8192, 32),
)
# The longest row the on-chip kernel takes, for every divergence. Tests lower it to 0 to
# run the multi-pass kernel on short rows.
ON_CHIP_MAX_V = ON_CHIP_TABLE[-1][0]


# Split-V (kd_split.py): with fewer than SPLIT_ROWS_PER_SM rows an SM, one program a row
# leaves SMs idle; each row is then cut into chunks of at least SPLIT_MIN_CHUNK entries (4
# blocks of the long rows' 2048), at most SPLIT_MAX_CHUNKS, for about SPLIT_ROWS_PER_SM
# programs an SM. Tests lower SPLIT_MIN_CHUNK and stand in for the SM count.
SPLIT_ROWS_PER_SM = 2
SPLIT_MIN_CHUNK = 8192
SPLIT_MAX_CHUNKS = 64


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 0 elsewhere (no split)."""
    if device.type != "cuda":
        return 0
    return torch.cuda.get_device_properties(device).multi_processor_count


def split_chunks(n_rows: int, V: int, sms: int) -> int:
    """Programs a row for n_rows rows of V entries on ``sms`` SMs (1: no split)."""
    programs = SPLIT_ROWS_PER_SM * sms
    if n_rows <= 0 or n_rows >= programs:
        return 1
    return max(1, min(math.ceil(programs / n_rows), V // SPLIT_MIN_CHUNK, SPLIT_MAX_CHUNKS))


def _lookup(table, V: int) -> tuple[int, int]:
    for largest_v, block, num_warps in table:
        if largest_v is None or largest_v >= V:
            return block or triton.next_power_of_2(max(V, 16)), num_warps
    raise ValueError(f"no row of the launch table holds V = {V}")


def row_launch(V: int, divergence: str, n_rows: int = 0, sms: int = 0) -> RowLaunch:
    """The kernel, its (BLOCK, num_warps) and its programs a row for n_rows rows of V
    entries of ``divergence`` on a device of ``sms`` SMs.

    The divergence moves nothing today: one threshold and one rule fit every divergence's
    reports (docs/performance.md), and a GPU may say otherwise."""
    if V <= ON_CHIP_MAX_V:
        return RowLaunch(ON_CHIP, *_lookup(ON_CHIP_TABLE, V))
    block, num_warps = _lookup(MULTI_PASS_TABLE, V)
    chunks = split_chunks(n_rows, V, sms)
    return RowLaunch(SPLIT if chunks > 1 else MULTI_PASS, block, num_warps, chunks)


def every_launch() -> list[RowLaunch]:
    """Every configuration the tables can pick (for the resource test); the split kernels
    run with the long rows' configuration."""
    tables = ((MULTI_PASS, MULTI_PASS_TABLE), (ON_CHIP, ON_CHIP_TABLE))
    launches = [
        RowLaunch(kernel, *_lookup(table, V if V is not None else 1 << 20))
        for kernel, table in tables
        for V, _, _ in table
    ]
    return [*launches, RowLaunch(SPLIT, *_lookup(MULTI_PASS_TABLE, 1 << 20), 2)]
