"""Encoder prompt tuning with the MLP re-parameterisation (VL-Adapter's prompt baseline, spec §4.6).

P = Linear(mid -> D)(tanh(Linear(D -> mid)(E[0..n)))), prepended to the encoder input: BART gives the
prompts no position embedding but normalises them with the text (`layernorm_embedding`); the
attention mask gets ones for them, in the encoder and in the decoder's cross-attention.
"""

from __future__ import annotations

import torch
from torch import nn


class EncoderPrompt(nn.Module):
    def __init__(self, d_model: int, length: int = 40, mid_dim: int = 800):
        super().__init__()
        self.length = length
        self.prefix_embedding = nn.Embedding(length, d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, mid_dim), nn.Tanh(), nn.Linear(mid_dim, d_model))

    def forward(self, batch_size: int) -> torch.Tensor:
        p = self.mlp(self.prefix_embedding.weight)  # [n, D]
        return p.unsqueeze(0).expand(batch_size, -1, -1)
