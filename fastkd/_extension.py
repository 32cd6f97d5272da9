"""The compiled ops (fastkd._C and one fastkd._C_cpu_<isa>): loading, build info, row kernel.

``fastkd._C`` defines ``fastkd::kd_rows`` and ``fastkd::scale_rows_``, and the top-k rows'
``fastkd::topk_row_stats`` and ``fastkd::topk_grad_rows`` (csrc/ops.cpp), with their CPU
implementations, and CUDA ones when it was built with them. The CPU implementations
call the kernels of the ``fastkd._C_cpu_<isa>`` module for the best instruction set this CPU
runs (csrc/kd_cpu.cpp, built once per instruction set), which :func:`_load` hands to
``_C``. When ``_C`` is missing or fails to load, fastkd warns once and runs on Triton and the
reference; the ``"cpu"`` and ``"cuda"`` backends are then unavailable, with the reason.

fastkd/_compiled_rows.py puts the ops behind the row interface of fastkd/_rows.py, as the
Triton kernels are.
"""

from __future__ import annotations

import importlib
import importlib.util
import warnings
from pathlib import Path

import torch

REBUILD_HINT = (
    "rebuild it with `pip install --no-build-isolation -e .` (or `python setup.py build_ext "
    "--inplace` in a source checkout)"
)

# Which CPU kernel module to try first, by torch's view of the CPU (it honours
# ATEN_CPU_CAPABILITY); setup.py builds avx512 and avx2 on x86-64, default elsewhere.
_CPU_ISA_ORDER = {
    "AVX512": ("avx512", "avx2", "default"),
    "AVX2": ("avx2", "default"),
}

_C = None
_cpu_module = None
load_error: str | None = None  # why _C is not loaded
cpu_error: str | None = None  # why no CPU kernel module is loaded


def _source_checkout_note() -> str:
    """Why an installed build can be missed: Python imports the fastkd/ folder of a source
    checkout when run from its root, ahead of a `pip install .` in site-packages."""
    package = Path(__file__).resolve().parent
    if not (package.parent / "setup.py").is_file():
        return ""
    return (
        f"; this fastkd is the source checkout at {package}, which has no build of its own "
        f"and shadows any installed copy when Python runs from {package.parent}"
    )


def _load() -> None:
    global _C, _cpu_module, load_error, cpu_error
    try:
        _C = importlib.import_module("fastkd._C")
    except Exception as error:  # ImportError, or an OSError from a mismatched torch
        load_error = f"{type(error).__name__}: {error}" + _source_checkout_note()
        cpu_error = "fastkd._C is not loaded"
        warnings.warn(
            f"fastkd: the compiled ops (fastkd._C) could not be loaded ({load_error}); the "
            f"'cpu' and 'cuda' backends are off and CPU tensors use the PyTorch reference. To "
            f"get them, {REBUILD_HINT}.",
            RuntimeWarning,
            stacklevel=3,
        )
        return
    capability = torch.backends.cpu.get_cpu_capability()
    tried = []
    for isa in _CPU_ISA_ORDER.get(capability, ("default",)):
        try:
            module = importlib.import_module(f"fastkd._C_cpu_{isa}")
            _C.set_cpu_kernels(module.kernels)  # the CPU implementations of the ops call them
        except (ImportError, RuntimeError) as error:
            tried.append(f"_C_cpu_{isa}: {error}")
            continue
        _cpu_module = module
        return
    cpu_error = (
        f"no CPU kernel module for this CPU (torch reports {capability}) was built: "
        + "; ".join(tried)
    )


def cpu_available() -> tuple[bool, str]:
    if _C is None:
        return False, f"fastkd._C is not loaded ({load_error}); {REBUILD_HINT}"
    if _cpu_module is None:
        return False, cpu_error or "no CPU kernel module"
    return True, ""


def cuda_available() -> tuple[bool, str]:
    if _C is None:
        return False, f"fastkd._C is not loaded ({load_error}); {REBUILD_HINT}"
    if not _C.build_info()["cuda_kernels"]:
        return False, f"fastkd._C was built without its CUDA kernels; {REBUILD_HINT} with nvcc"
    return True, ""


def build_info() -> dict:
    """What the installed fastkd was built with and what this process loaded.

    Keys: ``compiled`` (fastkd._C loaded), ``error`` (why not), ``torch_version`` (the torch
    it was compiled against) and ``torch_runtime``, ``cuda_kernels`` (the CUDA kernels are
    compiled in), ``cuda_version``, ``cuda_archs`` (e.g. ["sm_80", "sm_90", "compute_90"]),
    ``cpu_kernels`` (the CPU kernel modules present, by instruction set), ``cpu_kernel``
    (the one loaded, or None), ``compiler``.
    """
    info = {
        "compiled": _C is not None,
        "error": load_error,
        "torch_runtime": torch.__version__,
        "cpu_kernels": [
            isa
            for isa in ("avx512", "avx2", "default")
            if importlib.util.find_spec(f"fastkd._C_cpu_{isa}") is not None
        ],
        "cpu_kernel": getattr(_cpu_module, "isa", None),
        "cpu_error": cpu_error,
    }
    if _C is None:
        info.update(torch_version=None, cuda_kernels=False, cuda_version=None, cuda_archs=[])
        return info
    compiled = dict(_C.build_info())
    compiled["cuda_archs"] = [a for a in compiled["cuda_archs"].split("__") if a]
    info.update(compiled)
    return info


def _register_fakes() -> None:
    """Shapes of the C++ ops for FakeTensor tracing (torch.compile, opcheck)."""

    @torch.library.register_fake("fastkd::kd_rows")
    def _kd_rows_fake(student, *_):
        n_rows = student.shape[0]
        return (
            student.new_empty(n_rows, dtype=torch.float32),
            student.new_empty(n_rows, dtype=torch.float32),
        )

    @torch.library.register_fake("fastkd::scale_rows_")
    def _scale_rows_fake(grad, grad_output):
        return None

    @torch.library.register_fake("fastkd::topk_row_stats")
    def _topk_row_stats_fake(student, *_):
        return student.new_empty(student.shape[0], 5, dtype=torch.float32)

    @torch.library.register_fake("fastkd::topk_grad_rows")
    def _topk_grad_rows_fake(*_):
        return None


_load()
if _C is not None:
    _register_fakes()
