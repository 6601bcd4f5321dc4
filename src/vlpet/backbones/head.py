"""An LM head whose matrix product runs on an aligned vocabulary (issue 8).

BART-base's vocabulary after the 200-row extension has 50,465 rows; T5-base's 32,300. An odd row
count makes the logits' row stride unaligned, which keeps cuBLAS off its fast sm90 kernels for the
forward product and for the backward product into the hidden states (the H100 profile showed two
`cutlass_75` GEMMs of 4.1 and 3.0 ms per step, ~9 % of the step). `AlignedLMHead` multiplies by the
weight zero-padded to a multiple of 64 rows and returns the first `out_features` columns: the same
logits (the padded rows are never part of the output); the pad costs one copy of the weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ALIGN = 64


class AlignedLMHead(nn.Linear):
    """An nn.Linear (same parameters, same state-dict keys, tied weights stay tied) with a padded product."""

    PAD_DEVICES = ("cuda",)  # alignment is a GPU-kernel matter; elsewhere the plain product runs

    @classmethod
    def replace(cls, head: nn.Linear) -> nn.Linear:
        if type(head) is not nn.Linear or head.out_features % ALIGN == 0:
            return head
        new = cls.__new__(cls)
        new.__dict__.update(head.__dict__)  # shares the Parameter objects (and so the tie with the embedding)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.weight.shape[0]
        pad = (-v) % ALIGN
        if pad == 0 or x.device.type not in self.PAD_DEVICES:
            return super().forward(x)
        w = F.pad(self.weight, (0, 0, 0, pad))
        b = None if self.bias is None else F.pad(self.bias, (0, pad))
        return F.linear(x, w, b)[..., :v]
