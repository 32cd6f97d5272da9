"""Register and spill budgets of the GPU kernels, checked on a machine without a GPU.

The CUDA row kernels are compiled for sm_90 with `ptxas -v` (the __launch_bounds__(512, 2) of
kd_cuda.cu and kd_topk_cuda.cu caps them at 64 registers: two 512-thread blocks an SM); the
Triton row kernel ahead of time for sm_90 (tests/triton_aot.py), with Triton's own ptxas log: no
spill, and at most 64 registers in every launch configuration. Neither runs a kernel; a GPU is
needed for timing (docs/performance.md).
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MAX_REGISTERS = 64

# torch's flags for CUDA extensions (torch.utils.cpp_extension.COMMON_NVCC_FLAGS) and
# setup.py's -O3: the registers ptxas reports depend on them.
NVCC_FLAGS = [
    "-std=c++17", "-O3", "--expt-relaxed-constexpr",
    "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
]  # fmt: skip


def parse_ptxas(log: str) -> dict:
    """{entry function: (registers, spill store bytes, spill load bytes)} of a ptxas -v log."""
    out, name, spills = {}, None, (0, 0)
    for line in log.splitlines():
        m = re.search(r"[Cc]ompiling entry function '(\S+)'", line)
        if m:
            name, spills = m.group(1), (0, 0)
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            spills = (int(m.group(1)), int(m.group(2)))
        m = re.search(r"Used (\d+) registers", line)
        if m and name is not None:
            out[name] = (int(m.group(1)), *spills)
            name = None
    return out


def _nvcc():
    nvcc = shutil.which("nvcc")
    if nvcc is None and os.environ.get("CUDA_HOME"):
        candidate = Path(os.environ["CUDA_HOME"]) / "bin" / "nvcc"
        nvcc = str(candidate) if candidate.exists() else None
    return nvcc


def _ptxas_kernels(source: str, tmp_path) -> dict:
    """parse_ptxas of csrc/<source> compiled for sm_90 with `ptxas -v`, each kernel printed
    and held to MAX_REGISTERS without spill stores."""
    nvcc = _nvcc()
    if nvcc is None:
        print("SKIPPED: nvcc was not found (PATH, CUDA_HOME)")
        pytest.skip("nvcc was not found (PATH, CUDA_HOME)")
    proc = subprocess.run(
        [nvcc, *NVCC_FLAGS, f"-I{ROOT / 'csrc'}", "-arch=sm_90", "-Xptxas", "-v", "-c",
         str(ROOT / "csrc" / source), "-o", str(tmp_path / f"{source}.o")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    kernels = parse_ptxas(proc.stdout + proc.stderr)
    for name, (regs, spill_st, spill_ld) in sorted(kernels.items()):
        print(f"sm_90 {name}: {regs} registers, spill stores {spill_st} B, loads {spill_ld} B")
    for name, (regs, spill_st, _) in kernels.items():
        assert regs <= MAX_REGISTERS, (name, regs)
        assert spill_st == 0, (name, spill_st)
    return kernels


def test_cuda_row_kernels_fit_64_registers(tmp_path):
    kernels = _ptxas_kernels("kd_cuda.cu", tmp_path)
    rows = {n: r for n, r in kernels.items() if "kd_rows_kernel" in n}
    import fastkd

    assert len(rows) == len(fastkd.DIVERGENCES), kernels  # one kd_rows_kernel<DIV> each
    assert any("scale_rows_kernel" in n for n in kernels), kernels


def test_cuda_topk_kernels_fit_64_registers(tmp_path):
    """The top-k row kernels (csrc/kd_topk_cuda.cu), under the same __launch_bounds__."""
    kernels = _ptxas_kernels("kd_topk_cuda.cu", tmp_path)
    for kernel in ("topk_row_stats_kernel", "topk_grad_rows_kernel"):
        assert sum(kernel in name for name in kernels) == 1, (kernel, kernels)


# Run in a fresh interpreter without TRITON_INTERPRET (the suite's conftest may set it) and
# with an empty cache, so that Triton runs ptxas and prints its -v log (TRITON_DUMP_PTXAS_LOG).
# Triton 3.x fills CompiledKernel.n_regs / n_spills only when it loads the cubin on a GPU; the
# metadata holds neither, so the log is read instead. Every configuration of the launch
# tables (fastkd/triton/launch.py), every divergence, the variant with the most live values
# (CE, soft-cap and gradient on).
TRITON_SCRIPT = r"""
import contextlib, io, json, sys
import triton_aot
from fastkd.divergences import DIVERGENCES
from fastkd.triton import launch

for div in DIVERGENCES.values():
    for kernel, block, num_warps, _ in launch.every_launch():
        for name, fn, constexprs in triton_aot.launch_kernels(kernel, div, True, block):
            log = io.StringIO()
            with contextlib.redirect_stdout(log):
                triton_aot.compile_kernel(fn, constexprs, 90, num_warps)
            print(json.dumps({"divergence": div.name, "kernel": name, "block": block,
                              "num_warps": num_warps, "log": log.getvalue()}))
"""


# Registers a thread may hold so that 32 warps (1024 threads) share an SM's 64K: a program
# of the row kernel waits on its block-wide reductions, and the others keep the loads going.
TRITON_MAX_REGISTERS = 64


def test_triton_row_kernel_does_not_spill(tmp_path):
    """Found on this test's first run (Triton 3.8, sm_90, BLOCK 4096 over 16 warps, 64
    registers): spill stores in jsd (16 B), the skew KLs (8 B) and TVD (4 B)."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(ROOT), env.get("PYTHONPATH", "")])
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton_cache")
    env["TRITON_DUMP_PTXAS_LOG"] = "1"
    proc = subprocess.run(
        [sys.executable, "-c", TRITON_SCRIPT], capture_output=True, text=True, env=env,
        timeout=600, cwd=str(HERE),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    import fastkd

    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert {r["divergence"] for r in results} == set(fastkd.DIVERGENCES)
    over = []
    for r in results:
        kernels = parse_ptxas(r["log"])
        assert kernels, f"no ptxas -v log from Triton for {r['divergence']}: {r['log'][-2000:]}"
        for regs, spill_st, spill_ld in kernels.values():
            print(
                f"triton sm_90 {r['kernel']} {r['divergence']} BLOCK {r['block']} x "
                f"{r['num_warps']} warps: "
                f"{regs} registers, spills {spill_st}/{spill_ld} B"
            )
            if spill_st or regs > TRITON_MAX_REGISTERS:
                over.append((r["kernel"], r["divergence"], r["block"], r["num_warps"], regs))
    assert not over, over
