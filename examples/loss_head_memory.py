"""Peak memory of one distillation loss step from hidden states (LM heads, loss, backward),
with full logits and with ``fastkd.FusedLinearKDLoss``: the printout of
``hf_trainer_distill.py --fused-linear``.

Measured as the peak above the memory held before the step (its inputs): the CUDA
allocator's peak on a GPU; on CPU the process's peak resident set size, which Linux resets
on request (``/proc/self/clear_refs``). The figures include the gradient of the student's
LM-head weight (V x H), which every path allocates.
"""

from __future__ import annotations

import gc
from collections.abc import Callable

import torch
import torch.nn.functional as F

import fastkd

MiB = 2**20


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{field} not in /proc/self/status")


def peak_bytes(step: Callable[[], None], device: torch.device) -> int | None:
    """Peak memory ``step()`` adds over what is held when it starts; None where unmeasurable."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
        before = _rss_bytes("VmRSS")
        step()
        return _rss_bytes("VmHWM") - before
    except OSError:
        return None


def loss_head_steps(n_rows, student_hidden, teacher_hidden, vocab, temperature, device):
    """{name: step} for the paths compared; each step runs forward and backward."""
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, scale=1.0, grad=False):
        x = torch.randn(*shape, generator=gen, device=device) * scale
        return x.requires_grad_(grad)

    h_s = randn(n_rows, student_hidden, grad=True)
    w_s = randn(vocab, student_hidden, scale=student_hidden**-0.5, grad=True)
    h_t = randn(n_rows, teacher_hidden)
    w_t = randn(vocab, teacher_hidden, scale=teacher_hidden**-0.5)
    labels = torch.randint(0, vocab, (n_rows,), generator=gen, device=device)
    options = dict(temperature=temperature, ce_weight=0.5, kd_weight=0.5)

    def plain():
        s, t = h_s @ w_s.T, h_t @ w_t.T
        kl = F.kl_div(
            F.log_softmax(s / temperature, -1),
            F.log_softmax(t / temperature, -1),
            reduction="batchmean",
            log_target=True,
        )
        loss = 0.5 * temperature**2 * kl + 0.5 * F.cross_entropy(s, labels)
        loss.backward()

    def logits_kdloss():
        fastkd.kd_loss(h_s @ w_s.T, h_t @ w_t.T, labels, **options).backward()

    # Which kernel KDLoss runs here (on CPU the PyTorch reference, until a CPU kernel exists).
    backend = fastkd._backends.resolve("auto", device, torch.float32)
    fused_loss = fastkd.FusedLinearKDLoss(**options)

    def fused():
        fused_loss(h_s, w_s, h_t, w_t, labels).backward()

    steps = {
        "plain formula on full logits": plain,
        f"fastkd.KDLoss ({backend}) on full logits": logits_kdloss,
        "fastkd.FusedLinearKDLoss": fused,
    }
    return steps, (h_s, w_s)


def print_memory_report(
    *, n_rows, student_hidden, teacher_hidden, vocab_sizes, temperature, device=None
) -> dict:
    """Prints (and returns) {(vocab, path): peak bytes} for one loss step of n_rows tokens."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    where = "CUDA allocator peak" if device.type == "cuda" else "peak RSS"
    print(
        f"memory of one loss step, {n_rows} tokens, H_s={student_hidden}, H_t={teacher_hidden} "
        f"({where} above its inputs):"
    )
    results = {}
    for vocab in vocab_sizes:
        logits_mib = n_rows * vocab * 4 / MiB
        print(f"  V={vocab}: one float32 N x V logits tensor is {logits_mib:.1f} MiB")
        steps, params = loss_head_steps(
            n_rows, student_hidden, teacher_hidden, vocab, temperature, device
        )
        for name, step in steps.items():
            for p in params:
                p.grad = None
            peak = peak_bytes(step, device)
            results[vocab, name] = peak
            shown = "unmeasured here" if peak is None else f"{peak / MiB:8.1f} MiB"
            print(f"    {name:<40} {shown}")
    return results
