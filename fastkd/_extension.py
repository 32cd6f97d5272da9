"""The compiled ops (fastkd._C and one fastkd._C_cpu_<isa>): loading, build info, row kernel.

``fastkd._C`` defines ``fastkd::kd_rows`` and ``fastkd::scale_rows_``, and the top-k rows'
``fastkd::topk_row_stats`` and ``fastkd::topk_grad_rows`` (csrc/ops.cpp), with their CPU
implementations, and CUDA ones when it was built with them. The CPU implementations
call the kernels of the ``fastkd._C_cpu_<isa>`` module for the best instruction set this CPU
runs (csrc/kd_cpu.cpp, built once per instruction set), which :func:`_load_aot` hands to
``_C``.

Two ways to get them, tried in this order:
- ahead of time (``"aot"``): the modules setup.py built beside this file, loaded at import,
  unless the torch they were built against (fastkd/_aot_build.json) is not the running one:
  an extension is tied to its torch's ABI, so they are then left alone, with a warning that
  names both versions;
- just in time (``"jit"``, fastkd/_jit.py): on first use (the first call that needs them, or
  :func:`build_info`), compiled from the sources that travel with the package and cached,
  unless ``FASTKD_NO_JIT=1``.
When neither loads, fastkd warns once and runs on Triton and the reference; the ``"cpu"`` and
``"cuda"`` backends are then unavailable, with the reason.

fastkd/_compiled_rows.py puts the ops behind the row interface of fastkd/_rows.py, as the
Triton kernels are.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import threading
import warnings
from pathlib import Path

import torch

from . import _build_spec, _jit

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
loaded: str | None = None  # "aot" or "jit": which build _C is
load_error: str | None = None  # why _C is not loaded
cpu_error: str | None = None  # why no CPU kernel module is loaded
aot_error: str | None = None  # why no ahead-of-time build is used
jit_dir: str | None = None  # the JIT build's cache folder
_jit_pending = False  # the JIT build is to be tried on first use
_jit_lock = threading.Lock()


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


def _cpu_isa_order() -> tuple[str, ...]:
    return _CPU_ISA_ORDER.get(torch.backends.cpu.get_cpu_capability(), ("default",))


def _aot_torch_mismatch() -> str | None:
    """Why the ahead-of-time modules are for another torch, or None (also when the build
    left no record: a build older than the record)."""
    record = Path(__file__).resolve().parent / _build_spec.AOT_RECORD
    try:
        built_for = json.loads(record.read_text())["torch"]
    except (OSError, ValueError, KeyError):
        return None
    if built_for == torch.__version__:
        return None
    return (
        f"fastkd's compiled ops were built against torch {built_for} and this is torch "
        f"{torch.__version__}: a C++ extension only runs with the torch it was built against"
    )


def _warn_unloaded() -> None:
    warnings.warn(
        f"fastkd: the compiled ops (fastkd._C) could not be loaded ({load_error}); the "
        f"'cpu' and 'cuda' backends are off and CPU tensors use the PyTorch reference. To "
        f"get them, {REBUILD_HINT}.",
        RuntimeWarning,
        stacklevel=_jit.outside_stacklevel(),
    )


def _why_not_aot() -> str | None:
    """Why the ahead-of-time modules are not to be imported, or None; a build for another
    torch is said at once, with both versions."""
    if importlib.util.find_spec(f"fastkd.{_build_spec.OPS_MODULE}") is None:
        return "no ahead-of-time build is installed" + _source_checkout_note()
    mismatch = _aot_torch_mismatch()
    if mismatch is not None:
        then = "compiling them for this torch on first use" + (
            "" if _jit.sources_dir() and not _jit.disabled() else " is not possible here"
        )
        warnings.warn(
            f"fastkd: {mismatch}; {then}.", RuntimeWarning, stacklevel=_jit.outside_stacklevel()
        )
    return mismatch


def _jit_unavailable() -> str | None:
    """Why the JIT build cannot even be tried here, or None."""
    if _jit.disabled():
        return f"{_jit.NO_JIT_ENV}=1 turns the JIT build off"
    if _jit.sources_dir() is None:
        return "no C++ sources to compile them from are installed"
    return None


def _hand_over_cpu_kernels() -> None:
    """The best ahead-of-time CPU kernel module this CPU runs, handed to _C."""
    global _cpu_module, cpu_error
    tried = []
    for isa in _cpu_isa_order():
        try:
            module = importlib.import_module(f"fastkd.{_build_spec.cpu_module(isa)}")
            _C.set_cpu_kernels(module.kernels)  # the CPU implementations of the ops call them
        except (ImportError, RuntimeError) as error:
            tried.append(f"{_build_spec.cpu_module(isa)}: {error}")
            continue
        _cpu_module = module
        return
    cpu_error = (
        f"no CPU kernel module for this CPU (torch reports "
        f"{torch.backends.cpu.get_cpu_capability()}) was built: " + "; ".join(tried)
    )


def _load_aot() -> None:
    """At import: the ahead-of-time modules; else the JIT build is left for the first use,
    or, when it cannot run, the one warning that nothing compiled is loaded."""
    global _C, loaded, load_error, cpu_error, aot_error, _jit_pending
    aot_error = _why_not_aot()
    if aot_error is None:
        try:
            _C = importlib.import_module(f"fastkd.{_build_spec.OPS_MODULE}")
            loaded = "aot"
        except Exception as error:  # ImportError, or an OSError from a mismatched torch
            aot_error = f"{type(error).__name__}: {error}" + _source_checkout_note()
    if _C is not None:
        _hand_over_cpu_kernels()
        _register_fakes()
        return
    why_no_jit = _jit_unavailable()
    if why_no_jit is None:
        _jit_pending = True
        return
    load_error, cpu_error = f"{aot_error}; {why_no_jit}", "fastkd._C is not loaded"
    _warn_unloaded()


@torch.compiler.assume_constant_result  # run for real while torch.compile traces a caller
def _ensure_loaded() -> bool:
    """The JIT build, the first time anything needs the ops; True when _C is loaded. Threads
    that need them at once wait for the one build (none falls back meanwhile)."""
    global _C, _cpu_module, loaded, load_error, cpu_error, jit_dir, _jit_pending
    if not _jit_pending:
        return _C is not None
    with _jit_lock:
        if not _jit_pending:
            return _C is not None
        try:
            done = _jit.compile_and_load(_cpu_isa_order(), aot_error or "")
        except Exception as error:  # JitUnavailable, or the compiler's error
            load_error = f"{aot_error}; the JIT build failed: {_jit.error_tail(error)}"
            cpu_error = "fastkd._C is not loaded"
            _warn_unloaded()
        else:
            _C, _cpu_module, cpu_error = done.ops, done.cpu_module, done.cpu_error
            loaded, jit_dir = "jit", str(done.directory)
            _register_fakes()
        finally:
            _jit_pending = False
    return _C is not None


def cpu_available() -> tuple[bool, str]:
    if not _ensure_loaded():
        return False, f"fastkd._C is not loaded ({load_error}); {REBUILD_HINT}"
    if _cpu_module is None:
        return False, cpu_error or "no CPU kernel module"
    return True, ""


def cuda_available() -> tuple[bool, str]:
    if not _ensure_loaded():
        return False, f"fastkd._C is not loaded ({load_error}); {REBUILD_HINT}"
    if not _C.build_info()["cuda_kernels"]:
        return False, f"fastkd._C was built without its CUDA kernels; {REBUILD_HINT} with nvcc"
    return True, ""


def build_info() -> dict:
    """What this process loaded of fastkd's compiled ops, and what they were built with.

    Compiles them first when that is still to do (the JIT build: fastkd/_jit.py). Keys:
    ``compiled`` (fastkd._C loaded), ``loaded`` (``"aot"``: built at install time, ``"jit"``:
    compiled on first use, None: neither), ``error`` (why not), ``aot_error`` (why no
    ahead-of-time build is used), ``jit_dir`` (the JIT build's cache folder),
    ``torch_version`` (the torch it was compiled against) and ``torch_runtime``,
    ``cuda_kernels`` (the CUDA kernels are compiled in), ``cuda_version``, ``cuda_archs``
    (e.g. ["sm_80", "sm_90", "compute_90"]), ``cpu_kernels`` (the CPU kernel modules present,
    by instruction set), ``cpu_kernel`` (the one loaded, or None), ``compiler``.
    """
    _ensure_loaded()
    if loaded == "jit":
        cpu_kernels = [_cpu_module.isa] if _cpu_module is not None else []
    else:
        cpu_kernels = [
            isa
            for isa in ("avx512", "avx2", "default")
            if importlib.util.find_spec(f"fastkd.{_build_spec.cpu_module(isa)}") is not None
        ]
    info = {
        "compiled": _C is not None,
        "loaded": loaded,
        "error": load_error,
        "aot_error": aot_error,
        "jit_dir": jit_dir,
        "torch_runtime": torch.__version__,
        "cpu_kernels": cpu_kernels,
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

    @torch.library.register_fake("fastkd::kd_shard_rows")
    def _kd_shard_rows_fake(student, teacher, labels, grad, consts, phase, *_):
        columns = (8, 4, 0)[phase]  # kd_params.h: kNumShardStats, kNumShardTerms
        rows = 0 if phase == 2 else student.shape[0]
        return student.new_empty(rows, columns, dtype=torch.float32)


_load_aot()
