"""Reading images from disk as 8-bit RGB, whatever their stored mode.

Conversions (PIL modes):

* ``1``, ``L``, ``P``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``: PIL's own conversion to RGB.
* ``RGBA``, ``LA``, ``PA``, ``RGBa``, ``La`` and palettes with transparency: the alpha channel is
  dropped (colour values kept as stored, not composited on a background).
* 16-bit (``I;16``, ``I;16L``, ``I;16B``, ``I;16N``): scaled by 1/256 (``v >> 8``), so the full
  16-bit range maps to the full 8-bit range; values are never clipped at 255.
* ``I`` (32-bit integer, how some readers hold 16-bit data): scaled by 1/256 when any value
  exceeds 255, otherwise taken as 8-bit values.
* ``F`` (32-bit float): taken as 0..1 when its maximum is <= 1, else as 0..255; clipped.

EXIF orientation is not applied: boxes in annotation files refer to the stored pixel grid.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from detrkit.data.errors import DatasetError

__all__ = ["as_image", "image_size_hw", "read_image", "read_image_size", "to_rgb8"]

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")


def read_image(path: str | Path) -> Image.Image:
    """Read ``path`` as an 8-bit RGB PIL image (see the module docstring for conversions).

    Raises :class:`DatasetError` naming the file when it is missing or not a readable image.
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            return to_rgb8(image)
    except FileNotFoundError:
        raise DatasetError(f"{path}: image file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise DatasetError(f"{path}: cannot read image ({err})") from None


def read_image_size(path: str | Path) -> tuple[int, int]:
    """``(height, width)`` of the image at ``path``, from its header only (cheap)."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            return image.height, image.width
    except FileNotFoundError:
        raise DatasetError(f"{path}: image file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise DatasetError(f"{path}: cannot read image ({err})") from None


def to_rgb8(image: Image.Image) -> Image.Image:
    """Convert a PIL image of any mode to 8-bit ``RGB`` (see the module docstring)."""
    mode = image.mode
    if mode == "RGB":
        return image.copy()
    if mode in _SIXTEEN_BIT:
        gray = (np.asarray(image).astype(np.uint32) >> 8).astype(np.uint8)  # [H, W]
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode == "I":
        values = np.asarray(image).astype(np.int64)  # [H, W]
        if values.size and values.max() > 255:
            values = values >> 8
        gray = np.clip(values, 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode == "F":
        values = np.asarray(image).astype(np.float64)  # [H, W]
        if values.size and np.nanmax(values) <= 1.0:
            values = values * 255.0
        gray = np.clip(np.nan_to_num(values), 0, 255).round().astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode == "P" and "transparency" in image.info:
        return image.convert("RGBA").convert("RGB")
    if mode in _ALPHA:
        # RGBA -> RGB keeps colour values and drops alpha; premultiplied modes are unpremultiplied
        # by PIL first
        return image.convert("RGBA" if mode != "RGBA" else mode).convert("RGB")
    return image.convert("RGB")


def as_image(image: str | Path | Image.Image | np.ndarray | Tensor) -> Image.Image | Tensor:
    """``image`` in a form the transforms accept: a path is read as RGB PIL, a numpy ``HWC``
    uint8 array (or ``HW`` grey) becomes a PIL image, PIL images become RGB, ``CHW`` tensors
    pass through (uint8, or float 0..1)."""
    if isinstance(image, (str, Path)):
        return read_image(image)
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        if image.ndim != 3 or image.shape[2] not in (3, 4):
            raise ValueError(f"expected an HWC RGB array, got shape {image.shape}")
        if image.dtype != np.uint8:
            raise ValueError(f"expected a uint8 HWC array, got dtype {image.dtype}")
        return Image.fromarray(np.ascontiguousarray(image[:, :, :3]))
    if isinstance(image, Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"expected a [3,H,W] tensor, got {tuple(image.shape)}")
        return image if image.dtype == torch.uint8 else image.float()
    raise TypeError(
        f"cannot read an image from {type(image).__name__}; pass a path, a PIL "
        "image, an HWC uint8 array or a CHW tensor"
    )


def image_size_hw(image: Image.Image | Tensor) -> tuple[int, int]:
    """``(height, width)`` of a PIL image or a ``[..., H, W]`` tensor."""
    if isinstance(image, Tensor):
        return int(image.shape[-2]), int(image.shape[-1])
    return image.height, image.width
