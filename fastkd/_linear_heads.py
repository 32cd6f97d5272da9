"""An LM head for the fused paths: its argument checks, its matmuls with float32 results,
and the size of the row chunks it is run in (design.md §3 "Fused linear").

FusedLinearKDLoss (the student's and the teacher's heads) and the top-k producer (the
teacher's) share it: the logits of a chunk of rows are computed here, never all N x V.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from ._config import check_float_tensor

# --- checks --------------------------------------------------------------------------------


def check_head(prefix: str, hidden, weight, bias) -> None:
    """One model's (hidden, weight, bias): types and shapes; dtypes are checked later,
    after autocast has had its say."""
    names = (f"{prefix}hidden", f"{prefix}weight", f"{prefix}bias")
    for name, x in zip(names, (hidden, weight, bias), strict=True):
        if x is not None or not name.endswith("bias"):
            check_float_tensor(name, x)
    if hidden.dim() == 0:
        raise ValueError(f"{names[0]} must have a hidden dimension, got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"{names[1]} must be (V, H), got shape {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{names[1]} has hidden size {weight.shape[1]} (dim 1) but {names[0]} has "
            f"{hidden.shape[-1]} (last dim)"
        )
    for name, x in zip(names[1:], (weight, bias), strict=True):
        if x is not None and x.device != hidden.device:
            raise ValueError(
                f"{name} must be on {names[0]}'s device {hidden.device}, got {x.device}"
            )


def check_bias(prefix: str, weight, bias) -> None:
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(
            f"{prefix}bias must have shape ({weight.shape[0]},) (the vocabulary of "
            f"{prefix}weight), got {tuple(bias.shape)}"
        )


def check_head_dtypes(prefix: str, hidden, weight, bias) -> None:
    # nn.Linear's rule: the input, weight and bias share a dtype (outside autocast).
    for name, x in ((f"{prefix}weight", weight), (f"{prefix}bias", bias)):
        if x is not None and x.dtype != hidden.dtype:
            raise TypeError(
                f"{name} has dtype {x.dtype} but {prefix}hidden has {hidden.dtype}; they must "
                "match, as for nn.Linear (or run under torch.autocast)"
            )


def check_chunking(chunk_size, memory_budget) -> None:
    for name, value in (("chunk_size", chunk_size), ("memory_budget", memory_budget)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int or None, got {type(value).__name__}")
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


# --- matmuls with float32 accumulation and results ----------------------------------------


def wide_dtype(dtype: torch.dtype) -> torch.dtype:
    """The logits' dtype: float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@functools.cache
def _cuda_out_dtype(kind: str, device: torch.device) -> bool:
    """Whether this torch's CUDA mm / in-place addmm take bf16 operands with float32 output
    (``out_dtype``, torch >= 2.8; addmm into a float32 accumulator in later versions).
    Probed once on tiny tensors, checked against the float32 product."""
    a = torch.ones(2, 2, device=device, dtype=torch.bfloat16)
    try:
        if kind == "mm":
            out = torch.mm(a, a, out_dtype=torch.float32)
        else:
            out = torch.ones(2, 2, device=device, dtype=torch.float32)
            torch.addmm(out, a, a, out_dtype=torch.float32, out=out)
    except (TypeError, RuntimeError, NotImplementedError):
        return False
    expected = 2.0 if kind == "mm" else 3.0
    return out.dtype == torch.float32 and bool((out == expected).all())


class Head:
    """One model's LM head for one call: (N, H) hidden rows, weight (V, H), bias (V,)."""

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Tensor | None) -> None:
        self.hidden = hidden.reshape(-1, hidden.shape[-1])
        self.weight = weight
        self.wide = wide_dtype(weight.dtype)
        low = weight.dtype != self.wide
        # bf16/fp16: on CUDA the matmul writes float32 from low-precision operands; elsewhere
        # (CPU) the weight is upcast once per call: V x H x 4 more bytes, never per chunk.
        self.native_low = low and weight.is_cuda and _cuda_out_dtype("mm", weight.device)
        self.weight_op = weight.to(self.wide) if low and not self.native_low else weight
        self.bias = None if bias is None else bias.to(self.wide)

    def rows(self, index) -> Tensor:
        return self.hidden[index].to(self.weight_op.dtype)

    def logits(self, h: Tensor) -> Tensor:
        """(rows, V) logits of hidden rows h (already in weight_op's dtype)."""
        w_t = self.weight_op.t()
        if self.native_low:
            out = torch.mm(h, w_t, out_dtype=torch.float32)
            return out if self.bias is None else out.add_(self.bias)
        if self.bias is None:
            return torch.mm(h, w_t)
        return torch.addmm(self.bias, h, w_t)

    def grad_hidden(self, g: Tensor) -> Tensor:
        """g (rows, V) @ weight, in the hidden's dtype (low-precision operands on CUDA)."""
        if self.native_low:
            return torch.mm(g.to(self.weight.dtype), self.weight)
        return torch.mm(g, self.weight_op).to(self.hidden.dtype)

    def accumulate_grad_weight_(self, acc: Tensor, g: Tensor, h: Tensor) -> None:
        """acc (V, H, float32) += g.T @ h."""
        if not self.native_low:
            acc.addmm_(g.t(), h)
            return
        g_low = g.to(self.weight.dtype).t()
        if _cuda_out_dtype("addmm", acc.device):
            torch.addmm(acc, g_low, h, out_dtype=torch.float32, out=acc)
        else:
            # Older torch: a float32 product per chunk (a transient V x H float32 buffer).
            acc.add_(torch.mm(g_low, h, out_dtype=torch.float32))


def autocast_cast(device: torch.device, tensors: tuple) -> tuple:
    """nn.Linear under autocast: floating inputs (not float64) cast to the autocast dtype."""
    if not torch.is_autocast_enabled(device.type):
        return tensors
    dtype = torch.get_autocast_dtype(device.type)
    return tuple(x.to(dtype) if x is not None and x.dtype != torch.float64 else x for x in tensors)


# Default budget for a chunk's working set when neither chunk_size nor memory_budget is
# given: on CPU a fixed one (RAM is not a device to ask). 256 MiB is a few hundred rows at
# V = 32000 on the kernel path, enough for the CPU matmuls' full speed: at N=2048, H=1024,
# V=32000 it measured as fast as 1 GiB (within noise) with 0.5 GB less peak RSS. On CUDA
# this fraction of the free memory (the driver's, plus what torch's allocator holds unused).
CPU_MEMORY_BUDGET = 256 << 20
CUDA_FREE_FRACTION = 0.25


def default_budget(device: torch.device) -> int:
    """Bytes a chunk's working set may take when the caller gives no budget."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int((free + cached) * CUDA_FREE_FRACTION)
    return CPU_MEMORY_BUDGET


def chunk_rows(n_rows, V, logits_dtype, row_floats, chunk_size, memory_budget, device) -> int:
    """Rows per chunk: ``chunk_size`` and ``memory_budget`` each cap it; with neither, the
    device's default budget does. The budget covers ``row_floats`` logits-sized buffers of the
    chunk (floats per element of its (rows, V) logits, in ``logits_dtype``)."""
    if chunk_size is None and memory_budget is None:
        memory_budget = default_budget(device)
    rows = max(n_rows, 1)
    if memory_budget is not None:
        per_row = V * row_floats * torch.finfo(logits_dtype).bits // 8
        rows = min(rows, max(memory_budget // per_row, 1))
        if rows >= 64:
            rows -= rows % 64  # whole tiles for the matmuls
    if chunk_size is not None:
        rows = min(rows, chunk_size)
    return rows
