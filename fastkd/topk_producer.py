"""The teacher's top-k log-probabilities, exact over its whole vocabulary (design.md §4
"Producer").

:func:`topk_logprobs` takes the teacher's logits; :func:`topk_logprobs_from_hidden` takes its
last hidden states and LM head and never holds the N x V logits. Both return a
:class:`fastkd.TopKTeacher` whose ``logprobs`` are ``log_softmax(a)`` at the top-k of ``a``,
with ``a = softcap * tanh(logits / softcap) / temperature`` (the soft cap first, as the
losses apply it), taken over the whole vocabulary:

- per chunk of rows, ``a`` is formed in float32 (float64 for float64 inputs), its
  ``logsumexp`` and its ``topk`` are taken, and ``topk - logsumexp`` is kept: no softmax is
  ever materialised, only one chunk's ``a`` (and torch's temporaries for its logsumexp and
  topk);
- the top-k are those of ``a``, so of the log-probabilities too (the order is the same),
  sorted by decreasing log-probability; among tied values the order is torch.topk's;
- ``token_ids`` are int64 (torch.topk's, what ``gather`` takes), ``logprobs`` float32, or
  float64 for float64 inputs; ``mask`` is None (every entry is real);
- everything runs under ``torch.no_grad()`` and with autocast off (the teacher is a
  constant): the results never require grad.

The hidden-state producer computes each chunk's logits with float32 accumulation into a
float32 result, as :class:`fastkd.FusedLinearKDLoss` does (its ``Head``): on CUDA bf16/fp16
operands go to the matmul as they are where torch can write float32 from them; elsewhere a
bf16/fp16 weight is upcast to float32 once per call (V x H x 4 bytes).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._config import check_float_tensor, check_number, check_temperature
from ._linear_heads import (
    Head,
    autocast_cast,
    check_bias,
    check_chunking,
    check_head,
    check_head_dtypes,
    chunk_rows,
    wide_dtype,
)
from .topk import TopKTeacher

# Wide floats per element of a chunk's (rows, V) working set: the chunk's scaled logits,
# plus room for torch's temporaries (logsumexp's exp buffer; a full sort's values and int64
# indices when CUDA's topk sorts for a large k).
PRODUCER_ROW_FLOATS = 4


def topk_logprobs(
    logits: Tensor,
    k: int,
    temperature: float = 1.0,
    softcap: float | None = None,
    *,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
) -> TopKTeacher:
    """The top-``k`` log-probabilities of ``logits`` (..., V) at ``temperature``, exact over
    the whole vocabulary: a TopKTeacher with (..., k) int64 ``token_ids`` and float32
    ``logprobs`` (float64 for float64 logits), sorted by decreasing log-probability.

    Equals ``F.log_softmax(softcap * tanh(logits / softcap) / temperature, -1).topk(k)``
    (without the soft cap when ``softcap`` is None) computed in float32, but only one chunk
    of rows is widened and transformed at a time: ``chunk_size`` caps the rows per chunk,
    ``memory_budget`` (bytes) the chunk's working set; with neither, a quarter of the free
    CUDA memory or 256 MiB on CPU. ``logits`` is never modified.
    """
    check_float_tensor("logits", logits)
    if logits.dim() == 0:
        raise ValueError("logits must have a vocabulary dimension (..., V), got a 0-d tensor")
    V = logits.shape[-1]
    k, temperature, softcap = _check_options(k, V, "logits' last dim", temperature, softcap)
    check_chunking(chunk_size, memory_budget)
    lead = logits.shape[:-1]
    rows = logits.reshape(-1, V)
    wide = wide_dtype(logits.dtype)
    n_rows = rows.shape[0]
    chunk = chunk_rows(
        n_rows, V, wide, PRODUCER_ROW_FLOATS, chunk_size, memory_budget, logits.device
    )
    ids = torch.empty((n_rows, k), dtype=torch.int64, device=logits.device)
    lps = torch.empty((n_rows, k), dtype=wide, device=logits.device)
    with torch.no_grad(), torch.autocast(logits.device.type, enabled=False):
        for start in range(0, n_rows, chunk):
            part = slice(start, min(start + chunk, n_rows))
            x = rows[part]
            z = x.to(wide)
            owned = z.data_ptr() != x.data_ptr()  # a copy: free to transform in place
            _topk_rows(z, owned, k, temperature, softcap, ids[part], lps[part])
    return TopKTeacher(ids.view(*lead, k), lps.view(*lead, k))


@torch.compiler.disable  # a Python loop over chunks: run eagerly under torch.compile
def topk_logprobs_from_hidden(
    hidden: Tensor,
    weight: Tensor,
    k: int,
    bias: Tensor | None = None,
    *,
    temperature: float = 1.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
) -> TopKTeacher:
    """:func:`topk_logprobs` of ``hidden @ weight.T (+ bias)``, chunk by chunk of rows,
    never holding the N x V logits.

    ``hidden`` (..., H), ``weight`` (V, H), ``bias`` (V,) or None, one dtype and one device
    (nn.Linear's rule; under torch.autocast they are cast as nn.Linear's would be). Each
    chunk's logits are accumulated in float32 into float32 (float64 for float64 inputs);
    their logsumexp and top-k are taken and the chunk is dropped. Returns a TopKTeacher with
    (..., k) int64 ``token_ids`` and float32 ``logprobs``.

    ``chunk_size`` caps the rows per chunk, ``memory_budget`` (bytes) a chunk's working set
    (about ``4 * V * 4`` bytes a row); with neither, a quarter of the free CUDA memory or
    256 MiB on CPU.
    """
    check_head("", hidden, weight, bias)
    check_bias("", weight, bias)
    if hidden.shape[-1] == 0:
        raise ValueError("hidden has an empty hidden dimension (H = 0)")
    V = weight.shape[0]
    k, temperature, softcap = _check_options(k, V, "weight's dim 0", temperature, softcap)
    check_chunking(chunk_size, memory_budget)
    hidden, weight, bias = autocast_cast(hidden.device, (hidden, weight, bias))
    check_head_dtypes("", hidden, weight, bias)
    lead = hidden.shape[:-1]
    n_rows = lead.numel()
    wide = wide_dtype(weight.dtype)
    device = hidden.device
    chunk = chunk_rows(n_rows, V, wide, PRODUCER_ROW_FLOATS, chunk_size, memory_budget, device)
    ids = torch.empty((n_rows, k), dtype=torch.int64, device=device)
    lps = torch.empty((n_rows, k), dtype=wide, device=device)
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        head = Head(hidden.detach(), weight.detach(), None if bias is None else bias.detach())
        for start in range(0, n_rows, chunk):
            part = slice(start, min(start + chunk, n_rows))
            z = head.logits(head.rows(part))  # (rows, V), fresh: transformed in place
            _topk_rows(z, True, k, temperature, softcap, ids[part], lps[part])
            del z
    return TopKTeacher(ids.view(*lead, k), lps.view(*lead, k))


# --- one chunk -----------------------------------------------------------------------------


def _topk_rows(z: Tensor, owned: bool, k: int, temperature: float, softcap: float | None,
               ids_out: Tensor, lps_out: Tensor) -> None:  # fmt: skip
    """Fills ids_out / lps_out (rows, k) from the chunk's wide logits z (rows, V); z is
    transformed in place only when ``owned`` (else the first step makes a copy)."""
    if softcap is not None:
        z = z.div_(softcap) if owned else z.div(softcap)
        owned = True
        z.tanh_().mul_(softcap)
    if temperature != 1.0:
        z = z.div_(temperature) if owned else z.div(temperature)
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    values, indices = torch.topk(z, k, dim=-1, largest=True, sorted=True)
    torch.sub(values, lse, out=lps_out)
    ids_out.copy_(indices)


# --- checks --------------------------------------------------------------------------------


def _check_options(k, V: int, v_from: str, temperature, softcap):
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if V < 1:
        raise ValueError(f"the vocabulary is empty (V = 0, {v_from})")
    if not 1 <= k <= V:
        raise ValueError(f"k must lie in [1, V] with V = {V} ({v_from}), got {k}")
    temperature = check_temperature(temperature)
    if softcap is not None:
        softcap = check_number("softcap", softcap, positive=True)
    return k, temperature, softcap
