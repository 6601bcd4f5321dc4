"""A tiny VL-Adapter tree with real image files, for tests and smoke runs of VLMs that read pixels.

``make_image_fixture(root)`` writes the annotation files of :func:`make_image_text_fixture` (the same
questions, captions and NLVR2 statements for the same seed) under ``root/datasets`` and one real PNG
file per image under ``root/images`` in the layout of :mod:`vlpet.data.images`. Each image shows its
hidden concept: a shape in the concept colour (COCO, NLVR2) or the concept shape (GQA) on a grey
background, so a tiny VLM can lower its loss on every task.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .fixtures import COLORS, SHAPES, ImageTextFixture, make_image_text_fixture
from .images import ImageRoot

__all__ = ["make_image_fixture", "ImageFixture", "draw_concept", "RGB"]

RGB = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 170, 60), "yellow": (235, 215, 40)}


@dataclass
class ImageFixture:
    data: ImageTextFixture  # annotations (data_root = data.root) and the concept of every image
    image_root: Path
    #: (source, img_id) -> the PNG file written
    files: dict


def draw_concept(color: str, shape: str, size: int = 32, jitter: tuple[int, int] = (0, 0)):
    """A ``size`` x ``size`` RGB PIL image: a ``shape`` in ``color`` on grey."""
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (size, size), (128, 128, 128))
    d = ImageDraw.Draw(im)
    m = size // 5
    x0, y0 = m + jitter[0], m + jitter[1]
    x1, y1 = size - m + jitter[0], size - m + jitter[1]
    fill = RGB[color]
    if shape == "circle":
        d.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape == "square":
        d.rectangle((x0, y0, x1, y1), fill=fill)
    elif shape == "triangle":
        d.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    else:  # star
        cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
        pts = [(cx + (r if k % 2 == 0 else r / 2.5) * np.sin(k * np.pi / 5),
                cy - (r if k % 2 == 0 else r / 2.5) * np.cos(k * np.pi / 5)) for k in range(10)]
        d.polygon(pts, fill=fill)
    return im


def make_image_fixture(root: str | os.PathLike, n_per_split: int = 6, seed: int = 0, *, image_size: int = 32,
                       include_empty_label: bool = True) -> ImageFixture:
    root = Path(root)
    data = make_image_text_fixture(root / "datasets", n_per_split=n_per_split, feat_dim=len(COLORS), seed=seed,
                                   include_empty_label=include_empty_label, write_features=False)
    image_root = root / "images"
    image_root.mkdir(parents=True, exist_ok=True)
    layout = ImageRoot(image_root)
    rng = np.random.default_rng(seed + 1)
    files = {}
    for (source, img_id), concept in sorted(data.concepts.items()):
        if concept in COLORS:
            color, shape = concept, SHAPES[int(rng.integers(len(SHAPES)))]
        else:
            color, shape = COLORS[int(rng.integers(len(COLORS)))], concept
        jitter = tuple(int(v) for v in rng.integers(-2, 3, size=2))
        stem = layout.stem(source, img_id)
        path = stem.with_name(stem.name + ".png")
        path.parent.mkdir(parents=True, exist_ok=True)
        draw_concept(color, shape, image_size, jitter).save(path, format="PNG")
        files[(source, img_id)] = path
    return ImageFixture(data, image_root, files)
