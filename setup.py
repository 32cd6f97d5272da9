"""Builds fastkd's compiled ops (metadata lives in pyproject.toml).

Extensions, all optional at run time (fastkd falls back to Triton and the reference):
  fastkd._C             the ops (csrc/ops.cpp: schemas, CPU and CUDA implementations,
                        build_info()) and the CUDA kernels (csrc/kd_cuda.cu, and the top-k
                        rows' csrc/kd_topk_cuda.cu) when nvcc is found and torch is a CUDA
                        build, or FASTKD_FORCE_CUDA=1; never decided by
                        torch.cuda.is_available(), so a machine without a GPU builds them too.
  fastkd._C_cpu_<isa>   the CPU kernels (csrc/kd_cpu.cpp, and the top-k rows'
                        csrc/kd_topk_cpu.cpp) once per instruction set: avx512 and avx2 on
                        x86-64, the compiler's baseline elsewhere. at::vec fixes its vector
                        width at compile time; fastkd hands the best one the CPU runs to
                        fastkd._C.

Environment: TORCH_CUDA_ARCH_LIST (default "8.0;9.0+PTX": sm_80, sm_90 and PTX for newer
GPUs), MAX_JOBS (parallel compile jobs), FASTKD_FORCE_CUDA=1 (build the CUDA kernels even if
torch is a CPU build), FASTKD_NO_CUDA=1 (skip them), CUDA_HOME (nvcc is looked for on PATH, then
in $CUDA_HOME/bin, $CUDA_PATH/bin and /usr/local/cuda/bin, torch's default CUDA home). The build
prints what it builds; a build without the CUDA kernels says so in a banner, before and after.

Build with ``pip install --no-build-isolation -e .`` (torch must be importable here) or
``python setup.py build_ext --inplace``.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys

from setuptools import setup

CSRC = "csrc"
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _find_cuda_home(nvcc: str) -> str | None:
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


def _find_nvcc() -> tuple[str | None, list[str]]:
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


def _cuda_decision(torch) -> tuple[bool, str]:
    """(build the CUDA kernels?, why), before torch.utils.cpp_extension is imported."""
    if _env_flag("FASTKD_NO_CUDA"):
        return False, "FASTKD_NO_CUDA=1"
    nvcc, looked = _find_nvcc()
    if nvcc is None:
        return False, (
            f"nvcc was not found (looked on {', '.join(looked)}): put it on PATH or set CUDA_HOME"
        )
    if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")):
        home = _find_cuda_home(nvcc)
        if home:
            os.environ["CUDA_HOME"] = home
    if torch.version.cuda is None and not _env_flag("FASTKD_FORCE_CUDA"):
        return False, (
            f"torch {torch.__version__} is not a CUDA build (FASTKD_FORCE_CUDA=1 overrides)"
        )
    reason = "FASTKD_FORCE_CUDA=1" if _env_flag("FASTKD_FORCE_CUDA") else "nvcc found"
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    return True, f"{reason}, torch CUDA {torch.version.cuda}, nvcc {nvcc}, CUDA_HOME {home}"


def _cpu_isas() -> list[tuple[str, str, list[str]]]:
    """(isa name, at::vec CPU_CAPABILITY, compiler flags) of the CPU kernel builds."""
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64") and sys.platform != "win32":
        avx2 = ["-mavx2", "-mfma", "-mf16c"]
        avx512 = avx2 + ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"]
        return [("avx512", "AVX512", avx512), ("avx2", "AVX2", avx2)]
    return [("default", "DEFAULT", [])]


def _arch_tag(arch_list: str) -> str:
    """ "8.0;9.0+PTX" -> "sm_80__sm_90__compute_90": an identifier, for a -D define."""
    tags = []
    for arch in re.split(r"[;\s]+", arch_list.strip()):
        if not arch:
            continue
        num = arch.split("+")[0].replace(".", "")
        tags.append(f"sm_{num}")
        if arch.endswith("+PTX"):
            tags.append(f"compute_{num}")
    return "__".join(tags)


SUMMARY = ""


def _summary(isas, build_cuda: bool, cuda_line: str) -> str:
    """What is built and what is skipped; a skipped CUDA build is a banner, not a clause."""
    built = (
        "fastkd: building fastkd._C (the ops, build_info) and the CPU kernels for "
        f"{', '.join(isa for isa, _, _ in isas)}"
    )
    if build_cuda:
        return f"{built}; {cuda_line}"
    rule = "!" * 78
    return "\n".join(
        [
            rule,
            f"{built}.",
            f"fastkd: {cuda_line}",
            "fastkd: this build has NO CUDA kernels (build_info()['cuda_kernels'] is False);",
            "fastkd: on a GPU only Triton and the reference will run.",
            rule,
        ]
    )


def _extensions():
    try:
        import torch
    except ImportError as error:
        raise SystemExit(
            "fastkd builds its C++/CUDA ops against the installed torch, which this build "
            "cannot import: install torch first, then `pip install --no-build-isolation .`"
        ) from error

    build_cuda, cuda_why = _cuda_decision(torch)
    if build_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    # Imported only now: it reads CUDA_HOME when it is imported.
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    opt = ["-O3"]
    # torch's vec headers carry clang/nvcc loop pragmas that GCC does not know, and GCC 12
    # flags its own AVX-512 intrinsic headers (_mm512_undefined_*, GCC bug 105593) under
    # at::vec::maximum: neither is about fastkd's code.
    quiet = ["-Wno-unknown-pragmas", "-Wno-maybe-uninitialized", "-Wno-uninitialized"]
    # No multiply-add contraction in the CPU kernels: GCC would fuse (s / T) - max into one
    # FMA whose unrounded product no longer matches the rounded maximum it subtracts (a V = 1
    # row's skew KL came out 2.8e-5 instead of 0), and results would move with the compiler.
    # The fused multiply-adds that matter are explicit in at::vec's and Sleef's code.
    exact = ["-ffp-contract=off"]
    include = [os.path.abspath(CSRC)]
    exts = []
    if build_cuda:
        archs = os.environ["TORCH_CUDA_ARCH_LIST"]
        n_archs = len([a for a in re.split(r"[;\s]+", archs) if a])
        jobs = os.environ.get("MAX_JOBS", "")
        nvcc_threads = min(n_archs, int(jobs)) if jobs.isdigit() and int(jobs) > 0 else n_archs
        defines = ["-DFASTKD_WITH_CUDA", f"-DFASTKD_CUDA_ARCHS={_arch_tag(archs)}"]
        exts.append(
            CUDAExtension(
                "fastkd._C",
                [f"{CSRC}/ops.cpp", f"{CSRC}/kd_cuda.cu", f"{CSRC}/kd_topk_cuda.cu"],
                include_dirs=include,
                extra_compile_args={
                    "cxx": opt + defines,
                    "nvcc": opt + defines + [f"--threads={max(nvcc_threads, 1)}"],
                },
            )
        )
        cuda_line = f"CUDA kernels for TORCH_CUDA_ARCH_LIST={archs} ({cuda_why})"
    else:
        exts.append(
            CppExtension(
                "fastkd._C",
                [f"{CSRC}/ops.cpp"],
                include_dirs=include,
                extra_compile_args={"cxx": opt},
            )
        )
        cuda_line = f"CUDA kernels SKIPPED: {cuda_why}"

    isas = _cpu_isas()
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    for isa, capability, flags in isas:
        module = f"_C_cpu_{isa}"
        exts.append(
            CppExtension(
                f"fastkd.{module}",
                [f"{CSRC}/kd_cpu.cpp", f"{CSRC}/kd_topk_cpu.cpp"],
                include_dirs=include,
                extra_compile_args={
                    "cxx": opt
                    + quiet
                    + exact
                    + openmp
                    + flags
                    + [
                        f"-DCPU_CAPABILITY={capability}",
                        f"-DCPU_CAPABILITY_{capability}",
                        f"-DFASTKD_CPU_MODULE={module}",
                        f"-DFASTKD_CPU_ISA={isa}",
                    ]
                },
                extra_link_args=openmp,
            )
        )
    global SUMMARY
    SUMMARY = _summary(isas, build_cuda, cuda_line)
    print(SUMMARY, flush=True)

    class Build(BuildExtension):
        """One build folder per extension: kd_cpu.cpp is compiled once per instruction set."""

        def build_extension(self, ext):
            base = self.build_temp
            self.build_temp = os.path.join(base, ext.name.rsplit(".", 1)[-1])
            try:
                super().build_extension(ext)
            finally:
                self.build_temp = base

    return exts, {"build_ext": Build}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
# Again after the compiler's output, where the last lines of a build log are read.
print(SUMMARY, file=sys.stderr, flush=True)
