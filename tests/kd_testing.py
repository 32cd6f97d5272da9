"""Shared test helpers: backends to run, random logits, comparison with the reference."""

from __future__ import annotations

import os

import pytest
import torch

import fastkd
from fastkd import _backends

# design.md §2: relative-norm tolerances against the float64 reference.
LOSS_TOL = 1e-5
GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# (backend, device) -> (worst loss error, worst grad error), printed at the end of the run.
WORST_ERRORS: dict[str, tuple[float, float]] = {}


def _kernel_targets():
    """(backend, device, why-not) for every kernel backend of the registry, on each device
    it runs on."""
    has_cuda = torch.cuda.is_available()
    interp = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    for backend in _backends.KERNEL_BACKENDS:
        for device in _backends.REGISTRY[backend].devices:
            if device == "cuda":
                yield backend, device, None if has_cuda else "no CUDA device"
            elif backend == "triton":
                why = None if interp else "TRITON_INTERPRET is not set (a GPU is present)"
                yield backend, device, why
            else:
                yield backend, device, None  # skipped with the registry's reason if unavailable


def kernel_targets():
    """pytest params "backend-device" for the kernel backends; unavailable ones are skipped
    with the reason (shown by -ra)."""
    params = []
    for backend, device, why in _kernel_targets():
        if why is None:
            ok, why_not = _backends.is_available(backend, torch.device(device))
            why = None if ok else why_not
        marks = [pytest.mark.skip(reason=f"{backend} on {device}: {why}")] if why else []
        params.append(pytest.param((backend, device), id=f"{backend}-{device}", marks=marks))
    return params


def make_logits(shape, dtype, device, generator, scale=None):
    """randn scaled by a random factor in [1, 10] (never zeros), rounded to dtype."""
    if scale is None:
        scale = 1.0 + 9.0 * torch.rand((), generator=generator).item()
    x = torch.randn(shape, generator=generator, dtype=torch.float64) * scale
    return x.to(dtype).to(device)


def make_labels(lead_shape, V, mode, generator, device, ignore_index=-100):
    """None, or labels with some / all rows equal to ignore_index."""
    if mode == "none":
        return None
    labels = torch.randint(0, V, lead_shape, generator=generator)
    if mode == "some":
        drop = torch.rand(lead_shape, generator=generator) < 0.4
        labels[drop] = ignore_index
        labels.view(-1)[0] = ignore_index  # at least one ignored row
        if labels.numel() > 1:
            labels.view(-1)[-1] = int(torch.randint(0, V, (), generator=generator))
    elif mode == "all":
        labels.fill_(ignore_index)
    return labels.to(device)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    denom = ref.norm().item()
    diff = (out - ref).norm().item()
    return diff if denom == 0 else diff / denom


def record(key: str, loss_err: float, grad_err: float) -> None:
    old = WORST_ERRORS.get(key, (0.0, 0.0))
    WORST_ERRORS[key] = (max(old[0], loss_err), max(old[1], grad_err))


def grad_weight(loss: torch.Tensor, generator) -> torch.Tensor:
    """grad_output != 1: 3 for a scalar loss, a random positive weight per row for 'none'."""
    if loss.dim() == 0:
        return torch.tensor(3.0, dtype=torch.float64)
    return 0.5 + torch.rand(loss.shape, generator=generator, dtype=torch.float64)


def check_against_reference(student, teacher, labels, backend, generator, **options):
    """Runs fastkd (loss, gradient with grad_output != 1) and the float64 reference on the
    same rounded inputs; asserts design.md §2's tolerances; returns (loss_err, grad_err)."""
    s = student.detach().clone().requires_grad_(True)
    out = fastkd.kd_loss(s, teacher, labels, backend=backend, **options)
    weight = grad_weight(out, generator)
    (out * weight.to(out.device, torch.float32)).sum().backward()

    s64 = student.detach().cpu().double().requires_grad_(True)
    labels64 = None if labels is None else labels.cpu()
    ref, _, _ = fastkd.kd_loss_reference(s64, teacher.cpu().double(), labels64, **options)
    (ref * weight).sum().backward()

    assert out.dtype == torch.float32
    assert s.grad.dtype == student.dtype
    assert torch.isfinite(out).all() and torch.isfinite(s.grad).all()
    loss_err, grad_err = rel_err(out, ref), rel_err(s.grad, s64.grad)
    assert loss_err <= LOSS_TOL, f"loss rel err {loss_err:.3e}"
    assert grad_err <= GRAD_TOL[student.dtype], f"grad rel err {grad_err:.3e}"
    record(f"{backend}-{student.device.type} {str(student.dtype)[6:]}", loss_err, grad_err)
    return loss_err, grad_err
