"""A teacher seen only through its top-k log-probabilities (design.md §4).

An API returns at most 20 top log-probabilities per token, vLLM serves 20-1024, and offline
pipelines cache the top-k on disk. :class:`TopKTeacher` holds them: ``token_ids`` (..., K)
integers in [0, V), ``logprobs`` (..., K) the teacher's log-probabilities normalised over its
whole vocabulary, and an optional ``mask`` (..., K), False on padding (a logprob of -inf is
padding too). Ids are distinct within a row: the caller's contract.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ._config import check_dense_tensor


@dataclass(frozen=True)
class TopKTeacher:
    """The teacher's top-k (token id, log-probability) pairs per row, and which are real."""

    token_ids: Tensor
    logprobs: Tensor
    mask: Tensor | None = None

    def __post_init__(self) -> None:
        check_dense_tensor("token_ids", self.token_ids)
        check_dense_tensor("logprobs", self.logprobs)
        ids, lp = self.token_ids, self.logprobs
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise TypeError(f"token_ids must be an integer tensor, got dtype {ids.dtype}")
        if not lp.is_floating_point():
            raise TypeError(f"logprobs must be a floating-point tensor, got dtype {lp.dtype}")
        if ids.dim() == 0 or ids.shape[-1] == 0:
            raise ValueError(f"token_ids must be (..., K) with K >= 1, got {tuple(ids.shape)}")
        if ids.shape != lp.shape:
            raise ValueError(
                f"token_ids and logprobs must have one shape (..., K), got {tuple(ids.shape)} "
                f"and {tuple(lp.shape)}"
            )
        if ids.device != lp.device:
            raise ValueError(
                f"token_ids and logprobs must be on one device, got {ids.device} and {lp.device}"
            )
        if self.mask is not None:
            check_dense_tensor("mask", self.mask)
            if self.mask.dtype != torch.bool:
                raise TypeError(f"mask must be a bool tensor, got dtype {self.mask.dtype}")
            if self.mask.shape != ids.shape or self.mask.device != ids.device:
                raise ValueError(
                    f"mask must match token_ids' shape {tuple(ids.shape)} and device "
                    f"{ids.device}, got {tuple(self.mask.shape)} on {self.mask.device}"
                )

    @property
    def k(self) -> int:
        return self.token_ids.shape[-1]

    @property
    def lead_shape(self) -> torch.Size:
        return self.token_ids.shape[:-1]

    def valid(self) -> Tensor:
        """(..., K) bool: the pairs that are real (mask, and a logprob above -inf)."""
        # NaN is not padding: a NaN logprob makes its row NaN (only mask and -inf pad).
        live = self.logprobs != -torch.inf
        return live if self.mask is None else live & self.mask

    def as_rows(self) -> TopKTeacher:
        """The pairs as (n, K) rows, one per leading index (views where they can be)."""
        k = self.k
        mask = None if self.mask is None else self.mask.reshape(-1, k)
        return TopKTeacher(self.token_ids.reshape(-1, k), self.logprobs.reshape(-1, k), mask)

    def rows(self, start: int, stop: int) -> TopKTeacher:
        """Rows [start, stop) of (n, K) rows."""
        mask = None if self.mask is None else self.mask[start:stop]
        return TopKTeacher(self.token_ids[start:stop], self.logprobs[start:stop], mask)

    def detach(self) -> TopKTeacher:
        return TopKTeacher(self.token_ids, self.logprobs.detach(), self.mask)
