"""Which modules are normalisation layers, for every place that treats them apart: the trainable encoder LNs
(vlpet.model), no weight decay (vlpet.train.optim) and the bf16 frozen backbone (vlpet.frozen_precision)."""

from __future__ import annotations

import torch
from torch import nn

from .visual import RMSNorm


def is_norm(m: nn.Module) -> bool:
    """A LayerNorm or RMSNorm of PyTorch, vlpet or any HF model (T5LayerNorm, MBartLayerNorm, ...), by class name."""
    name = type(m).__name__
    return isinstance(m, (nn.LayerNorm, RMSNorm)) or name.endswith(("LayerNorm", "RMSNorm"))


class BiasedNorm(nn.Module):
    """A bias added after a bias-free norm (T5LayerNorm), for BitFit on T5 as the LST paper ran it."""

    def __init__(self, base_layer: nn.Module, d: int):
        super().__init__()
        self.base_layer = base_layer
        self.bias = nn.Parameter(torch.zeros(d, device=base_layer.weight.device, dtype=base_layer.weight.dtype))

    def forward(self, x):
        return self.base_layer(x) + self.bias


def is_norm_like(m: nn.Module) -> bool:
    """A norm, or a norm with its BitFit bias (that bias is part of the norm)."""
    return is_norm(m) or isinstance(m, BiasedNorm)
