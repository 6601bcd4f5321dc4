"""The granularity-controlled matrix G (spec §1.3) and the gated sub-layer H_new = s · G ⊙ (H + ΔH).

Shapes (B batch, N sequence, D hidden):
    large   G = σ(W_up · gelu_new(W_down · X + b_down) + b_up)      [B, N, D]
    middleX G = σ(w · (X + Y) + b)                                 [B, N, 1]
    middleY G = 1 + z          (paper form: 1 + σ(z))              [D]  (1 × D)
    small   G = mean_N σ(w · [X ; Y] + b)  (unmasked by default)   [B, 1, 1]
with X the sub-layer input as the gate sees it (spec §1.5) and Y = H + ΔH.

Each granularity is one `Gate` subclass in the `GATES` registry (`@register_gate`): a new one (e.g. a
causal G_small for decoder-only models) is one new class; placement, zero-init, saved configs and the
official names read it from there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError

def gelu_new(x: torch.Tensor) -> torch.Tensor:
    # HF's "gelu_new" is the tanh approximation.
    return F.gelu(x, approximate="tanh")


# -- the registry: one class per granularity -------------------------------------------------------

GATES: dict[str, type["Gate"]] = {}


def register_gate(cls: type["Gate"]) -> type["Gate"]:
    """Class decorator: make `cls` the granularity named `cls.kind` (for GateOptions, placement,
    zero-init, saved method configs and, through `cls.official`, official import/export)."""
    if not cls.kind or cls.kind in GATES:
        raise ConfigError(f"granularity {cls.kind!r} is empty or registered twice ({cls.__name__})")
    GATES[cls.kind] = cls
    return cls


def gate_kinds() -> tuple[str, ...]:
    """Every registered granularity, "none" first."""
    return tuple(GATES)


def paper_granularities() -> tuple[str, ...]:
    """The granularities of the paper's tables (the vl-pet-<g> and *-g-<g>-lw presets)."""
    return tuple(k for k, cls in GATES.items() if cls.paper)


def gate_class(kind: str) -> type["Gate"]:
    if kind not in GATES:
        raise ConfigError(f"granularity {kind!r} is unknown; allowed: {', '.join(GATES)}")
    return GATES[kind]


@dataclass(frozen=True)
class GateOptions:
    kind: str = "none"
    r_g: int = 96  # bottleneck of the large generator
    masked_mean: bool = False  # small: exclude padding from the mean (paper-friendly option)
    middley_sigmoid: bool = False  # middleY: the paper figure's 1 + σ(z) instead of 1 + z

    def __post_init__(self):
        gate_class(self.kind)


def make_gate(d_model: int, opts: GateOptions) -> "Gate | None":
    """The gate module for `opts.kind`; None for a granularity that places no module (G ≡ 1)."""
    return gate_class(opts.kind).build(d_model, opts)


class Gate(nn.Module):
    """Produces G from (X, Y): `gate(x, y, mask) -> G`, broadcastable against Y [B, N, D].

    A subclass is one granularity: `kind` (its name in GateOptions and saved configs), its parameters
    (built in `__init__`, initialised there unless the backbone's Linear rule applies, spec §1.4),
    `forward`, `zero_init` (the official 'gate' zero-init flag) and `official`: our parameter name ->
    the official name after `encoder_{attn,ff}_adapter_gating_` ({} where the official code has none).
    Parameters live in sub-modules named so that their state-dict keys say what they are
    (`gate.down`, `gate.up`, `gate.proj`, `gate.z`)."""

    kind: str = ""
    paper: bool = False  # one of the paper's four granularities (gets the paper's presets)
    official: dict[str, str] = {}
    last: str = "proj"  # the sub-module whose output is σ's logit (zeroed by the default zero_init)

    def __init__(self, d_model: int, opts: GateOptions):
        super().__init__()
        self.opts = opts

    @classmethod
    def build(cls, d_model: int, opts: GateOptions) -> "Gate | None":
        return cls(d_model, opts)

    @classmethod
    def official_tag(cls) -> str | None:
        """The official name stem that marks this granularity in a checkpoint (e.g. 'small_xy_cat')."""
        return next(iter(cls.official.values())).split(".")[0] if cls.official else None

    def forward(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def zero_init(self) -> None:
        """The official 'gate' zero-init: the last projection's weight and bias (G = σ(0) = 0.5)."""
        for p in getattr(self, self.last).parameters():
            p.zero_()


def _linear_names(ours: str, theirs: str) -> dict[str, str]:
    """Official names of a Linear's weight and bias: `ours.weight` -> `theirs.weight`, same for bias."""
    return {f"{ours}.{leaf}": f"{theirs}.{leaf}" for leaf in ("weight", "bias")}


@register_gate
class NoGate(Gate):
    """G ≡ 1: no module is placed (`GatedModification.gate` is None)."""

    kind = "none"

    @classmethod
    def build(cls, d_model: int, opts: GateOptions) -> None:
        return None


class _ScalarLogitGate(Gate):
    """A gate whose logit is one Linear(n_inputs · D -> 1) named `proj` (small, middleX)."""

    n_inputs = 1

    def __init__(self, d_model, opts):
        super().__init__(d_model, opts)
        self.proj = nn.Linear(self.n_inputs * d_model, 1)


@register_gate
class SmallGate(_ScalarLogitGate):
    """G_small = mean_N σ(w · [X ; Y] + b)  [B, 1, 1]; padding included unless `masked_mean`."""

    kind, paper = "small", True
    official = _linear_names("proj", "small_xy_cat")
    n_inputs = 2  # one Linear(2D -> 1) over [X ; Y], X first, as the official checkpoint stores it

    def token_gates(self, x, y):
        """σ(w · [X ; Y] + b) per token, [B, N, 1] (before the mean)."""
        # w · [X ; Y] = w_x · X + w_y · Y, without materialising the concatenation.
        d = x.shape[-1]
        w = self.proj.weight
        return torch.sigmoid(F.linear(x, w[:, :d]) + F.linear(y, w[:, d:], self.proj.bias))

    def forward(self, x, y, mask=None):
        g = self.token_gates(x, y)  # [B, N, 1]
        if self.opts.masked_mean and mask is not None:
            m = mask.to(g.dtype).unsqueeze(-1)
            return (g * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp_min(1.0)
        return g.mean(dim=1, keepdim=True)  # [B, 1, 1], padding included (official)


@register_gate
class MiddleXGate(_ScalarLogitGate):
    """G_middleX = σ(w · (X + Y) + b)  [B, N, 1]."""

    kind, paper = "middlex", True
    official = _linear_names("proj", "middle_xy_add")

    def forward(self, x, y, mask=None):
        return torch.sigmoid(self.proj(x + y))


@register_gate
class MiddleYGate(Gate):
    """G_middleY = 1 + z  [D] (paper figure: 1 + σ(z) with `middley_sigmoid`); z ~ N(0, 0.02)."""

    kind, paper = "middley", True
    official = {"z": "middle_ia3_add"}

    def __init__(self, d_model, opts):
        super().__init__(d_model, opts)
        self.z = nn.Parameter(torch.empty(d_model))
        nn.init.normal_(self.z, std=0.02)

    def forward(self, x, y, mask=None):
        z = torch.sigmoid(self.z) if self.opts.middley_sigmoid else self.z
        return 1.0 + z

    def zero_init(self):
        self.z.zero_()  # G = 1


@register_gate
class LargeGate(Gate):
    """G_large = σ(W_up · gelu_new(W_down · X + b_down) + b_up)  [B, N, D]."""

    kind, paper, last = "large", True, "up"
    official = {**_linear_names("down", "large_x_down"), **_linear_names("up", "large_x_up")}

    def __init__(self, d_model, opts):
        super().__init__(d_model, opts)
        self.down = nn.Linear(d_model, opts.r_g)
        self.up = nn.Linear(opts.r_g, d_model)

    def forward(self, x, y, mask=None):
        return torch.sigmoid(self.up(gelu_new(self.down(x))))


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
        return self._combine(h, self.delta(h) if self.delta is not None else None, x, mask)

    def forward_parallel(self, h: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None = None):
        """Parallel form: ΔH reads the sub-layer input X instead of H."""
        return self._combine(h, self.delta(x), x, mask)

    def _combine(self, h, d, x, mask):
        s = self.scale
        if d is not None:
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
