"""Which row kernels exist, and which one ``backend="auto"`` picks.

A row kernel has the signature of :func:`fastkd.triton.kd_kernels.kd_rows` (loss per row,
gradient written into a caller's buffer) and a companion ``scale_rows_`` (the backward):
``"triton"`` (fastkd/triton), ``"cpu"`` and ``"cuda"`` (the compiled ops of csrc/, through
fastkd/_extension.py). ``"torch"`` is not a row kernel: it runs :mod:`fastkd.reference` under
autograd.

``auto`` picks, by device: CPU tensors -> the C++ CPU kernel (the reference when it is not
built); CUDA tensors -> Triton (the faster of Triton and CUDA as measured; Triton until a GPU
says otherwise), then the CUDA kernel, then the reference. The environment variable
``FASTKD_BACKEND`` (one of the explicit backends) replaces ``auto`` for every call; an explicit
``backend=`` argument still wins over it.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from . import _extension

BACKENDS = ("auto", "triton", "cuda", "cpu", "torch")
KERNEL_BACKENDS = ("triton", "cuda", "cpu")
BACKEND_ENV = "FASTKD_BACKEND"


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def is_available(backend: str, device: torch.device) -> tuple[bool, str]:
    """(available, why not) for an explicit backend on a device."""
    if backend == "torch":
        return True, ""
    if backend == "triton":
        if not triton_available():
            return False, "the triton package is not installed"
        if device.type == "cuda" or (device.type == "cpu" and _interpreting()):
            return True, ""
        return False, (
            f"Triton runs on CUDA tensors (or on CPU tensors under TRITON_INTERPRET=1), "
            f"got {device.type} tensors"
        )
    if backend == "cpu":
        if device.type != "cpu":
            return False, f"the C++ CPU kernel runs on CPU tensors, got {device.type} tensors"
        return _extension.cpu_available()
    if backend == "cuda":
        if device.type != "cuda":
            return False, f"the CUDA kernel runs on CUDA tensors, got {device.type} tensors"
        return _extension.cuda_available()
    return False, f"unknown backend {backend!r}"


def _auto(device: torch.device) -> str:
    if device.type == "cpu":
        return "cpu" if _extension.cpu_available()[0] else "torch"
    if device.type == "cuda":
        if triton_available():
            return "triton"
        if _extension.cuda_available()[0]:
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
    if backend != "torch" and dtype == torch.float64:
        raise ValueError(
            f"{source} computes in float32 and takes float32, bfloat16 or float16 "
            "logits; use backend='torch' for float64"
        )
    return backend


def row_kernel(backend: str):
    """(kd_rows, scale_rows_) of a kernel backend."""
    if backend == "triton":
        from .triton import kd_kernels

        return kd_kernels.kd_rows, kd_kernels.scale_rows_
    if backend in ("cpu", "cuda"):
        return _extension.kd_rows, _extension.scale_rows_
    raise ValueError(f"backend={backend!r} has no row kernel")
