"""Image loading and preprocessing shared by the feature encoders (PIL + torch, no torchvision)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Union

import numpy as np
import torch
from ..errors import VLPetError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

PathLike = Union[str, os.PathLike]


class ImageReadError(VLPetError, OSError):
    """An image file could not be opened or decoded. The message names the file."""

    def __init__(self, path: PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path!r}: {reason}")


class ImageSourceError(VLPetError, FileNotFoundError):
    """The images to extract features from are missing, empty or ambiguous. The message names them."""


def load_rgb(path: PathLike):
    """Open ``path`` with PIL, fully decode it and convert it to RGB.

    Raises :class:`ImageReadError` (naming the file) for missing, truncated or non-image files.
    """
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except Exception as exc:  # PIL raises a zoo of exception types
        raise ImageReadError(path, f"{type(exc).__name__}: {exc}") from exc


def resize_to_uint8(img, size: int) -> torch.Tensor:
    """PIL RGB image -> uint8 tensor [size, size, 3], resized (squashed) with PIL bicubic."""
    from PIL import Image

    if img.mode != "RGB":
        img = img.convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())


def normalize_uint8_batch(
    batch_hwc: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device | str | None = None,
    channels_last: bool = True,
) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> normalised float32 [B, 3, H, W].

    The permute of an NHWC tensor is already channels_last in memory, so ``channels_last=True``
    costs nothing; ``False`` returns a contiguous NCHW tensor.
    """
    if device is not None:
        batch_hwc = batch_hwc.to(device, non_blocking=True)
    x = batch_hwc.float()
    m = torch.tensor(mean, dtype=x.dtype, device=x.device) * 255.0
    s = torch.tensor(std, dtype=x.dtype, device=x.device) * 255.0
    x = ((x - m) / s).permute(0, 3, 1, 2)
    return x if channels_last else x.contiguous()


def to_batch(
    images,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device | str | None = None,
    channels_last: bool = True,
) -> torch.Tensor:
    """Accept a ready tensor [B, 3, H, W] / [3, H, W], or one or more paths / PIL images /
    HxWx3 uint8 arrays, and return a normalised float32 batch [B, 3, size, size]."""
    if isinstance(images, torch.Tensor):
        x = images.unsqueeze(0) if images.dim() == 3 else images
        return x.to(device) if device is not None else x
    if isinstance(images, (str, os.PathLike, np.ndarray)) or hasattr(images, "convert"):
        images = [images]
    arrays = []
    for item in images:
        if isinstance(item, (str, os.PathLike)):
            item = load_rgb(item)
        elif isinstance(item, np.ndarray):
            from PIL import Image

            item = Image.fromarray(item)
        arrays.append(resize_to_uint8(item, size))
    return normalize_uint8_batch(torch.stack(arrays), mean, std, device, channels_last)


def list_images(source: PathLike | Iterable[PathLike]) -> list[Path]:
    """A directory (its image files, non-recursive, sorted by name), a single image file, or an
    iterable of paths (kept in order)."""
    if isinstance(source, (str, os.PathLike)):
        p = Path(source)
        if p.is_dir():
            return sorted(
                (c for c in p.iterdir() if c.is_file() and c.suffix.lower() in IMAGE_EXTENSIONS),
                key=lambda c: c.name,
            )
        if p.is_file():
            return [p]
        raise ImageSourceError(f"--images {str(p)!r}: no such folder or file; expected a folder of images "
                               f"({', '.join(IMAGE_EXTENSIONS)}) or one image file")
    return [Path(x) for x in source]
