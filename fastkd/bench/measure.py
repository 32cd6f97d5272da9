"""Clocks, peak memory and the device's own ceilings (copy bandwidth, matmul rate).

Timing: on CUDA, a pair of CUDA events around each call (so the per-call setup, such as
refilling an input that an in-place kernel overwrote, stays outside); on the CPU,
``time.perf_counter`` around each call in this process. Warm-up first, then as many timed
calls as fit a time budget (within a min/max count); the caller takes the median.

Peak memory beyond the inputs, over one call with its outputs held:
- CUDA: ``torch.cuda.max_memory_allocated`` minus the memory allocated before the call.
- CPU: the process's peak resident set size minus its resident size before the call. The
  peak (VmHWM) is reset before the call by writing 5 to /proc/self/clear_refs (Linux >= 4.0)
  and freed heap memory is first handed back with malloc_trim, so the delta is what the call
  touched. Tensors of more than a few MB are mmapped by glibc and unmapped when freed, so for
  the sizes benchmarked this follows the tensors closely. Where /proc is not writable the
  figure is reported as unavailable rather than guessed.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TimingPlan:
    warmup_s: float
    warmup_min_calls: int
    budget_s: float
    min_reps: int
    max_reps: int


def plan_for(device: str, quick: bool) -> TimingPlan:
    """How long to warm up and time. On the CPU the check call before timing is the warm-up
    (same shapes, same buffers), and calls are long, so none is added."""
    if quick:
        return TimingPlan(0.0, 1 if device == "cuda" else 0, 0.05, 3, 5)
    if device == "cuda":
        return TimingPlan(0.05, 3, 0.3, 10, 100)
    return TimingPlan(0.0, 0, 3.0, 3, 20)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_calls(
    call: Callable[[], object],
    reset: Callable[[], None] | None,
    device: str,
    plan: TimingPlan,
) -> tuple[list[float], int | None]:
    """(milliseconds of each timed call, peak memory of the first call in bytes).

    ``reset`` runs untimed before each call. The peak memory is taken around the first call
    made here (a warm-up call on CUDA, the first timed call on the CPU), its setup outside
    the clock.
    """
    peak = None

    def once_host(track: bool = False) -> float:
        nonlocal peak
        if reset is not None:
            reset()
        tracker = PeakMemory(device) if track else None
        synchronize(device)
        start = time.perf_counter()
        out = call()
        synchronize(device)
        elapsed = (time.perf_counter() - start) * 1e3
        if tracker is not None:
            peak = tracker.stop()
        del out
        return elapsed

    if device != "cuda":
        times, started = [], time.perf_counter()
        while len(times) < plan.max_reps and (
            len(times) < plan.min_reps or time.perf_counter() - started < plan.budget_s
        ):
            times.append(once_host(track=not times))
        return times, peak

    calls, started, estimate = 0, time.perf_counter(), []
    while calls < max(plan.warmup_min_calls, 1) or time.perf_counter() - started < plan.warmup_s:
        estimate.append(once_host(track=calls == 0))
        calls += 1
    per_call_s = max(statistics.median(estimate) / 1e3, 1e-6)
    reps = int(min(plan.max_reps, max(plan.min_reps, plan.budget_s / per_call_s)))
    events = []
    for _ in range(reps):
        if reset is not None:
            reset()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = call()
        end.record()
        del out
        events.append((start, end))
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in events], peak


# --- peak memory ------------------------------------------------------------------------


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def _malloc_trim() -> None:
    name = ctypes.util.find_library("c")
    if name:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(name).malloc_trim(0)


def cpu_peak_supported() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _proc_status_kib("VmHWM")
        return True
    except OSError:
        return False


class PeakMemory:
    """Bytes allocated at the peak between construction and :meth:`stop`, beyond what was
    allocated at construction (None where the CPU figure can't be read)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.before = None
        gc.collect()
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
        elif cpu_peak_supported():
            _malloc_trim()
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.before = _proc_status_kib("VmRSS")

    def stop(self) -> int | None:
        if self.before is None:
            return None
        if self.device == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.before
        return max(_proc_status_kib("VmHWM") - self.before, 0) * 1024


# --- the device's ceilings ---------------------------------------------------------------


def _median_ms(fn: Callable[[], object], device: str, reps: int) -> float:
    fn()
    synchronize(device)
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            start_s = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start_s) * 1e3)
    return statistics.median(times)


def copy_bandwidth(device: str, quick: bool = False) -> float:
    """Bytes per second of a large device-to-device copy, counting bytes read plus written."""
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        nbytes = min(2 << 30, free // 8)
        reps = 20
    else:
        nbytes = (32 << 20) if quick else (256 << 20)
        reps = 5
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src), device, reps)
    return 2 * nbytes / (ms / 1e3)


def matmul_rate(device: str, dtype: torch.dtype, quick: bool = False) -> float:
    """FLOP/s of a large square matrix product in the given dtype, on random data."""
    n = 8192 if device == "cuda" else (256 if quick else 1536)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    ms = _median_ms(lambda: a @ b, device, 10 if device == "cuda" else 3)
    return 2 * n**3 / (ms / 1e3)
