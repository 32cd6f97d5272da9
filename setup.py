"""Builds fastkd (metadata lives in pyproject.toml): its compiled ops ahead of time when torch
can be imported here, else a pure-Python package that compiles them on first use.

Extensions, all optional at run time (fastkd falls back to Triton and the reference):
  fastkd._C             the ops (csrc/ops.cpp: schemas, CPU and CUDA implementations,
                        build_info()) and the CUDA kernels (csrc/kd_cuda.cu, and the top-k
                        rows' csrc/kd_topk_cuda.cu) when nvcc is found and torch is a CUDA
                        build, or FASTKD_FORCE_CUDA=1; never decided by
                        torch.cuda.is_available(), so a machine without a GPU builds them too.
  fastkd._C_cpu_<isa>   the CPU kernels (csrc/kd_cpu.cpp, the top-k rows'
                        csrc/kd_topk_cpu.cpp, the vocab-parallel shards'
                        csrc/kd_shard_cpu.cpp) once per instruction set: avx512 and avx2 on
                        x86-64, the compiler's baseline elsewhere. at::vec fixes its vector
                        width at compile time; fastkd hands the best one the CPU runs to
                        fastkd._C.
The source lists and flags live in fastkd/_build_spec.py, shared with the JIT build
(fastkd/_jit.py). Every build puts the C++/CUDA sources in the package (fastkd/csrc/), and an
ahead-of-time build records the torch it was built against (fastkd/_aot_build.json).

Without torch importable (pip's default build isolation installs only setuptools and wheel
into the build's environment) this builds no extension: the package compiles its ops with
torch.utils.cpp_extension.load on first use instead, and says so, here and then.

Environment: TORCH_CUDA_ARCH_LIST (default "8.0;9.0+PTX": sm_80, sm_90 and PTX for newer
GPUs), MAX_JOBS (parallel compile jobs), FASTKD_FORCE_CUDA=1 (build the CUDA kernels even if
torch is a CPU build), FASTKD_NO_CUDA=1 (skip them), CUDA_HOME (nvcc is looked for on PATH, then
in $CUDA_HOME/bin, $CUDA_PATH/bin and /usr/local/cuda/bin, torch's default CUDA home). The build
prints what it builds; a build without the CUDA kernels says so in a banner, before and after.

Build with ``pip install --no-build-isolation -e .`` (torch must be importable here) or
``python setup.py build_ext --inplace``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

CSRC = "csrc"
HERE = Path(__file__).resolve().parent


def _load_build_spec():
    """fastkd/_build_spec.py by path: importing the fastkd package would import torch."""
    path = HERE / "fastkd" / "_build_spec.py"
    spec = importlib.util.spec_from_file_location("fastkd_build_spec", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SPEC = _load_build_spec()


def _cuda_decision(torch) -> tuple[bool, str]:
    """(build the CUDA kernels?, why), before torch.utils.cpp_extension is imported."""
    if SPEC.env_flag("FASTKD_NO_CUDA"):
        return False, "FASTKD_NO_CUDA=1"
    nvcc, why_not = SPEC.locate_cuda_toolkit()
    if nvcc is None:
        return False, why_not
    if torch.version.cuda is None and not SPEC.env_flag("FASTKD_FORCE_CUDA"):
        return False, (
            f"torch {torch.__version__} is not a CUDA build (FASTKD_FORCE_CUDA=1 overrides)"
        )
    reason = "FASTKD_FORCE_CUDA=1" if SPEC.env_flag("FASTKD_FORCE_CUDA") else "nvcc found"
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    return True, f"{reason}, torch CUDA {torch.version.cuda}, nvcc {nvcc}, CUDA_HOME {home}"


SUMMARY = ""


def _banner(lines: list[str]) -> str:
    rule = "!" * 78
    return "\n".join([rule, *lines, rule])


def _summary(isas, build_cuda: bool, cuda_line: str) -> str:
    """What is built and what is skipped; a skipped CUDA build is a banner, not a clause."""
    built = (
        "fastkd: building fastkd._C (the ops, build_info) and the CPU kernels for "
        f"{', '.join(isa for isa, _, _ in isas)}"
    )
    if build_cuda:
        return f"{built}; {cuda_line}"
    return _banner(
        [
            f"{built}.",
            f"fastkd: {cuda_line}",
            "fastkd: this build has NO CUDA kernels (build_info()['cuda_kernels'] is False);",
            "fastkd: on a GPU only Triton and the reference will run.",
        ]
    )


def _pure_summary(error: ImportError) -> str:
    return _banner(
        [
            f"fastkd: torch cannot be imported by this build ({error}), as under pip's",
            "fastkd: default build isolation: building a pure-Python fastkd with its C++/CUDA",
            "fastkd: sources, which compiles its ops on first use (about a minute, then cached",
            "fastkd: in TORCH_EXTENSIONS_DIR). To compile them now instead, install torch first,",
            "fastkd: then `pip install --no-build-isolation ...`.",
        ]
    )


class BuildPyWithSources(build_py):
    """Copies csrc/ into the package (fastkd/csrc/) for the JIT build, and drops compiled
    files a previous build left in the build folder (a pure-Python wheel must hold none)."""

    def run(self):
        super().run()
        if self.editable_mode:  # an editable install reads the checkout's csrc/ itself
            return
        package = Path(self.build_lib) / "fastkd"
        if not self.distribution.ext_modules:
            compiled = [*package.glob("_C*.so"), *package.glob("_C*.pyd")]
            for stale in [*compiled, package / SPEC.AOT_RECORD]:
                stale.unlink(missing_ok=True)
        target = package / "csrc"
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        for source in sorted((HERE / CSRC).iterdir()):
            if source.suffix in SPEC.SOURCE_SUFFIXES:
                shutil.copyfile(source, target / source.name)


def _extensions(torch):
    build_cuda, cuda_why = _cuda_decision(torch)
    if build_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", SPEC.DEFAULT_CUDA_ARCHS)
    # Imported only now: it reads CUDA_HOME when it is imported.
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    include = [os.path.abspath(CSRC)]
    ops_sources = [f"{CSRC}/{name}" for name in SPEC.OPS_SOURCES]
    exts = []
    if build_cuda:
        archs = os.environ["TORCH_CUDA_ARCH_LIST"]
        cxx, nvcc = SPEC.ops_cflags(archs)
        exts.append(
            CUDAExtension(
                f"fastkd.{SPEC.OPS_MODULE}",
                ops_sources + [f"{CSRC}/{name}" for name in SPEC.CUDA_SOURCES],
                include_dirs=include,
                extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            )
        )
        cuda_line = f"CUDA kernels for TORCH_CUDA_ARCH_LIST={archs} ({cuda_why})"
    else:
        cxx, _ = SPEC.ops_cflags(None)
        exts.append(
            CppExtension(
                f"fastkd.{SPEC.OPS_MODULE}",
                ops_sources,
                include_dirs=include,
                extra_compile_args={"cxx": cxx},
            )
        )
        cuda_line = f"CUDA kernels SKIPPED: {cuda_why}"

    isas = SPEC.cpu_isas()
    for isa, capability, flags in isas:
        exts.append(
            CppExtension(
                f"fastkd.{SPEC.cpu_module(isa)}",
                [f"{CSRC}/{name}" for name in SPEC.CPU_KERNEL_SOURCES],
                include_dirs=include,
                extra_compile_args={"cxx": SPEC.cpu_cflags(isa, capability, flags)},
                extra_link_args=SPEC.openmp_flags(),
            )
        )
    global SUMMARY
    SUMMARY = _summary(isas, build_cuda, cuda_line)
    print(SUMMARY, flush=True)

    class Build(BuildExtension):
        """One build folder per extension (kd_cpu.cpp is compiled once per instruction set),
        and the torch it was built against recorded beside the modules."""

        def build_extension(self, ext):
            base = self.build_temp
            self.build_temp = os.path.join(base, ext.name.rsplit(".", 1)[-1])
            try:
                super().build_extension(ext)
            finally:
                self.build_temp = base

        def run(self):
            super().run()
            record = json.dumps({"torch": torch.__version__, "cuda_kernels": build_cuda})
            folders = [Path(self.build_lib) / "fastkd"]
            if self.inplace:
                build_py_cmd = self.get_finalized_command("build_py")
                folders.append(Path(build_py_cmd.get_package_dir("fastkd")))
            for folder in folders:
                folder.mkdir(parents=True, exist_ok=True)
                (folder / SPEC.AOT_RECORD).write_text(record + "\n")

    return exts, Build


def _configure():
    global SUMMARY
    try:
        import torch
    except ImportError as error:
        SUMMARY = _pure_summary(error)
        print(SUMMARY, flush=True)
        return [], {"build_py": BuildPyWithSources}
    exts, build_ext = _extensions(torch)
    return exts, {"build_py": BuildPyWithSources, "build_ext": build_ext}


ext_modules, cmdclass = _configure()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
# Again after the compiler's output, where the last lines of a build log are read.
print(SUMMARY, file=sys.stderr, flush=True)
