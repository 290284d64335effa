"""Batching images of different sizes into a padded :class:`ImageBatch`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from detrkit.structures import ImageBatch, Target

__all__ = ["images_to_batch", "collate"]


def images_to_batch(
    images: Sequence[Tensor], orig_sizes: Sequence[tuple[int, int]] | None = None
) -> ImageBatch:
    """Pad images ``[3, h_i, w_i]`` (normalised float) into one :class:`ImageBatch`.

    Each image sits in the top-left corner of a ``[B, 3, H, W]`` zero tensor
    (``H, W`` = the largest height / width); ``mask`` ``[B, H, W]`` is True on padding.
    sizes: ``(h_i, w_i)``. orig_sizes: the sizes on disk (default: the sizes given).
    """
    if len(images) == 0:
        raise ValueError("images_to_batch: no images")
    for i, image in enumerate(images):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(
                f"images_to_batch: image {i} has shape {tuple(image.shape)}, expected [3, H, W]"
            )
    sizes = torch.tensor([[im.shape[1], im.shape[2]] for im in images], dtype=torch.int64)
    height, width = (int(v) for v in sizes.max(dim=0).values)
    first = images[0]
    batch = first.new_zeros((len(images), 3, height, width))  # [B, 3, H, W]
    mask = torch.ones((len(images), height, width), dtype=torch.bool, device=first.device)
    for i, image in enumerate(images):
        h, w = image.shape[1:]
        batch[i, :, :h, :w].copy_(image)
        mask[i, :h, :w] = False
    if orig_sizes is None:
        orig = sizes.clone()
    else:
        if len(orig_sizes) != len(images):
            raise ValueError(
                f"images_to_batch: {len(orig_sizes)} orig_sizes for {len(images)} images"
            )
        orig = torch.tensor([[int(h), int(w)] for h, w in orig_sizes], dtype=torch.int64)
    return ImageBatch(batch, mask, sizes.to(first.device), orig.to(first.device))


def collate(batch: Sequence[tuple[Tensor, Target]]) -> tuple[ImageBatch, list[Target]]:
    """DataLoader ``collate_fn``: ``[(image [3, h, w], Target), ...]`` -> padded
    :class:`ImageBatch` (mask True on padding, orig_sizes from the targets) + the targets."""
    images = [image for image, _ in batch]
    targets = [target for _, target in batch]
    return images_to_batch(images, [t.orig_size for t in targets]), targets
