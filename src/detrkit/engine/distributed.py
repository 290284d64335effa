"""Optional multi-process training with ``torchrun`` (DDP, one process per device).

``torchrun --nproc_per_node=N -m detrkit train ...`` sets ``RANK`` / ``WORLD_SIZE`` /
``LOCAL_RANK``; :func:`init_distributed` reads them and starts the process group (NCCL on
CUDA, Gloo on CPU). Without them every helper here is a no-op, so single-process code paths
need no branches. Each rank trains on its own shard of the training set
(:func:`shard_dataset`); evaluation and checkpoints run on rank 0 only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, Subset

__all__ = [
    "DistInfo",
    "init_distributed",
    "shard_dataset",
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


def shard_dataset(dataset: Dataset, info: DistInfo, seed: int) -> Dataset:
    """This rank's share of ``dataset``: a seeded permutation (the same on every rank), padded
    by repetition to a multiple of the world size so every rank runs the same number of steps,
    then every ``world_size``-th index from ``rank``. The whole dataset when not distributed."""
    if not info.enabled:
        return dataset
    n = len(dataset)  # type: ignore[arg-type]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    order += order[: (-n) % info.world_size]
    return Subset(dataset, order[info.rank :: info.world_size])


def wrap_model(model: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """``model`` in ``DistributedDataParallel`` when distributed, else ``model`` itself."""
    if not info.enabled:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


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


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
