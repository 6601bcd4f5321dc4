"""Recompute the PET activations in the backward instead of storing them (issue 19).

Without it, a gated sub-layer keeps for its backward, besides the frozen backbone's own tensors, the
full-width [tokens x D] tensors of the PET module: H (the down-projection's input), G (the sigmoid's
output) and Y = H + ΔH (the gated product's other factor), plus the bottleneck activations. With it,
the PET call runs under `torch.utils.checkpoint` (non-reentrant, so torch.compile traces it as one
region that its partitioner recomputes): only the call's inputs H, X and the mask are kept (X is the
sub-layer's input, which the backbone keeps anyway), and the bottlenecks, up-projections, gate and
gated product run again in the backward. The recomputed forward is the same code on the same
inputs, so outputs and gradients equal the stored path's (tests/test_recompute.py).

An attention sub-layer's H is the output of its last projection W_o, whose input O (the attention
output) a fused attention kernel's backward keeps anyway. With recompute on, that projection moves into
the recomputed region too (`GatedSublayer.defer_output_projection`, where `ArchSpec.attention_keeps_output`):
the region's input is O instead of H, so H is not kept either, at one [tokens x D] x [D x D] product more
in the backward. (The FFN's last projection is left out: its input, the wide activation after the GELU
and dropout, is not what the frozen FFN keeps, which is fc1's output before them; deferring fc2 alone
would keep a tensor four times the size of H.)

It wraps any callable, so it does not depend on the gate kind or on how the PET module is written:
`GatedSublayer.forward` and `ParallelLinear.forward` call `run_pet(self, fn, *args)`, which checks
the owner's `pet_recompute` flag. Switch it per model with `set_recompute(model, True)`.
Without autograd (generation, evaluation under no_grad) the call is direct either way.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .errors import ConfigError

# Off by default: on GPU it trades recompute time for memory; benchmarks/README.md has the figures.
RECOMPUTE_DEFAULT = False


def _has_randomness(module: nn.Module) -> bool:
    # a dropout inside the PET module must replay the same mask in the recompute; nothing else draws
    return any(isinstance(m, nn.Dropout) and m.p > 0 for m in module.modules())


def run_pet(owner: nn.Module, fn, *args):
    """fn(*args), recomputed in the backward when `owner.pet_recompute` is set and autograd records."""
    if not getattr(owner, "pet_recompute", RECOMPUTE_DEFAULT) or not torch.is_grad_enabled():
        return fn(*args)
    # RNG state is saved only if the module can draw (saving it costs host time per call)
    rng = getattr(owner, "_pet_recompute_rng", True)
    return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=rng)


def _owners(model: nn.Module):
    from .methods.adapter import ParallelLinear
    from .placement import GatedSublayer

    for m in model.modules():
        if isinstance(m, (GatedSublayer, ParallelLinear)):
            yield m


def set_recompute(model: nn.Module, enabled: bool = True) -> int:
    """Turn recomputation of every gated sub-layer's PET module and every parallel (VPA) adapter of
    `model` on or off; returns how many modules were switched."""
    from .decoder_only import CausalSmallGate

    if enabled and any(isinstance(m, CausalSmallGate) and m.prefix is not None for m in model.modules()):
        # its prefix mean reads the PrefixState of the VLModel call, which is cleared before the backward
        raise ConfigError("set_recompute: the causal G_small of a decoder-only VLM cannot be recomputed in the "
                          "backward; use another granularity (vl-pet-large / -middlex / -middley) or no recompute")
    from .placement import GatedSublayer

    n = 0
    for m in list(_owners(model)):
        m.pet_recompute = bool(enabled)
        m._pet_recompute_rng = _has_randomness(m.pet if hasattr(m, "pet") else m.delta)
        if isinstance(m, GatedSublayer):
            m.defer_output_projection(bool(enabled))
        n += 1
    return n


def recompute_enabled(model: nn.Module) -> bool | None:
    """True / False when every PET owner agrees, None when the model has none or they are mixed."""
    flags = {bool(getattr(m, "pet_recompute", RECOMPUTE_DEFAULT)) for m in _owners(model)}
    return flags.pop() if len(flags) == 1 else None
