"""The granularity-controlled matrix G (spec §1.3) and the gated sub-layer H_new = s · G ⊙ (H + ΔH).

Shapes (B batch, N sequence, D hidden):
    large   G = σ(W_up · gelu_new(W_down · X + b_down) + b_up)      [B, N, D]
    middleX G = σ(w · (X + Y) + b)                                 [B, N, 1]
    middleY G = 1 + z          (paper form: 1 + σ(z))              [D]  (1 × D)
    small   G = mean_N σ(w · [X ; Y] + b)  (unmasked by default)   [B, 1, 1]
with X the sub-layer input as the gate sees it (spec §1.5) and Y = H + ΔH.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError

GATE_KINDS = ("none", "small", "middlex", "middley", "large")


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    # HF's "gelu_new" is the tanh approximation.
    return F.gelu(x, approximate="tanh")


@dataclass(frozen=True)
class GateOptions:
    kind: str = "none"
    r_g: int = 96  # bottleneck of the large generator
    masked_mean: bool = False  # small: exclude padding from the mean (paper-friendly option)
    middley_sigmoid: bool = False  # middleY: the paper figure's 1 + σ(z) instead of 1 + z

    def __post_init__(self):
        if self.kind not in GATE_KINDS:
            raise ConfigError(f"granularity {self.kind!r} is unknown; allowed: {', '.join(GATE_KINDS)}")


class Gate(nn.Module):
    """Produces G from (X, Y). Parameters live in sub-modules named so that their state-dict keys
    say what they are (`gate.down`, `gate.up`, `gate.proj`, `gate.z`)."""

    def __init__(self, d_model: int, opts: GateOptions):
        super().__init__()
        self.kind = opts.kind
        self.opts = opts
        if self.kind == "large":
            self.down = nn.Linear(d_model, opts.r_g)
            self.up = nn.Linear(opts.r_g, d_model)
        elif self.kind == "middlex":
            self.proj = nn.Linear(d_model, 1)
        elif self.kind == "small":
            # One Linear(2D -> 1) over [X ; Y], X first, as the official checkpoint stores it.
            self.proj = nn.Linear(2 * d_model, 1)
        elif self.kind == "middley":
            self.z = nn.Parameter(torch.empty(d_model))
            nn.init.normal_(self.z, std=0.02)
        else:
            raise ConfigError(f"Gate needs a granularity other than 'none', got {self.kind!r}")

    def forward(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.kind == "large":
            return torch.sigmoid(self.up(gelu_new(self.down(x))))
        if self.kind == "middlex":
            return torch.sigmoid(self.proj(x + y))
        if self.kind == "middley":
            z = torch.sigmoid(self.z) if self.opts.middley_sigmoid else self.z
            return 1.0 + z
        # small: w · [X ; Y] = w_x · X + w_y · Y, without materialising the concatenation.
        d = x.shape[-1]
        w = self.proj.weight
        logits = F.linear(x, w[:, :d]) + F.linear(y, w[:, d:], self.proj.bias)
        g = torch.sigmoid(logits)  # [B, N, 1]
        if self.opts.masked_mean and mask is not None:
            m = mask.to(g.dtype).unsqueeze(-1)
            return (g * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp_min(1.0)
        return g.mean(dim=1, keepdim=True)  # [B, 1, 1], padding included (official)


class GatedModification(nn.Module):
    """H_new = s · G ⊙ (H + ΔH); the official default multiplies the frozen H too (spec §1.1).

    `scale_delta_only` gives the paper-form alternative H_new = G ⊙ (H + s · ΔH).
    Any of `delta` and `gate` may be None (no gate: G ≡ 1).
    """

    def __init__(self, delta: nn.Module | None, gate: Gate | None, scale: float = 1.0,
                 scale_delta_only: bool = False):
        super().__init__()
        self.delta = delta
        self.gate = gate
        self.scale = float(scale)
        self.scale_delta_only = scale_delta_only
        self.last_gate: torch.Tensor | None = None  # filled when the owner asks to record gates
        self.record = False

    def forward(self, h: torch.Tensor, x: torch.Tensor | None = None, mask: torch.Tensor | None = None):
        s = self.scale
        if self.delta is not None:
            d = self.delta(h)
            y = h + s * d if self.scale_delta_only else h + d
        else:
            y = h
        if self.gate is not None:
            g = self.gate(x, y, mask)
            if self.record:
                self.last_gate = g.detach()
            y = g.to(y.dtype) * y  # an fp32 gate (middleY's 1 + z) must not promote a bf16 stream
        if s != 1.0 and not self.scale_delta_only:
            y = s * y
        return y
