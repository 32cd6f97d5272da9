"""The registry of backends: which row kernels exist, and which one ``backend="auto"`` picks.

A backend is one :class:`Backend` entry: its name, the devices it runs on, an availability
check, and its row kernels (the :class:`fastkd._rows.RowKernel` interface), imported on first
use. ``"triton"`` (fastkd/triton), ``"cpu"`` and ``"cuda"`` (the compiled ops of csrc/:
fastkd/_extension.py loads them, fastkd/_compiled_rows.py calls them) are kernel backends:
float32 arithmetic behind fastkd's custom ops.
``"torch"`` is the spec (:mod:`fastkd.reference`): KDLoss runs it under autograd, and
FusedLinearKDLoss runs it chunk by chunk through the same row interface
(fastkd/_reference_rows.py).

``auto`` picks, by device: CPU tensors -> the C++ CPU kernel (the reference when it is not
built); CUDA tensors -> Triton (the faster of Triton and CUDA as measured; Triton until a GPU
says otherwise), then the CUDA kernel, then the reference. The environment variable
``FASTKD_BACKEND`` (one of the explicit backends) replaces ``auto`` for every call; an explicit
``backend=`` argument still wins over it.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import _extension

BACKEND_ENV = "FASTKD_BACKEND"


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _triton_available(device: torch.device) -> tuple[bool, str]:
    if not triton_available():
        return False, "the triton package is not installed"
    if device.type == "cuda" or (device.type == "cpu" and _interpreting()):
        return True, ""
    return False, (
        f"Triton runs on CUDA tensors (or on CPU tensors under TRITON_INTERPRET=1), "
        f"got {device.type} tensors"
    )


def _compiled_available(device_type: str, check: Callable[[], tuple[bool, str]], what: str):
    def available(device: torch.device) -> tuple[bool, str]:
        if device.type != device_type:
            return (
                False,
                f"the {what} runs on {device_type.upper()} tensors, got {device.type} tensors",
            )
        return check()

    return available


@dataclass(frozen=True)
class Backend:
    name: str
    devices: tuple[str, ...]  # device types it can run on (given available() says yes)
    available: Callable[[torch.device], tuple[bool, str]]  # (available, why not)
    module: str  # the module whose row_kernel and scale_rows_ it runs
    is_kernel: bool  # float32 kernel behind the custom ops (False: the float64-able spec)
    # The module whose topk_row_stats and topk_grad_rows it runs (fastkd/_topk_rows.py), or
    # None: the spec's top-k row kernel (fastkd/_reference_rows.py) instead.
    topk_module: str | None = None


REGISTRY: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("triton", ("cuda", "cpu"), _triton_available, "fastkd.triton.kd_kernels", True,
                "fastkd.triton.topk_kernels"),
        Backend(
            "cuda", ("cuda",),
            _compiled_available("cuda", _extension.cuda_available, "CUDA kernel"),
            "fastkd._compiled_rows", True, "fastkd._compiled_rows",
        ),
        Backend(
            "cpu", ("cpu",),
            _compiled_available("cpu", _extension.cpu_available, "C++ CPU kernel"),
            "fastkd._compiled_rows", True, "fastkd._compiled_rows",
        ),
        Backend("torch", ("cpu", "cuda"), lambda device: (True, ""), "fastkd._reference_rows",
                False),
    )
}  # fmt: skip

BACKENDS = ("auto", *REGISTRY)
KERNEL_BACKENDS = tuple(name for name, b in REGISTRY.items() if b.is_kernel)


def is_available(backend: str, device: torch.device) -> tuple[bool, str]:
    """(available, why not) for an explicit backend on a device."""
    if backend not in REGISTRY:
        return False, f"unknown backend {backend!r}"
    return REGISTRY[backend].available(device)


def _auto(device: torch.device) -> str:
    if device.type == "cpu":
        return "cpu" if is_available("cpu", device)[0] else "torch"
    if device.type == "cuda":
        if triton_available():
            return "triton"
        if is_available("cuda", device)[0]:
            return "cuda"
    return "torch"


def _env_backend() -> str | None:
    value = os.environ.get(BACKEND_ENV, "").strip()
    if not value or value == "auto":
        return None
    if value not in BACKENDS:
        raise ValueError(
            f"the environment variable {BACKEND_ENV}={value!r} must be one of {list(BACKENDS)}"
        )
    return value


def resolve(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The concrete backend for a call; raises ValueError when an explicit one can't run."""
    source = f"backend={backend!r}"
    if backend == "auto":
        forced = _env_backend()
        if forced is None:
            return "torch" if dtype == torch.float64 else _auto(device)
        backend, source = forced, f"{BACKEND_ENV}={forced!r}"
    ok, why = is_available(backend, device)
    if not ok:
        raise ValueError(f"{source} is not available: {why}")
    if REGISTRY[backend].is_kernel and dtype == torch.float64:
        raise ValueError(
            f"{source} computes in float32 and takes float32, bfloat16 or float16 "
            "logits; use backend='torch' for float64"
        )
    return backend


def row_kernel(backend: str, topk: bool = False):
    """(row_kernel, scale_rows_) of a concrete backend: the fastkd._rows interface, for
    dense teacher logits or (``topk``) a TopKTeacher's rows."""
    if backend not in REGISTRY:
        raise ValueError(f"backend={backend!r} has no row kernel")
    module = importlib.import_module(REGISTRY[backend].module)
    if not topk:
        return module.row_kernel, module.scale_rows_
    if REGISTRY[backend].topk_module is None:
        return module.topk_row_kernel, module.scale_rows_
    from . import _topk_rows

    return _topk_rows.row_kernel, module.scale_rows_


def topk_kernels(backend: str):
    """(topk_row_stats, topk_grad_rows) of a kernel backend (fastkd/_topk_rows.py)."""
    module = importlib.import_module(REGISTRY[backend].topk_module)
    return module.topk_row_stats, module.topk_grad_rows
