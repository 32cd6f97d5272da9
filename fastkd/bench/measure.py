"""The measurement toolkit: clocks, peak memory, the device's ceilings and its name.

Everything in the repository that times a call or measures its memory takes it from here:
``python -m fastkd.bench`` (harness.py), the scripts and suites in ``benchmarks/``,
``examples/loss_head_memory.py`` and the memory test in ``tests/test_fused_linear.py``.

Clocks
------
- :func:`time_call`: one call on the host clock (``time.perf_counter``), the device
  synchronised before and after. The scripts' calls take milliseconds to seconds.
- :func:`time_calls`: the harness's loop. On CUDA, a pair of CUDA events around each call
  (host-side launch gaps between calls stay out); on the CPU, :func:`time_call`. Warm-up
  first, then as many timed calls as fit a time budget (within a min/max count); each call's
  time is returned and the caller takes the median and quartiles. An optional ``reset``
  runs before each call, outside the clock.
- :func:`median_ms`: ``torch.utils.benchmark.Timer.blocked_autorange``, for calls that need
  nothing between them (the ceilings below), on either device (Timer's clock synchronises
  the accelerator at the ends of each block).

Why the per-call loops are not ``torch.utils.benchmark.Timer`` (CPU) or
``triton.testing.do_bench`` (GPU):

- The in-place variant (``inplace_backward=True``) writes its gradient over its input, so
  every call needs fresh inputs, refilled outside the clock (an N x V random fill costs about
  as much as the kernel). Timer times blocks of back-to-back calls of one statement, its
  setup runs once per measurement, and ``Timer.timeit`` adds two untimed calls to each;
  ``do_bench`` has no per-call setup at all (``grad_to_none`` only).
- The peak memory is read around the first call of the same loop, with its setup outside.
- ``benchmarks/cpu_kernel_vs_torch.py`` alternates its implementations call by call, so
  that a shared machine's slow drift falls on all of them alike; both libraries time one
  callable at a time.
- ``do_bench`` needs Triton's GPU driver, which fastkd's CUDA kernel does not (and it clears
  the L2 cache before each call, which the events loop does not: every row of one table is
  timed the same way). The inputs here are far larger than the L2 cache anyway.

Peak memory (:class:`PeakMemory`)
---------------------------------
Bytes at the peak between start and stop, beyond what was in use at start:

- CUDA: ``torch.cuda.max_memory_allocated`` (reset at start) minus the memory allocated at
  start.
- CPU: the process's peak resident set size minus its resident size at start. The peak
  (VmHWM) is reset at start by writing 5 to /proc/self/clear_refs (Linux >= 4.0), and freed
  heap memory is first handed back with malloc_trim, so the delta is what the measured code
  touched. Tensors of more than a few MB are mmapped by glibc and unmapped when freed, so
  for the sizes benchmarked this follows the tensors closely. ``resource.getrusage``'s
  ``ru_maxrss`` is not used: it cannot be reset, and a child process inherits its parent's
  figure through fork and exec. Where /proc is not writable the figure is None (reported as
  unavailable), never guessed.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.utils.benchmark

Device = str | torch.device


def _is_cuda(device: Device) -> bool:
    return torch.device(device).type == "cuda"


def synchronize(device: Device) -> None:
    if _is_cuda(device):
        torch.cuda.synchronize(device)


# --- clocks ------------------------------------------------------------------------------


def time_call(call: Callable[[], object], device: Device) -> tuple[float, object]:
    """(milliseconds, result) of one call: host clock, the device synchronised around it."""
    synchronize(device)
    start = time.perf_counter()
    out = call()
    synchronize(device)
    return (time.perf_counter() - start) * 1e3, out


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
        elapsed, out = time_call(call, device)
        if tracker is not None:
            peak = tracker.stop()
        del out
        return elapsed

    if not _is_cuda(device):
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
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) for start, end in events], peak


def median_ms(fn: Callable[[], object], min_run_time: float) -> float:
    """Median milliseconds per call of ``fn`` (no setup between calls), by
    ``torch.utils.benchmark.Timer.blocked_autorange`` on this process's threads."""
    timer = torch.utils.benchmark.Timer(
        stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()
    )
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


# --- peak memory ------------------------------------------------------------------------


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM, the peak RSS, becomes the current RSS


def _malloc_trim() -> None:
    name = ctypes.util.find_library("c")
    if name:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(name).malloc_trim(0)


def cpu_peak_supported() -> bool:
    try:
        _reset_peak_rss()
        _proc_status_kib("VmHWM")
        return True
    except OSError:
        return False


class PeakMemory:
    """Bytes in use at the peak between construction and :meth:`stop`, beyond those in use
    at construction (see the module's docstring). As a context manager it stops on exit::

        with PeakMemory(device) as mem:
            step()
        mem.bytes  # the peak beyond the start; None where it can't be measured

    ``before`` and ``peak`` are the absolute figures (RSS on the CPU, allocated on CUDA).
    """

    def __init__(self, device: Device) -> None:
        self.device = torch.device(device)
        self.before: int | None = None
        self.peak: int | None = None
        self.bytes: int | None = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
        elif self.device.type == "cpu" and cpu_peak_supported():
            _malloc_trim()
            _reset_peak_rss()
            self.before = _proc_status_kib("VmRSS") * 1024

    def stop(self) -> int | None:
        if self.before is None:
            return None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.peak = _proc_status_kib("VmHWM") * 1024
        self.bytes = max(self.peak - self.before, 0)
        return self.bytes

    def __enter__(self) -> PeakMemory:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# --- the device: its name and its ceilings -------------------------------------------------


def device_name(device: Device) -> str:
    """'cuda: <card>' or 'cpu: <model> (<n> threads)'."""
    if _is_cuda(device):
        return f"cuda: {torch.cuda.get_device_name(device)}"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    return f"cpu: {model} ({torch.get_num_threads()} threads)"


def copy_bandwidth(device: str, quick: bool = False) -> float:
    """Bytes per second of a large device-to-device copy, counting bytes read plus written."""
    if _is_cuda(device):
        free, _ = torch.cuda.mem_get_info()
        nbytes = min(2 << 30, free // 8)
    else:
        nbytes = (32 << 20) if quick else (256 << 20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), 0.05 if quick else 0.3)
    return 2 * nbytes / (ms / 1e3)


def matmul_rate(device: str, dtype: torch.dtype, quick: bool = False) -> float:
    """FLOP/s of a large square matrix product in the given dtype, on random data."""
    n = 8192 if _is_cuda(device) else (256 if quick else 1536)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    ms = median_ms(lambda: a @ b, 0.05 if quick else 0.3)
    return 2 * n**3 / (ms / 1e3)
