"""fastkd: fused knowledge-distillation losses for large vocabularies."""

from ._config import KDOptions
from ._extension import build_info
from .divergences import DIVERGENCES, REDUCTIONS
from .fused_linear import FusedLinearKDLoss, fused_linear_kd_loss
from .losses import KDLoss, KDLossOutput, kd_loss
from .reference import kd_loss_reference
from .topk import TopKTeacher
from .topk_io import (
    TopKReader,
    TopKShardWriter,
    from_axolotl,
    from_openai_chat,
    from_trl,
    from_vllm_logprobs,
    load_topk,
    save_topk,
)
from .topk_producer import topk_logprobs, topk_logprobs_from_hidden
from .topk_reference import topk_loss_reference

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
    "TopKTeacher",
    "TopKReader",
    "TopKShardWriter",
    "from_axolotl",
    "from_openai_chat",
    "from_trl",
    "from_vllm_logprobs",
    "load_topk",
    "save_topk",
    "topk_logprobs",
    "topk_logprobs_from_hidden",
    "topk_loss_reference",
]
__version__ = "0.1.0"
