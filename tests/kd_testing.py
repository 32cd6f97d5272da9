"""Shared test helpers: backends to run, random logits, comparison with the reference."""

from __future__ import annotations

import math
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
    # int64 for the oracle: narrow label dtypes are the backend's to handle, not its.
    labels64 = None if labels is None else labels.cpu().long()
    ref, _, _ = fastkd.kd_loss_reference(s64, teacher.cpu().double(), labels64, **options)
    (ref * weight).sum().backward()

    assert out.dtype == torch.float32
    assert s.grad.dtype == student.dtype
    assert torch.isfinite(out).all() and torch.isfinite(s.grad).all()
    loss_err, grad_err = rel_err(out, ref), rel_err(s.grad, s64.grad)
    assert loss_err <= LOSS_TOL, f"loss rel err {loss_err:.3e}"
    assert grad_err <= GRAD_TOL[student.dtype], f"grad rel err {grad_err:.3e}"
    if student.dtype != torch.float32:
        worst = half_grad_ulps(s.grad, s64.grad, student, teacher, labels, weight, **options)
        allowed = half_ulps_allowed(backend, student.device, student.dtype)
        assert worst <= allowed, f"a gradient entry {worst:.2f} ulps of {student.dtype} off"
    record(f"{backend}-{student.device.type} {str(student.dtype)[6:]}", loss_err, grad_err)
    return loss_err, grad_err


# --- dtype-tied and conditioning-aware tolerances -------------------------------------------

EPS32 = torch.finfo(torch.float32).eps
TINY32 = torch.finfo(torch.float32).tiny


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype`` at each |x| (float64): 2^(exponent of x) * eps, and the
    subnormal spacing (tiny * eps) below the normal range."""
    info = torch.finfo(dtype)
    mag = x.double().abs().clamp_min(info.tiny)
    _, exponent = torch.frexp(mag)  # mag = m * 2^exponent, m in [0.5, 1)
    return torch.ldexp(torch.full_like(mag, info.eps), exponent - 1)


def ulps_off(out: torch.Tensor, ref: torch.Tensor, floor: torch.Tensor | float = 0.0):
    """Per entry, how many ulps of out's dtype |out - ref| exceeds ``floor`` by (float64,
    0 within it). The ulp is the larger of those at |out| and |ref|: an answer just below a
    power of two that rounds up to it is measured in the spacing above."""
    out64, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    spacing = torch.maximum(ulp(out64, out.dtype), ulp(ref, out.dtype))
    excess = ((out64 - ref).abs() - torch.as_tensor(floor, dtype=torch.float64)).clamp_min(0)
    return excess / spacing


def float32_noise(student, teacher, labels=None, grad_output=None, *, divergence="forward_kl",
                  temperature=1.0, softcap=None, kd_weight=1.0, ce_weight=0.0,
                  scale_by_temperature_squared=True, reduction="mean", num_items_in_batch=None,
                  ignore_index=-100, beta=0.5, alpha=0.1, **_):  # fmt: skip
    """What float32 arithmetic cannot resolve, per loss entry and per gradient entry
    (float64, shaped like the loss and like the student): (loss_scale, grad_scale,
    grad_sign_ambiguity).

    A handful of float32 roundings of a row's terms, each relative eps32 of the term, moves
    the result by eps32 times the sum of the terms' magnitudes, whatever the result's own
    size: a loss near 0 (p = q, or a mixture weight near an end) is as uncertain in absolute
    terms as a large one. The scales are those sums, times the loss's coefficients:
      per entry k:  W_k = (p_k + q_k) (2 + |a_k| + |b_k| + |log p_k| + |log q_k| + |log w|
                    + |log(1 - w)|)   (a = s/T, b = t/T, the logits softcapped; w the
                    mixture weight)
      loss row:     |kd coefficient| sum_k W_k + |ce_weight| (2 + max|s| + |s_y| + log V)
      gradient j:   |kd coefficient| / T c_j (W_j + (p_j + q_j) sum_k W_k)
                    + |ce_weight| c_j softmax(s)_j (2 + |s_j| + max|s| + log V)
    each times the reduction's factor and grad_output; c_j = 1 without a softcap, and
    cap'_j + 4 with one (cap' = 1 - (s_capped / c)^2 is 1 - x^2 with x near 1 for a
    saturated logit: a few eps32 off in absolute terms however small it is). A caller's
    tolerance is C eps32 scale, C a small count of roundings (FLOOR_ROUNDINGS, measured by
    tests/test_fuzz.py).

    TVD's gradient is ½ sign(q - p) through the softmax: where |q_j - p_j| is within
    float32's noise the sign is a coin toss, and a flip moves the gradient by q_j (e_j - q)
    times the coefficient, not by an eps. ``grad_sign_ambiguity`` is that amount (zeros for
    the other divergences).
    """
    V = student.shape[-1]
    s = student.detach().cpu().double().reshape(-1, V)
    t = teacher.detach().cpu().double().reshape(-1, V)
    n_rows = s.shape[0]
    dcap = torch.ones_like(s)
    if softcap is not None:
        s, t = softcap * torch.tanh(s / softcap), softcap * torch.tanh(t / softcap)
        dcap = 1 - (s / softcap) ** 2
    dcap_noise = dcap + 4 if softcap is not None else dcap
    a, b = s / temperature, t / temperature
    log_q, log_p = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
    q, p = log_q.exp(), log_p.exp()
    w = beta if divergence == "jsd" else alpha
    mixes = divergence == "jsd" or divergence.startswith("skew")
    mix_logs = abs(math.log(w)) + abs(math.log1p(-w)) if mixes else 0.0
    live = (p + q) > 0

    def finite(x):
        return torch.where(live & torch.isfinite(x), x.abs(), 0.0)

    W = torch.where(
        live,
        (p + q) * (2 + finite(a) + finite(b) + finite(log_p) + finite(log_q) + mix_logs),
        0.0,
    )
    W_row = W.sum(-1)

    keep = torch.ones(n_rows, dtype=torch.bool)
    if labels is not None:
        keep = labels.detach().cpu().reshape(-1) != ignore_index
    has_ce = labels is not None and ce_weight != 0
    t2 = temperature**2 if scale_by_temperature_squared else 1.0
    kd_coef = abs(kd_weight) * t2

    if reduction in ("sum", "none"):
        factor = 1.0
    elif reduction == "batchmean":
        factor = 1.0 / max(student.shape[0] if student.dim() > 1 else V, 1)
    else:
        count = float(num_items_in_batch) if num_items_in_batch is not None else float(keep.sum())
        factor = 1.0 / (count if count != 0 else 1.0)
    go = torch.ones(n_rows, dtype=torch.float64)
    if grad_output is not None:
        go = go * grad_output.detach().cpu().double().reshape(-1).abs()

    loss_rows = kd_coef * W_row
    sm = torch.softmax(s, -1)
    s_abs = torch.where(torch.isfinite(s), s.abs(), 0.0)
    s_max = s_abs.max(-1).values
    log_v = math.log(V)
    grad_ce = torch.zeros_like(s)
    if has_ce:
        y = torch.where(keep, labels.detach().cpu().reshape(-1).long(), 0).clamp(0, V - 1)
        s_y = s_abs.gather(-1, y[:, None])[:, 0]
        loss_rows = loss_rows + abs(ce_weight) * (2 + s_max + s_y + log_v)
        grad_ce = abs(ce_weight) * dcap_noise * sm * (2 + s_abs + s_max[:, None] + log_v)
    grad_kd = kd_coef / temperature * dcap_noise * (W + (p + q) * W_row[:, None])
    ambiguity = torch.zeros_like(s)
    if divergence == "tvd":
        # Within 64 eps32 W of equal: more than a few roundings, so a flip can't hide in it.
        amb = torch.where((q - p).abs() <= 64 * EPS32 * W, q, 0.0)
        ambiguity = kd_coef / temperature * dcap * (amb + q * amb.sum(-1, keepdim=True))

    keep64 = keep.double()
    loss_rows = loss_rows * factor * keep64
    row_scale = (factor * go * keep64)[:, None]
    grad_scale = (grad_kd + grad_ce) * row_scale
    # Subnormal float32 (below tiny32 = 1.2e-38) has lost its relative precision, and a GPU
    # flushes it to 0 (FTZ): an entry whose float32 intermediates fall there is off by up
    # to a few tiny32 whatever its terms (a Triton bf16 gradient entry of -7.9e-39 for the
    # reference's -1.2e-40). In units of eps32, as the rest of the scale.
    grad_scale = (grad_scale + 4 * TINY32 / EPS32 * keep64[:, None]).reshape(student.shape)
    ambiguity = (ambiguity * row_scale).reshape(student.shape)
    loss_scale = loss_rows.reshape(student.shape[:-1]) if reduction == "none" else loss_rows.sum()
    return loss_scale, grad_scale, ambiguity


FUZZ_SEED_ENV = "FASTKD_FUZZ_SEED"
FUZZ_DEFAULT_SEED = 20240611


def fuzz_seed() -> int:
    """tests/test_fuzz.py's seed: $FASTKD_FUZZ_SEED, a fresh one for "random" (kept for the
    process, so collection and the run agree), else a fixed one so that CI is repeatable."""
    value = os.environ.get(FUZZ_SEED_ENV, "").strip()
    if value == "random":
        value = str(int.from_bytes(os.urandom(4), "little"))
        os.environ[FUZZ_SEED_ENV] = value
    return int(value) if value else FUZZ_DEFAULT_SEED


# Half-precision gradients, per entry, tied to the dtype (design.md's 1e-2 of the norm lets a
# float16 gradient be ~20 ulps off, and a bf16 one ~2.5): within HALF_ULPS ulps of the
# float64 gradient beyond the float32 floor (float32_noise, FLOOR_ROUNDINGS eps32); the ulp
# is the dtype's spacing at the answer. One rounding of a float32-exact gradient is 0.5 ulp
# (the "torch" backend: 0.50 measured). The kernels round the gradient, and the backward
# rounds its product with grad_output g (for float16 under mean/batchmean, g times the
# deferred reduction factor): at most (g + 1) / 2 ulps, 2 at the tests' g of 3, reached
# where the stored gradient is float16-subnormal (a spacing that does not shrink with it).
# Measured by tests/test_fuzz.py over 20 seeds x 300 cases: 1.80 (C++ kernel, fp16,
# skew_forward_kl), 1.36 for bf16.
HALF_ULPS = 2.0
# The Triton interpreter (triton 3.8) converts float32 to bfloat16 by truncation (compiled
# Triton rounds to nearest): under 1 ulp per conversion, so under 3 ulps at g <= 2 or in
# the normal range; 2.81 measured (5 seeds' Triton cases, forward_kl).
INTERPRETER_BF16_ULPS = 3.0
# C of the float32 floor C eps32 (sum of the terms' magnitudes), see float32_noise. Over 20
# seeds x 300 fuzz cases on the C++ kernel and the reference, and 5 seeds' Triton cases, the
# largest C any case needed beyond design.md's relative tolerances was 0.095 for a loss and
# 1.71 for a gradient (float16 forward_kl, the C++ kernel).
FLOOR_ROUNDINGS = 4.0


def half_ulps_allowed(backend: str, device, dtype: torch.dtype) -> float:
    device = torch.device(device)
    interpreted = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if backend == "triton" and device.type == "cpu" and interpreted and dtype == torch.bfloat16:
        return INTERPRETER_BF16_ULPS
    return HALF_ULPS


def half_grad_ulps(grad, ref_grad, student, teacher, labels, grad_output, **options) -> float:
    """The worst entry of a half-precision gradient, in ulps of its dtype beyond the float32
    floor."""
    options = {k: v for k, v in options.items() if k not in ("backend", "inplace_backward")}
    _, grad_scale, ambiguity = float32_noise(student, teacher, labels, grad_output, **options)
    floor = FLOOR_ROUNDINGS * EPS32 * grad_scale + ambiguity
    ulps = ulps_off(grad, ref_grad, floor)
    return ulps.max().item() if ulps.numel() else 0.0
