"""fastkd on torch.distributed: vocab-parallel losses and the data-parallel token count.

- Vocab-parallel (design.md §5): ``KDLoss(..., process_group=G)`` or
  ``kd_loss(..., process_group=G)`` with each rank's contiguous vocabulary shard of both
  logits, or DTensor logits sharded on the last dimension over a 1-D mesh (torchtitan's
  ``loss_parallel`` layout), which need no ``process_group``. The phases and their
  collectives are in fastkd/_vocab_parallel.py.
- Data-parallel: :func:`global_num_items` counts the tokens that carry a label over every
  data-parallel rank and gradient-accumulation micro-batch, for ``num_items_in_batch``.
- :func:`count_collectives` records what fastkd hands to collectives (bytes per call), for
  the tests' O(N) bound and the benchmark.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import Tensor

from . import _vocab_parallel
from ._vocab_parallel import CollectiveLog

__all__ = ["CollectiveLog", "count_collectives", "global_num_items", "vocab_shard"]


def global_num_items(
    *labels: Tensor, group=None, ignore_index: int = -100, shift: bool = False
) -> Tensor:
    """The number of labels != ignore_index in ``labels`` (one tensor per gradient-accumulation
    micro-batch), summed over the ranks of ``group`` (the default group when torch.distributed
    is initialised; this process alone otherwise): ``num_items_in_batch`` for the
    ``"mean"`` reduction, so that every token weighs the same whatever rank and micro-batch
    holds it. ``shift=True`` counts ``labels[..., 1:]``, for labels that the loss shifts as
    Hugging Face's causal LM does. A 0-d int64 tensor on the labels' device.

    Under DDP (and FSDP), which average the ranks' gradients, the loss each rank backpropagates
    is ``loss * world_size``, as Hugging Face Trainer does with
    ``average_tokens_across_devices``; docs/distributed.md shows both loops.
    """
    if not labels:
        raise ValueError("global_num_items needs at least one labels tensor")
    device = labels[0].device
    count = torch.zeros((), dtype=torch.long, device=device)
    for i, x in enumerate(labels):
        if not isinstance(x, Tensor) or x.is_floating_point():
            raise TypeError(f"labels[{i}] must be an integer tensor, got {type(x).__name__}")
        if shift:
            x = x[..., 1:]
        count += (x != ignore_index).sum().to(device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(count, group=group)
    return count


def vocab_shard(x: Tensor, rank: int, world: int, dim: int = -1) -> Tensor:
    """Rank ``rank``'s contiguous shard of ``x`` along ``dim`` in torch.chunk's split (the
    first shards one wider when it does not divide), as a view: for tests and examples that
    start from whole logits or LM-head weights."""
    return torch.tensor_split(x, world, dim=dim)[rank]


@contextlib.contextmanager
def count_collectives() -> Iterator[CollectiveLog]:
    """Records, in the yielded log, every collective fastkd calls on this rank meanwhile:
    (name, bytes this rank sends)."""
    log = CollectiveLog()
    _vocab_parallel._LOGS.append(log)
    try:
        yield log
    finally:
        _vocab_parallel._LOGS.remove(log)


def as_local_shards(student, teacher, labels, process_group):
    """(student, teacher, labels, group): DTensor logits sharded on the last dimension over a
    1-D mesh become their local shards and the mesh's group; plain tensors pass through."""
    from torch.distributed.tensor import DTensor, Shard

    dtensors = [x for x in (student, teacher) if isinstance(x, DTensor)]
    if not dtensors:
        return student, teacher, labels, process_group
    if len(dtensors) != 2:
        raise ValueError(
            "student_logits and teacher_logits must both be DTensors or both plain tensors"
        )
    mesh = student.device_mesh
    for name, x in (("student_logits", student), ("teacher_logits", teacher)):
        placements = x.placements
        last = x.dim() - 1
        sharded = (
            x.device_mesh.ndim == 1
            and len(placements) == 1
            and isinstance(placements[0], Shard)
            and placements[0].dim in (-1, last)
        )
        if not sharded:
            raise ValueError(
                f"{name} must be a DTensor sharded on its last dimension over a 1-D mesh "
                f"(placements [Shard({last})]), got mesh of {x.device_mesh.ndim} dimensions "
                f"and placements {list(placements)}"
            )
        if x.device_mesh != mesh:
            raise ValueError("student_logits and teacher_logits must share one device mesh")
    group = mesh.get_group()
    if process_group is not None and process_group != group:
        raise ValueError("process_group differs from the DTensor logits' mesh group")
    if isinstance(labels, DTensor):
        labels = labels.full_tensor()
    return student.to_local(), teacher.to_local(), labels, group
