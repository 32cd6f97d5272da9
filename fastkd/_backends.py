"""Which row kernels exist, and which one ``backend="auto"`` picks.

A row kernel has the signature of :func:`fastkd.triton.kd_kernels.kd_rows` (loss per row,
gradient written into a caller's buffer) and a companion ``scale_rows_`` (the backward).
``"torch"`` is not a row kernel: it runs :mod:`fastkd.reference` under autograd.
"""

from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("auto", "triton", "torch")
KERNEL_BACKENDS = ("triton",)


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
    return False, f"unknown backend {backend!r}"


def resolve(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The concrete backend for a call; raises ValueError when an explicit one can't run."""
    if backend == "auto":
        if device.type == "cuda" and dtype != torch.float64 and triton_available():
            return "triton"
        return "torch"
    ok, why = is_available(backend, device)
    if not ok:
        raise ValueError(f"backend={backend!r} is not available: {why}")
    if backend != "torch" and dtype == torch.float64:
        raise ValueError(
            f"backend={backend!r} computes in float32 and takes float32, bfloat16 or float16 "
            "logits; use backend='torch' for float64"
        )
    return backend


def row_kernel(backend: str):
    """(kd_rows, scale_rows_) of a kernel backend."""
    if backend == "triton":
        from .triton import kd_kernels

        return kd_kernels.kd_rows, kd_kernels.scale_rows_
    raise ValueError(f"backend={backend!r} has no row kernel")
