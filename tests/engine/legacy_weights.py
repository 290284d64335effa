"""Deterministic inputs and backbone weights of the committed format-1 checkpoints.

The checkpoints in ``checkpoints_v1/`` leave the ResNet out (it is most of their size and its
keys did not change between formats); this function regenerates exactly the values they were
saved with, from the key names and shapes alone, independent of any detrkit code.
"""

from __future__ import annotations

import zlib

import torch


def backbone_value(key: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The float32 value of backbone tensor ``key`` (fan-in scaled normal for convolutions,
    batch-norm statistics near identity, everything rounded to float16-exact values)."""
    gen = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    noise = torch.randn(shape, generator=gen)
    if key.endswith("running_var"):
        value = 1.0 + 0.5 * torch.rand(shape, generator=gen)
    elif key.endswith("running_mean") or key.endswith("bias"):
        value = 0.1 * noise
    elif len(shape) == 1:  # batch-norm scale
        value = 1.0 + 0.1 * noise
    else:
        fan_in = int(torch.tensor(shape[1:]).prod())
        value = noise * (2.0 / fan_in) ** 0.5
    return value.half().float()


PRESETS = [
    "test_detr_tiny",
    "test_dn_detr_tiny",
    "test_deformable_detr_tiny",
    "test_deformable_detr_tiny_two_stage",
    "test_dn_deformable_detr_tiny",
    "test_dino_tiny",
]


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """The padded batch ``[2, 3, 96, 128]`` (the second image 80 x 100) and its mask."""
    gen = torch.Generator().manual_seed(123)
    images = torch.randn(2, 3, 96, 128, generator=gen).half().float()
    mask = torch.zeros(2, 96, 128, dtype=torch.bool)
    mask[1, 80:, :] = True
    mask[1, :, 100:] = True
    images[1][:, mask[1]] = 0.0
    return images, mask
