"""The divergences fastkd knows: one row each (design.md §1).

Every backend reads this table: the Python API validates names and parameters against it,
the Triton and C++ kernels receive ``code`` and switch on it.  Adding a divergence means a
row here, its formula in ``reference.py`` (the spec), and its pointwise terms in the kernels'
one shared table (``triton/kd_math.py:pointwise``, ``csrc/kd_math.h``): every place is
listed in docs/adding_a_divergence.md.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Divergence:
    name: str
    code: int
    # Which constructor argument parameterises it ("beta", "alpha" or None); it must lie
    # strictly between 0 and 1.
    param: str | None
    # True when pass 1 of the kernel yields the loss through a carried cross term, so the
    # gradient needs only one more pass (design.md §3).
    one_pass_loss: bool


DIVERGENCES: dict[str, Divergence] = {
    d.name: d
    for d in (
        Divergence("forward_kl", 0, None, True),
        Divergence("soft_ce", 1, None, True),
        Divergence("reverse_kl", 2, None, True),
        Divergence("jsd", 3, "beta", False),
        Divergence("skew_forward_kl", 4, "alpha", False),
        Divergence("skew_reverse_kl", 5, "alpha", False),
        Divergence("tvd", 6, None, False),
        Divergence("hellinger", 7, None, False),
    )
}

REDUCTIONS = ("mean", "sum", "batchmean", "none")
