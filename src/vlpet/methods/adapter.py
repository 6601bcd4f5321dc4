"""Bottleneck modifications ΔH: the (multi-head) adapter and the Compacter PHM adapter.

ΔH = W_up · gelu_new(W_down · H + b_down) + b_up. The multi-head down-projection of VL-PET (N_h heads
Linear(D -> r/N_h), each reading the full H, concatenated in head order) is exactly one
Linear(D -> r) whose weight is the row-stack of the heads (spec §1.2), so it is stored fused:
rows [h·r/N_h, (h+1)·r/N_h) of `down.weight` are head h. `n_heads` stays as a knob: it fixes the
per-head layout used by the official-checkpoint importer and the per-head RNG order at init.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from ..granularity import gelu_new
from ..recompute import run_pet


class Bottleneck(nn.Module):
    """`d_out`: the width of ΔH (default d_model); narrower for a value adapter on grouped-query attention,
    whose v_proj gives n_kv_heads x head_dim features."""

    def __init__(self, d_model: int, r: int, n_heads: int = 1, d_out: int | None = None):
        super().__init__()
        if r % n_heads:
            raise ConfigError(f"adapter bottleneck r={r} must be divisible by n_heads={n_heads} (spec §1.2)")
        self.n_heads = n_heads
        self.down = nn.Linear(d_model, r)
        self.up = nn.Linear(r, d_model if d_out is None else d_out)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(gelu_new(self.down(h)))


class PHMLinear(nn.Module):
    """Parameterised hypercomplex multiplication layer (Compacter, n = phm_n, no shared/factorised rule).

    W = Σ_i A_i ⊗ B_i with A_i ∈ R^{n×n} (`rule`) and B_i ∈ R^{in/n × out/n} (`weight`), plus a bias.
    Parameters: n³ + in·out/n + out.
    """

    def __init__(self, in_features: int, out_features: int, n: int = 2):
        super().__init__()
        if in_features % n or out_features % n:
            raise ConfigError(f"PHM layer {in_features}->{out_features} needs both sizes divisible by n={n}")
        self.n, self.in_features, self.out_features = n, in_features, out_features
        self.rule = nn.Parameter(torch.empty(n, n, n))
        self.weight = nn.Parameter(torch.empty(n, in_features // n, out_features // n))
        self.bias = nn.Parameter(torch.zeros(out_features))
        self.reset_parameters()

    def reset_parameters(self):
        # Compacter's defaults: rule ~ N(0, 0.01), weights Glorot-uniform, zero bias.
        nn.init.normal_(self.rule, std=0.01)
        for i in range(self.n):
            nn.init.xavier_uniform_(self.weight.data[i])
        nn.init.zeros_(self.bias)

    def full_weight(self) -> torch.Tensor:
        n, p, q = self.n, self.in_features // self.n, self.out_features // self.n
        # kron(A, B)[i*p + k, j*q + l] = A[i, j] * B[k, l], summed over the n terms.
        return torch.einsum("sij,skl->ikjl", self.rule, self.weight).reshape(n * p, n * q)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x, self.full_weight().to(x.dtype)) + self.bias.to(x.dtype)


class PHMBottleneck(nn.Module):
    def __init__(self, d_model: int, r: int, n: int = 2):
        super().__init__()
        self.down = PHMLinear(d_model, r, n)
        self.up = PHMLinear(r, d_model, n)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(gelu_new(self.down(h)))


class ParallelLinear(nn.Module):
    """A frozen projection plus a parallel modification on the same input: base(E) + ΔH(E).

    Used for the decoder cross-attention value adapter (VPA, spec §2.2): wrapping `v_proj` (BART) /
    `v` (T5) lets transformers' cross-attention cache hold the adapted values, so the adapter runs
    once per encoder output during generation.
    """

    def __init__(self, base_layer: nn.Module, delta: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.delta = delta

    disabled = False  # VLModel.disable_adapters: the plain projection

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            return self.base_layer(x)
        # issue 19: run_pet recomputes the adapter in the backward when self.pet_recompute is set
        return self.base_layer(x) + run_pet(self, self.delta, x)
