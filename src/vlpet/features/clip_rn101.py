"""CLIP RN101 grid features, the VL-Adapter recipe (spec §3.1).

An image is resized to 224x224 (PIL bicubic) and normalised with CLIP mean/std; the visual
ResNet trunk runs up to and including ``layer4`` (attention pooling skipped), giving the C5 map
[B, 2048, 7, 7], flattened row-major to [B, 49, 2048].

Needs the optional ``open_clip`` package (extra ``vlpet[clip]``, which itself needs torchvision)
and network access the first time, to download the OpenAI weights. Imported lazily.
"""

from __future__ import annotations

import torch
from torch import nn

from ._image import CLIP_MEAN, CLIP_STD, to_batch
from ..errors import VLPetError

FEAT_DIM = 2048
IMAGE_SIZE = 224

INSTALL_HINT = (
    "pip install 'vlpet[clip]' and a torchvision build matching your torch "
    "(e.g. pip install torchvision==<the version paired with torch {torch}>, "
    "from the same index/CUDA variant you installed torch from)"
)


class MissingOptionalDependency(VLPetError, ImportError):
    """An optional dependency is not installed; the message says how to install it."""


def _import_open_clip():
    try:
        import open_clip  # noqa: F401  (also imports torchvision)
    except ImportError as exc:
        missing = getattr(exc, "name", None) or "open_clip"
        if missing not in ("open_clip", "torchvision"):
            missing = f"open_clip (import failed: {exc})"
        raise MissingOptionalDependency(
            f"The 'clip-rn101' encoder needs the optional package {missing!r}, which is not "
            f"installed. Install it with: " + INSTALL_HINT.format(torch=torch.__version__)
        ) from exc
    return open_clip


class ClipRN101GridEncoder(nn.Module):
    """Wraps open_clip's RN101 visual trunk; ``forward`` returns [B, 49, 2048] at 224 px."""

    mean = CLIP_MEAN
    std = CLIP_STD
    image_size = IMAGE_SIZE
    feat_dim = FEAT_DIM

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual
        # The C5 map is what the trunk produces right before attention pooling.
        self.visual.attnpool = nn.Identity()

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(dtype=next(self.visual.parameters()).dtype)
        return self.visual(x)  # [B, 2048, 7, 7] with attnpool removed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.feature_map(x).flatten(2).transpose(1, 2).float().contiguous()

    def preprocess(self, images, channels_last: bool = False) -> torch.Tensor:
        device = next(self.parameters()).device
        return to_batch(images, IMAGE_SIZE, CLIP_MEAN, CLIP_STD, device, channels_last)

    @torch.inference_mode()
    def grid_features(self, images) -> torch.Tensor:
        return self(self.preprocess(images))


def load_clip_rn101(
    device: torch.device | str = "cpu",
    pretrained: str = "openai",
    cache_dir: str | None = None,
) -> ClipRN101GridEncoder:
    """open_clip ``create_model_and_transforms('RN101', pretrained=...)``, visual trunk only.

    ``pretrained`` may be 'openai' (downloaded on first use) or a local checkpoint path.
    open_clip's own transform (resize shortest side + centre crop) is *not* used: the
    VL-Adapter recipe squashes the whole image to 224x224, see :meth:`preprocess`.
    """
    open_clip = _import_open_clip()
    model, _, _ = open_clip.create_model_and_transforms(
        "RN101", pretrained=pretrained, device=device, cache_dir=cache_dir
    )
    model.eval()
    enc = ClipRN101GridEncoder(model.visual).eval()
    for p in enc.parameters():
        p.requires_grad_(False)
    return enc


def grid_features(images, model: ClipRN101GridEncoder | None = None) -> torch.Tensor:
    """[B, 49, 2048] CLIP RN101 C5 grid features (loads the model if not given)."""
    model = model or load_clip_rn101()
    return model.grid_features(images)
