"""fastkd: fused knowledge-distillation losses for large vocabularies."""

from ._config import KDOptions
from ._extension import build_info
from .divergences import DIVERGENCES, REDUCTIONS
from .fused_linear import FusedLinearKDLoss, fused_linear_kd_loss
from .losses import KDLoss, KDLossOutput, kd_loss
from .reference import kd_loss_reference

__all__ = [
    "DIVERGENCES",
    "REDUCTIONS",
    "FusedLinearKDLoss",
    "KDLoss",
    "KDLossOutput",
    "KDOptions",
    "build_info",
    "fused_linear_kd_loss",
    "kd_loss",
    "kd_loss_reference",
]
__version__ = "0.1.0"
