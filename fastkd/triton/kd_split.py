"""The Triton row kernel split across programs, for few rows (N below about two an SM): each
row's vocabulary is cut into K chunks, one program each, so that a short batch still
fills the GPU (design.md §3's passes, one launch each).

1. ``kd_split_stats_kernel`` (N x K programs): pass 1 over the chunk (kd_math.stats_step),
   its partial (max s, max t, the sums of exp relative to those maxima, the cross term of
   the one-pass divergences relative to them) to a (N, K, STATS) workspace, and the
   label's logit before any gradient is written.
2. ``kd_split_terms_kernel`` (the 3-pass divergences only): every program combines its
   row's K partials (``combine_stats``: max of the maxima, sums rescaled by exp(m_k - m),
   cross terms rebased as pass 1 rebases them between blocks) and sums the chunk's loss,
   q h and TVD terms into a (N, K, TERMS) workspace.
3. ``kd_split_finish_kernel`` (N x K programs with the gradient, N x 1 without): combines
   again, writes the loss from chunk 0 and the chunk's gradient.

Each program reads its row's K partials: K x 7 floats, against a chunk of thousands of
entries. launch.py picks K; kd_kernels.row_kernel launches. Every chunk of a row is read by
all its launches before the last one writes the gradient, so grad_ptr may alias s_ptr.
"""

import triton
import triton.language as tl

from .kd_math import (
    NEG_INF,
    block_terms,
    grad_terms,
    load_row_block,
    one_pass_loss,
    rebase,
    row_constants,
    safe_shift,
    stats_step,
    tanh,
    tvd_split,
)

# Floats of a (row, chunk) partial: m_s, m_b, z_a, z_b, z_s, cross, s_label.
STATS = tl.constexpr(7)
# The 3-pass divergences' chunk sums: loss, q h, and TVD's sums of q above and below p.
TERMS = tl.constexpr(4)


@triton.jit
def _row_setup(labels_ptr, row, V, ignore_index, offset, HAS_LABELS: tl.constexpr):
    """(label, ignored, n_cols): the label as a column of these logits (the vocabulary's
    label minus ``offset``, the first column's index: 0 but on a vocab-parallel shard, where
    it may lie outside the row); an ignored row reads nothing (n_cols = 0)."""
    if HAS_LABELS:
        label = tl.load(labels_ptr + row).to(tl.int64)
        ignored = label == ignore_index
        label = label - offset
    else:
        label = row * 0 - 1
        ignored = row < 0
    return label, ignored, tl.where(ignored, 0, V)


@triton.jit
def kd_split_stats_kernel(
    s_ptr, s_row_stride, t_ptr, t_row_stride, labels_ptr, stats_ptr, V, chunk, inv_t,
    softcap, ignore_index, offset, DIV: tl.constexpr, HAS_LABELS: tl.constexpr,
    HAS_CE: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Pass 1 over columns [c * chunk, (c + 1) * chunk) of a row: the partial of (row, c)."""
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    s_row = s_ptr + row * s_row_stride
    t_row = t_ptr + row * t_row_stride
    label, ignored, n_cols = _row_setup(labels_ptr, row, V, ignore_index, offset, HAS_LABELS)
    out = stats_ptr + (row * tl.num_programs(1) + c) * STATS
    start0 = c * chunk

    s_label = 0.0
    if HAS_CE:
        # Read here, before the last launch writes any gradient over the row; only by the
        # chunk that holds the label (0 elsewhere: combine_stats sums the partials).
        here = (label >= start0) & (label < tl.minimum(start0 + chunk, n_cols))
        label_safe = tl.minimum(tl.maximum(label, 0), tl.maximum(V - 1, 0))
        s_label = tl.load(s_row + label_safe, mask=here, other=0.0).to(tl.float32)
        if SOFTCAP:
            s_label = softcap * tanh(s_label / softcap)

    m_s = float("-inf")
    m_b = float("-inf")
    z_a = tl.zeros([BLOCK], dtype=tl.float32)
    z_b = tl.zeros([BLOCK], dtype=tl.float32)
    z_s = tl.zeros([BLOCK], dtype=tl.float32)
    cross = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(start0, tl.minimum(start0 + chunk, n_cols), BLOCK):
        cols = start + tl.arange(0, BLOCK)
        s, a = load_row_block(s_row, cols, n_cols, inv_t, softcap, SOFTCAP)
        _, b = load_row_block(t_row, cols, n_cols, inv_t, softcap, SOFTCAP)
        m_s, m_b, z_a, z_b, z_s, cross = stats_step(
            DIV, HAS_CE, s, a, b, inv_t, m_s, m_b, z_a, z_b, z_s, cross
        )
    tl.store(out + 0, m_s)
    tl.store(out + 1, m_b)
    tl.store(out + 2, tl.sum(z_a, axis=0))
    tl.store(out + 3, tl.sum(z_b, axis=0))
    tl.store(out + 4, tl.sum(z_s, axis=0))
    tl.store(out + 5, tl.sum(cross, axis=0))
    tl.store(out + 6, s_label)


@triton.jit
def combine_stats(stats_row, K, inv_t, DIV: tl.constexpr, KP: tl.constexpr):
    """A row's K partials combined: (m_s, m_b, z_a, z_b, z_s, cross, s_label), the maxima
    as pass 1 leaves them (possibly -inf), the cross term relative to the row's maxima. The
    partials may come from several launches (a vocab-parallel group's ranks, in rank order):
    the combination only needs them all, in the same order wherever it is done."""
    k = tl.arange(0, KP)
    mask = k < K
    part = stats_row + k * STATS
    m_s_k = tl.load(part + 0, mask=mask, other=NEG_INF)
    m_b_k = tl.load(part + 1, mask=mask, other=NEG_INF)
    z_a_k = tl.load(part + 2, mask=mask, other=0.0)
    z_b_k = tl.load(part + 3, mask=mask, other=0.0)
    z_s_k = tl.load(part + 4, mask=mask, other=0.0)
    m_s = tl.max(m_s_k, axis=0)
    m_b = tl.max(m_b_k, axis=0)
    m_a_k = m_s_k * inv_t
    m_a = m_s * inv_t
    # exp(m_k - m): 0 for a chunk whose maximum is -inf (its sums are 0 too).
    rescale_a = tl.exp(m_a_k - safe_shift(m_a))
    rescale_b = tl.exp(m_b_k - safe_shift(m_b))
    rescale_s = tl.exp(m_s_k - safe_shift(m_s))
    z_a = tl.sum(z_a_k * rescale_a, axis=0)
    z_b = tl.sum(z_b_k * rescale_b, axis=0)
    z_s = tl.sum(z_s_k * rescale_s, axis=0)
    cross = 0.0
    if DIV == "forward_kl" or DIV == "soft_ce" or DIV == "reverse_kl":
        cross_k = tl.load(part + 5, mask=mask, other=0.0)
        # Each chunk's values are relative to its maxima: they move by the difference.
        moved_a = m_a - m_a_k
        moved_b = m_b - m_b_k
        if DIV == "forward_kl":
            cross_k = rebase(cross_k, rescale_b, z_b_k, moved_a - moved_b)
        elif DIV == "soft_ce":
            cross_k = rebase(cross_k, rescale_b, z_b_k, moved_a)
        else:
            cross_k = rebase(cross_k, rescale_a, z_a_k, moved_b - moved_a)
        cross = tl.sum(cross_k, axis=0)
    s_label = tl.sum(tl.load(part + 6, mask=mask, other=0.0), axis=0)
    return m_s, m_b, z_a, z_b, z_s, cross, s_label


@triton.jit
def kd_split_terms_kernel(
    s_ptr, s_row_stride, t_ptr, t_row_stride, labels_ptr, stats_ptr, terms_ptr, K, V, chunk,
    inv_t, softcap, w, one_minus_w, log_w, log_1mw, ignore_index, offset, DIV: tl.constexpr,
    HAS_LABELS: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK: tl.constexpr, KP: tl.constexpr,
):  # fmt: skip
    """The 3-pass divergences' second pass over chunk c: its sums of the loss, q h and
    TVD's terms, with the row's constants from its K partials (as many as this launch has
    chunks, or more: a vocab-parallel group's)."""
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    s_row = s_ptr + row * s_row_stride
    t_row = t_ptr + row * t_row_stride
    label, ignored, n_cols = _row_setup(labels_ptr, row, V, ignore_index, offset, HAS_LABELS)
    # (Triton: a name keeps its type through a loop, so no `_` out here.)
    m_s, m_b, z_a, z_b, z_s, cross, s_label = combine_stats(
        stats_ptr + row * K * STATS, K, inv_t, DIV, KP
    )
    m_a, m_b, log_z_a, log_z_b, no_distribution = row_constants(m_s, m_b, z_a, z_b, inv_t)

    kd_acc = tl.zeros([BLOCK], dtype=tl.float32)
    qh_acc = tl.zeros([BLOCK], dtype=tl.float32)
    q_above_acc = tl.zeros([BLOCK], dtype=tl.float32)
    q_below_acc = tl.zeros([BLOCK], dtype=tl.float32)
    start0 = c * chunk
    for start in range(start0, tl.minimum(start0 + chunk, n_cols), BLOCK):
        _, _, _, loss_terms, qh_terms = block_terms(
            DIV, SOFTCAP, BLOCK, s_row, t_row, start, n_cols, inv_t, softcap, m_a, m_b,
            log_z_a, log_z_b, w, one_minus_w, log_w, log_1mw,
        )  # fmt: skip
        kd_acc += loss_terms
        qh_acc += qh_terms
        if DIV == "tvd":
            above, below = tvd_split(qh_terms)
            q_above_acc += above
            q_below_acc += below
    out = terms_ptr + (row * tl.num_programs(1) + c) * TERMS
    tl.store(out + 0, tl.sum(kd_acc, axis=0))
    tl.store(out + 1, tl.sum(qh_acc, axis=0))
    tl.store(out + 2, tl.sum(q_above_acc, axis=0))
    tl.store(out + 3, tl.sum(q_below_acc, axis=0))


@triton.jit
def kd_split_finish_kernel(
    s_ptr, s_row_stride, t_ptr, t_row_stride, labels_ptr, grad_ptr, grad_row_stride,
    kd_per_row_ptr, ce_per_row_ptr, reduction_factor_ptr, stats_ptr, terms_ptr, K, V, chunk,
    inv_t, softcap, w, one_minus_w, log_w, log_1mw, kd_grad_coef, ce_weight, ignore_index,
    offset, DIV: tl.constexpr, ONE_PASS_LOSS: tl.constexpr, HAS_LABELS: tl.constexpr,
    HAS_CE: tl.constexpr, SOFTCAP: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
    BLOCK: tl.constexpr, KP: tl.constexpr,
):  # fmt: skip
    """The row's loss (from chunk 0) and, when COMPUTE_GRAD, the gradient of chunk c. K is
    the row's number of partials (of chunks, or of a vocab-parallel group's chunks; the grid
    has one program a row without the gradient)."""
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    s_row = s_ptr + row * s_row_stride
    t_row = t_ptr + row * t_row_stride
    label, ignored, n_cols = _row_setup(labels_ptr, row, V, ignore_index, offset, HAS_LABELS)
    m_s, m_b, z_a, z_b, z_s, cross, s_label = combine_stats(
        stats_ptr + row * K * STATS, K, inv_t, DIV, KP
    )
    m_a, m_b, log_z_a, log_z_b, no_distribution = row_constants(m_s, m_b, z_a, z_b, inv_t)
    q_above = 0.0
    q_below = 0.0
    if ONE_PASS_LOSS:
        kd, qh_sum = one_pass_loss(DIV, cross, z_a, z_b, log_z_a, log_z_b)
    else:
        k = tl.arange(0, KP)
        part = terms_ptr + (row * K + k) * TERMS
        mask = k < K
        kd = tl.sum(tl.load(part + 0, mask=mask, other=0.0), axis=0)
        qh_sum = tl.sum(tl.load(part + 1, mask=mask, other=0.0), axis=0)
        q_above = tl.sum(tl.load(part + 2, mask=mask, other=0.0), axis=0)
        q_below = tl.sum(tl.load(part + 3, mask=mask, other=0.0), axis=0)
    m_s = safe_shift(m_s)
    log_z_s = 0.0
    if HAS_CE:
        log_z_s = tl.log(z_s)
    if c == 0:
        if HAS_CE:
            tl.store(ce_per_row_ptr + row, tl.where(ignored, 0.0, (m_s - s_label) + log_z_s))
        tl.store(kd_per_row_ptr + row, tl.where(ignored, 0.0, kd + no_distribution))

    if COMPUTE_GRAD:
        reduction_factor = tl.load(reduction_factor_ptr).to(tl.float32)
        g_row = grad_ptr + row * grad_row_stride
        start0 = c * chunk
        for start in range(start0, tl.minimum(start0 + chunk, V), BLOCK):
            cols, s, log_q, _, qh = block_terms(
                DIV, SOFTCAP, BLOCK, s_row, t_row, start, n_cols, inv_t, softcap, m_a, m_b,
                log_z_a, log_z_b, w, one_minus_w, log_w, log_1mw,
            )  # fmt: skip
            g = grad_terms(
                DIV, HAS_CE, SOFTCAP, cols, s, log_q, qh, qh_sum, q_above, q_below,
                kd_grad_coef + no_distribution, label, m_s, log_z_s, ce_weight, softcap,
            )  # fmt: skip
            g = tl.where(ignored, 0.0, g * reduction_factor)
            tl.store(g_row + cols, g.to(grad_ptr.dtype.element_ty), mask=cols < V)
