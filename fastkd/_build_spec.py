"""What fastkd's compiled modules are built from and with which flags: one list for both builds.

setup.py builds them ahead of time (``pip install --no-build-isolation``) and fastkd/_jit.py
on first use (a wheel built where torch could not be imported carries the sources instead);
both read the source lists and flags here. Standard library only: setup.py loads this file by
path, where torch may not be importable.

The modules:
  fastkd._C             OPS_SOURCES (schemas, CPU and CUDA implementations, build_info()),
                        plus CUDA_SOURCES when it is built with the CUDA kernels.
  fastkd._C_cpu_<isa>   CPU_KERNEL_SOURCES, once per instruction set (:func:`cpu_isas`):
                        at::vec fixes its vector width at compile time. The module hands its
                        kernel table to fastkd._C (fastkd/_extension.py).

A new source file is one entry in one of the three lists (tests/test_install.py checks that
every .cpp and .cu under csrc/ is in one); a new header needs nothing (every file under csrc/
with a suffix in SOURCE_SUFFIXES travels with the wheel and keys the JIT cache).
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys

OPS_SOURCES = ("ops.cpp",)
CUDA_SOURCES = ("kd_cuda.cu", "kd_topk_cuda.cu")
CPU_KERNEL_SOURCES = ("kd_cpu.cpp", "kd_topk_cpu.cpp", "kd_shard_cpu.cpp")

# What a wheel carries in fastkd/csrc/ for the JIT build.
SOURCE_SUFFIXES = (".h", ".cuh", ".cpp", ".cu")

OPS_MODULE = "_C"
# Written beside the modules by an ahead-of-time build: the torch it was built against, which
# fastkd/_extension.py compares with the running one before loading them.
AOT_RECORD = "_aot_build.json"
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"  # sm_80, sm_90 and PTX for newer GPUs (ahead of time)

OPT = ["-O3"]
# torch's vec headers carry clang/nvcc loop pragmas that GCC does not know, and GCC 12
# flags its own AVX-512 intrinsic headers (_mm512_undefined_*, GCC bug 105593) under
# at::vec::maximum: neither is about fastkd's code.
QUIET = ["-Wno-unknown-pragmas", "-Wno-maybe-uninitialized", "-Wno-uninitialized"]
# No multiply-add contraction in the CPU kernels: GCC would fuse (s / T) - max into one
# FMA whose unrounded product no longer matches the rounded maximum it subtracts (a V = 1
# row's skew KL came out 2.8e-5 instead of 0), and results would move with the compiler.
# The fused multiply-adds that matter are explicit in at::vec's and Sleef's code.
EXACT = ["-ffp-contract=off"]


def env_flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def cpu_module(isa: str) -> str:
    return f"_C_cpu_{isa}"


def cpu_isas() -> list[tuple[str, str, list[str]]]:
    """(isa name, at::vec CPU_CAPABILITY, compiler flags) of the CPU kernel builds."""
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64") and sys.platform != "win32":
        avx2 = ["-mavx2", "-mfma", "-mf16c"]
        avx512 = avx2 + ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"]
        return [("avx512", "AVX512", avx512), ("avx2", "AVX2", avx2)]
    return [("default", "DEFAULT", [])]


def openmp_flags() -> list[str]:
    return ["-fopenmp"] if sys.platform.startswith("linux") else []


def cpu_cflags(isa: str, capability: str, isa_flags: list[str]) -> list[str]:
    """Compiler flags of the fastkd._C_cpu_<isa> module."""
    return (
        OPT
        + QUIET
        + EXACT
        + openmp_flags()
        + isa_flags
        + [
            f"-DCPU_CAPABILITY={capability}",
            f"-DCPU_CAPABILITY_{capability}",
            f"-DFASTKD_CPU_MODULE={cpu_module(isa)}",
            f"-DFASTKD_CPU_ISA={isa}",
        ]
    )


def split_archs(arch_list: str) -> list[str]:
    """ "8.0;9.0+PTX" -> ["8.0", "9.0+PTX"] (TORCH_CUDA_ARCH_LIST's separators)."""
    return [arch for arch in re.split(r"[;\s]+", arch_list.strip()) if arch]


def arch_tag(arch_list: str) -> str:
    """ "8.0;9.0+PTX" -> "sm_80__sm_90__compute_90": an identifier, for a -D define."""
    tags = []
    for arch in split_archs(arch_list):
        num = arch.split("+")[0].replace(".", "")
        tags.append(f"sm_{num}")
        if arch.endswith("+PTX"):
            tags.append(f"compute_{num}")
    return "__".join(tags)


def ops_cflags(arch_list: str | None) -> tuple[list[str], list[str]]:
    """(C++ flags, nvcc flags) of fastkd._C; ``arch_list`` None: without the CUDA kernels."""
    if arch_list is None:
        return list(OPT), []
    defines = ["-DFASTKD_WITH_CUDA", f"-DFASTKD_CUDA_ARCHS={arch_tag(arch_list)}"]
    n_archs = len(split_archs(arch_list))
    jobs = os.environ.get("MAX_JOBS", "")
    threads = min(n_archs, int(jobs)) if jobs.isdigit() and int(jobs) > 0 else n_archs
    return OPT + defines, OPT + defines + [f"--threads={max(threads, 1)}"]


def find_cuda_home(nvcc: str) -> str | None:
    """The CUDA toolkit of ``nvcc``, also when nvcc on PATH is a wrapper script or a link.

    torch guesses dirname(dirname(nvcc)), which is /usr/local for /usr/local/bin/nvcc; nvcc
    itself knows its install root (the TOP of its dry run).
    """
    try:
        dry = subprocess.run(
            [nvcc, "--dryrun", "-E", "-x", "cu", os.devnull],
            capture_output=True,
            text=True,
            timeout=60,
        )
        match = re.search(r"^#\$ TOP=(.+)$", dry.stdout + dry.stderr, re.MULTILINE)
        if match:
            return os.path.realpath(match.group(1).strip())  # <root>/bin/..
    except (OSError, subprocess.SubprocessError):
        pass
    home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return home if os.path.isdir(os.path.join(home, "include")) else None


# torch's own guess when nvcc is neither on PATH nor under $CUDA_HOME/$CUDA_PATH
# (torch.utils.cpp_extension._find_cuda_home): CUDA images put the toolkit there and often
# leave its bin/ off PATH. Not read from cpp_extension itself: importing it fixes its
# CUDA_HOME, which must wait until the toolkit is known.
TORCH_DEFAULT_CUDA_HOME = "/usr/local/cuda"


def find_nvcc() -> tuple[str | None, list[str]]:
    """(nvcc, the places looked in): PATH, then $CUDA_HOME/bin, $CUDA_PATH/bin, then torch's
    default CUDA home."""
    looked = ["PATH"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        return nvcc, looked
    homes = [(f"${var}", os.environ.get(var)) for var in ("CUDA_HOME", "CUDA_PATH")]
    homes.append(("torch's default CUDA home", TORCH_DEFAULT_CUDA_HOME))
    for label, home in homes:
        if not home:
            continue
        candidate = os.path.join(home, "bin", "nvcc")
        looked.append(f"{label} ({candidate})")
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate, looked
    return None, looked


def locate_cuda_toolkit() -> tuple[str | None, str]:
    """(nvcc, why not when None); sets CUDA_HOME from nvcc when neither CUDA_HOME nor
    CUDA_PATH is set, for torch.utils.cpp_extension, which reads it when it is imported."""
    nvcc, looked = find_nvcc()
    if nvcc is None:
        return None, (
            f"nvcc was not found (looked on {', '.join(looked)}): put it on PATH or set CUDA_HOME"
        )
    if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")):
        home = find_cuda_home(nvcc)
        if home:
            os.environ["CUDA_HOME"] = home
    return nvcc, ""
