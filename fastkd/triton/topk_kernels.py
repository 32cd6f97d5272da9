"""Triton kernels for a top-k teacher's O(V) row work (design.md §4; the contract, with the
columns of stats and row_coefs, is fastkd/_topk_rows.py): one program walks one row of the
student in vocabulary blocks, as fastkd/triton/kd_kernels.py does for dense teachers.

topk_row_stats_kernel is one online-softmax pass: lse(a) as (m_a, log_z_a), and with the tail
the mass outside the support summed under the same running max (never z_a less the support's
sum, which cancels when the support holds nearly all the mass); lse(x) at T = 1 for CE.
topk_grad_rows_kernel writes the dense gradient row (c_q q_j and the CE term), then the K
pairs over it (their values d_i, formed on the O(K) side, and the CE term).

Every sum, exp and log is float32; row offsets are int64. Nothing of size N x V is allocated
here: the caller hands in the gradient buffer, which may be the student itself.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .kd_kernels import _launch_device
from .kd_math import load_row_block, online_lse_step, safe_shift, tanh


# The top-k kernels' own launch (AOT sm_90: 57 / 40 registers, no spill at 4096 x 16 warps);
# the dense kernel's table (launch.py) is sized for its vector accumulators, which these lack.
def _block_size(V: int) -> int:
    return min(triton.next_power_of_2(max(V, 16)), 4096)


def _num_warps(block: int) -> int:
    return 4 if block <= 1024 else 8 if block <= 2048 else 16


@triton.jit
def _outside_support(cols, sorted_row, lo, hi, KB: tl.constexpr):
    """True where a column of the block is none of the support ids sorted_row[lo:hi] (the
    row's sorted ids that fall in this block, from _support_by_block).

    Triton cannot scatter the ids into a block-sized mask, so each column is compared with
    each of the block's ids: BLOCK comparisons per id, and a block holding no id costs
    nothing. The ids are read KB at a time, unrolled (independent loads in flight), then
    one at a time for the rest, so that no comparison is spent on a masked-off id."""
    hit = cols < 0
    n_full = (hi - lo) // KB * KB
    for k0 in range(lo, lo + n_full, KB):
        for j in tl.static_range(KB):
            hit |= cols == tl.load(sorted_row + k0 + j)
    for k in range(lo + n_full, hi):
        hit |= cols == tl.load(sorted_row + k)
    return ~hit


@triton.jit
def topk_row_stats_kernel(
    s_ptr,
    s_row_stride,
    labels_ptr,
    sorted_ids_ptr,
    sorted_ids_row_stride,
    block_ranges_ptr,
    block_ranges_row_stride,
    stats_ptr,
    V,
    inv_t,
    softcap,
    ignore_index,
    HAS_LABELS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    TAIL: tl.constexpr,
    CE: tl.constexpr,
    BLOCK: tl.constexpr,
    KB: tl.constexpr,
):
    """stats[row] = (m_a, log_z_a, log_z_out, m_s, log_z_s), all 0 for an ignored row.

    With TAIL, sorted_ids holds each row's support ids in ascending order (padding past
    them) and block_ranges[row, b : b + 2] the range of them that falls in block b."""
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_row_stride
    offs = tl.arange(0, BLOCK)
    ignored = row < 0
    if HAS_LABELS:
        ignored = tl.load(labels_ptr + row).to(tl.int64) == ignore_index
    # An ignored row reads nothing: its loop runs zero times and its stats are 0.
    n_cols = tl.where(ignored, 0, V)

    m_a = float("-inf")
    z_a = 0.0
    z_out = 0.0
    m_s = float("-inf")
    z_s = 0.0
    for start in range(0, n_cols, BLOCK):
        cols = start + offs
        x, a = load_row_block(s_row, cols, n_cols, inv_t, softcap, SOFTCAP)
        m_a, z_a, e_a, rescale_a = online_lse_step(m_a, z_a, a)
        if TAIL:
            # The tail's sum shares z_a's running max and its exps: one exp per entry.
            ranges = block_ranges_ptr + row * block_ranges_row_stride + start // BLOCK
            outside = _outside_support(
                cols,
                sorted_ids_ptr + row * sorted_ids_row_stride,
                tl.load(ranges),
                tl.load(ranges + 1),
                KB,
            )
            z_out = z_out * rescale_a + tl.sum(tl.where(outside, e_a, 0.0), axis=0)
        if CE:
            m_s, z_s, _, _ = online_lse_step(m_s, z_s, x)

    # log q = (a - m_a) - log z_a, as torch's log_softmax: folding m + log z into one lse
    # would round it to the ulp of the logits' magnitude.
    log_z_out = 0.0
    if TAIL:
        log_z_out = tl.log(z_out)  # -inf when nothing outside the support has mass
    m_s_out = 0.0
    log_z_s = 0.0
    if CE:
        m_s_out = safe_shift(m_s)
        log_z_s = tl.log(z_s)
    out = stats_ptr + row * 5
    tl.store(out, tl.where(ignored, 0.0, safe_shift(m_a)))
    tl.store(out + 1, tl.where(ignored, 0.0, tl.log(z_a)))
    tl.store(out + 2, tl.where(ignored, 0.0, log_z_out))
    tl.store(out + 3, tl.where(ignored, 0.0, m_s_out))
    tl.store(out + 4, tl.where(ignored, 0.0, log_z_s))


@triton.jit
def _plus_ce_term(g, x, cols, label, c_ce, m_s, log_z_s, HAS_LABELS: tl.constexpr):
    """g + c_ce (softmax(x) - [col == label]), the term the dense entries and the pairs
    share; skipped when c_ce is exactly 0 (its exp may then be inf or NaN) or without
    labels (a False constexpr short-circuits the `and`: nothing is compiled)."""
    if HAS_LABELS and c_ce != 0.0:
        sm = tl.exp((x - m_s) - log_z_s)
        g += c_ce * (sm - tl.where(cols == label, 1.0, 0.0))
    return g


@triton.jit
def _times_cap_grad(g, x, softcap, SOFTCAP: tl.constexpr):
    # d(softcap tanh(s / softcap)) / ds = 1 - (x / softcap)^2 at the capped x.
    if SOFTCAP:
        g *= 1.0 - (x / softcap) * (x / softcap)
    return g


@triton.jit
def topk_grad_rows_kernel(
    s_ptr,
    s_row_stride,
    ids_ptr,
    s_at_ids_ptr,
    labels_ptr,
    stats_ptr,
    row_coefs_ptr,
    pair_grads_ptr,
    grad_ptr,
    grad_row_stride,
    V,
    K,
    inv_t,
    softcap,
    ignore_index,
    HAS_LABELS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    BLOCK: tl.constexpr,
    PAIR_BLOCK: tl.constexpr,
):
    """grad[row] = the dense formula, then the pair formula at the support's ids; 0 for an
    ignored row. ids, s_at_ids and pair_grads are (n, K), stats (n, 5) and row_coefs (n, 2),
    all contiguous."""
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_row_stride
    g_row = grad_ptr + row * grad_row_stride
    offs = tl.arange(0, BLOCK)
    if HAS_LABELS:
        label = tl.load(labels_ptr + row).to(tl.int64)
        ignored = label == ignore_index
    else:
        label = row * 0 - 1
        ignored = row < 0
    n_cols = tl.where(ignored, 0, V)
    stats = stats_ptr + row * 5
    m_a = tl.load(stats)
    log_z_a = tl.load(stats + 1)
    m_s = tl.load(stats + 3)
    log_z_s = tl.load(stats + 4)
    # An ignored row's coefficients are 0, so its dense pass computes no exp and writes 0.
    c_q = tl.where(ignored, 0.0, tl.load(row_coefs_ptr + row * 2))
    c_ce = tl.where(ignored, 0.0, tl.load(row_coefs_ptr + row * 2 + 1))

    # The dense pass reads a block before writing it, so grad_ptr may alias s_ptr.
    for start in range(0, V, BLOCK):
        cols = start + offs
        x, a = load_row_block(s_row, cols, n_cols, inv_t, softcap, SOFTCAP)
        g = tl.zeros([BLOCK], dtype=tl.float32)
        if c_q != 0.0:  # exactly 0: skipped, even where q is NaN (a row without a softmax)
            g += c_q * tl.exp((a - m_a) - log_z_a)
        g = _plus_ce_term(g, x, cols, label, c_ce, m_s, log_z_s, HAS_LABELS)
        g = tl.where(ignored, 0.0, _times_cap_grad(g, x, softcap, SOFTCAP))
        tl.store(g_row + cols, g.to(grad_ptr.dtype.element_ty), mask=cols < V)

    # The dense pass stored every column, the support's too, and a support column's dense
    # store may belong to another thread of this program than its pair's store below.
    # Global stores of different threads are unordered until a barrier (__syncthreads makes
    # the block's earlier writes visible to all its threads): without it a dense value could
    # land after its pair's and stay.
    tl.debug_barrier()

    # The pairs' logits come from s_at_ids, never from the student row: in place, the dense
    # pass has already written the gradient over it.
    n_pairs = tl.where(ignored, 0, K)
    for p0 in range(0, n_pairs, PAIR_BLOCK):
        k = p0 + tl.arange(0, PAIR_BLOCK)
        ids = tl.load(ids_ptr + row * K + k, mask=k < n_pairs, other=-1)
        live = ids >= 0
        x = tl.load(s_at_ids_ptr + row * K + k, mask=live, other=0.0).to(tl.float32)
        if SOFTCAP:
            x = softcap * tanh(x / softcap)
        g = tl.load(pair_grads_ptr + row * K + k, mask=live, other=0.0)
        g = _plus_ce_term(g, x, ids, label, c_ce, m_s, log_z_s, HAS_LABELS)
        g = _times_cap_grad(g, x, softcap, SOFTCAP)
        tl.store(g_row + ids, g.to(grad_ptr.dtype.element_ty), mask=live)


# Looked up at each call (not bound at import) so that tests can shrink the blocks and make
# small rows span several of them.
def _vocab_block(V: int) -> int:
    return _block_size(V)


def _support_chunk() -> int:
    """KB of _outside_support. Compiled for sm_90 (BLOCK 4096, 16 warps, every option on),
    4 ids unrolled take at most 57 registers, 8 up to 74 and 16 up to 103 (ptxas holds the
    unrolled loads): 64 or fewer keep two 512-thread programs on an SM. (As one [BLOCK, KB]
    comparison reduced over KB, 8 ids took 128 registers and 16 spilled.)"""
    return 4


def _pair_block(K: int) -> int:
    # Pairs written a chunk at a time: at most 1024, two a thread at BLOCK 4096's 16 warps.
    return min(triton.next_power_of_2(max(K, 16)), 1024)


def _support_by_block(ids: torch.Tensor, V: int, block: int):
    """(sorted_ids (n, K) int32, block_ranges (n, n_blocks + 1) int32): each row's support ids
    in ascending order, and for block b the range block_ranges[:, b] : block_ranges[:, b + 1]
    of them in [b * block, (b + 1) * block). O(n K log K) on the device, no host sync."""
    n_blocks = triton.cdiv(V, block)
    # Padding becomes V: it sorts after every id and past the last boundary (V), so no
    # block's range holds it.
    sorted_ids = torch.where(ids >= 0, ids, V).to(torch.int32).sort(dim=-1).values
    bounds = torch.arange(n_blocks + 1, device=ids.device, dtype=torch.int64) * block
    bounds = bounds.clamp_max(V).to(torch.int32).expand(ids.shape[0], -1).contiguous()
    return sorted_ids, torch.searchsorted(sorted_ids, bounds, out_int32=True)


def topk_row_stats(student, ids, labels, *, temperature, softcap, tail, ce, ignore_index):
    """(n, 5) float32: the columns fastkd._topk_rows.STATS of each row of student (n, V)."""
    n_rows, V = student.shape
    stats = torch.empty(n_rows, 5, dtype=torch.float32, device=student.device)
    if n_rows == 0:
        return stats
    if labels is not None:
        labels = labels.contiguous()  # the kernel reads labels_ptr + row
    block = _vocab_block(V)
    if tail:
        sorted_ids, block_ranges = _support_by_block(ids, V, block)
    else:
        sorted_ids = block_ranges = torch.zeros(1, 1, dtype=torch.int32, device=student.device)
    with _launch_device(student):
        topk_row_stats_kernel[(n_rows,)](
            student,
            student.stride(0),
            labels if labels is not None else stats,
            sorted_ids,
            sorted_ids.stride(0),
            block_ranges,
            block_ranges.stride(0),
            stats,
            V,
            1.0 / temperature,
            softcap if softcap is not None else 1.0,
            ignore_index,
            HAS_LABELS=labels is not None,
            SOFTCAP=softcap is not None,
            TAIL=bool(tail),
            CE=bool(ce),
            BLOCK=block,
            KB=_support_chunk(),
            num_warps=_num_warps(block),
        )
    return stats


def topk_grad_rows(
    student, ids, student_at_ids, labels, stats, row_coefs, pair_grads, grad, *,
    temperature, softcap, ignore_index,
):  # fmt: skip
    """Writes grad (n, V), in the student's dtype and possibly the student itself, from the
    row stats and coefficients (fastkd/_topk_rows.py)."""
    n_rows, V = student.shape
    if n_rows == 0:
        return
    K = ids.shape[1]
    if labels is not None:
        labels = labels.contiguous()
    block = _vocab_block(V)
    with _launch_device(student):
        topk_grad_rows_kernel[(n_rows,)](
            student,
            student.stride(0),
            ids.contiguous(),
            student_at_ids.contiguous(),
            labels if labels is not None else stats,
            stats.contiguous(),
            row_coefs.contiguous(),
            pair_grads.contiguous(),
            grad,
            grad.stride(0),
            V,
            K,
            1.0 / temperature,
            softcap if softcap is not None else 1.0,
            ignore_index,
            HAS_LABELS=labels is not None,
            SOFTCAP=softcap is not None,
            BLOCK=block,
            PAIR_BLOCK=_pair_block(K),
            num_warps=_num_warps(block),
        )
