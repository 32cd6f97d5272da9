"""Peak memory of one distillation loss step from hidden states (LM heads, loss, backward),
with full logits and with ``fastkd.FusedLinearKDLoss``: the printout of
``hf_trainer_distill.py --fused-linear``.

Measured by ``fastkd.bench.measure.PeakMemory`` as the peak above the memory held before the
step (its inputs): the CUDA allocator's peak on a GPU; on CPU the process's peak resident set
size, which Linux resets on request (``/proc/self/clear_refs``). The figures include the
gradient of the student's LM-head weight (V x H), which every path allocates. The plain
formula is ``fastkd.bench.formulas``'s, the one every benchmark compares with.
"""

from __future__ import annotations

import torch

import fastkd
from fastkd.bench.formulas import fused_linear_formula
from fastkd.bench.measure import PeakMemory

MiB = 2**20


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
        fused_linear_formula(h_s, w_s, h_t, w_t, labels, **options).backward()

    def logits_kdloss():
        fastkd.kd_loss(h_s @ w_s.T, h_t @ w_t.T, labels, **options).backward()

    # Which kernel KDLoss runs here (the C++ kernel on CPU, Triton on CUDA when "auto").
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
            with PeakMemory(device) as peak:
                step()
            results[vocab, name] = peak.bytes
            shown = "unmeasured here" if peak.bytes is None else f"{peak.bytes / MiB:8.1f} MiB"
            print(f"    {name:<40} {shown}")
    return results
