"""Optional multi-process training with ``torchrun`` (DDP, one process per device).

``torchrun --nproc_per_node=N -m detrkit train ...`` sets ``RANK`` / ``WORLD_SIZE`` /
``LOCAL_RANK``; :func:`init_distributed` reads them and starts the process group (NCCL on
CUDA, Gloo on CPU). Without them every helper here is a no-op, so single-process code paths
need no branches.

Every process trains on its own shard of each epoch's order (``build_loader(shard=...)``) and
evaluates its own shard of the validation set; the detections are gathered on the main
process (:func:`gather_to_main`), which alone computes the COCO metrics, writes checkpoints
and logs. Every collective here must be reached by every process the same number of times:
the box-count normaliser of each step (:func:`mean_over_processes`), the skip decision of
the non-finite guard, the evaluation gather and the stop decision (:func:`from_main`).

DDP runs without ``find_unused_parameters``: every trainable parameter of every preset gets
a gradient in each training step, with or without target boxes (tested), so the extra graph
traversal would buy nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "DistInfo",
    "init_distributed",
    "mean_over_processes",
    "gather_to_main",
    "all_agree",
    "wrap_model",
    "unwrap_model",
    "barrier",
    "from_main",
    "shutdown",
]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> tuple[DistInfo, torch.device]:
    """Start the process group when launched by ``torchrun``; returns the rank info and this
    rank's device (``cuda:LOCAL_RANK`` on CUDA)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo(), device
    info = DistInfo(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return info, device


def wrap_model(model: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """``model`` in ``DistributedDataParallel`` when distributed, else ``model`` itself."""
    if not info.enabled:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=False)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (or ``model`` itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def from_main(value: Any, info: DistInfo) -> Any:
    """The main process's ``value`` on every process (a picklable object; ``value`` itself
    when not distributed): a decision only the main process can make, such as stopping."""
    if not info.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean_over_processes(value: float, device: torch.device) -> float:
    """``value`` averaged over the processes of the initialised process group (``value``
    itself without one); every process must call it, ``device`` is where the reduction runs
    (the model's device: NCCL reduces CUDA tensors only)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    total = torch.tensor([value], dtype=torch.float32, device=device)  # float32 as officially
    dist.all_reduce(total)
    return float((total / dist.get_world_size()).item())


def all_agree(flag: bool, device: torch.device) -> bool:
    """``flag`` and the flags of every other process (logical and; ``flag`` itself when not
    distributed): processes must skip a step together or DDP waits for the one that did not."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item() > 0.5)


def gather_to_main(value: Any, info: DistInfo) -> list[Any] | None:
    """Every process's ``value`` (a picklable object), in rank order, on the main process;
    None on the others. ``[value]`` when not distributed."""
    if not info.enabled:
        return [value]
    box: list[Any] | None = [None] * info.world_size if info.is_main else None
    dist.gather_object(value, box, dst=0)
    return box


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
