"""Keep the frozen backbone in bf16 when training under bf16 autocast (issue 8).

Under plain autocast the frozen weights stay fp32: every LayerNorm returns fp32, so the residual
stream, dropout and every saved activation of the backbone are fp32, and each Linear casts its input
back to bf16 (forward) and its input gradient to fp32 (backward). With the frozen tensors stored in
bf16 and the norms' outputs returned in their input's dtype, the whole backbone runs in bf16; the
trainable tensors (PET modules, visual embedding, trainable norms and biases) stay fp32 (they are the
optimizer's master weights) and autocast casts them per call, as before.

What changes numerically: the frozen weights and the residual stream are rounded to bf16 (autocast
already rounds each Linear's weight and input to bf16, so the matrix products are those of plain
autocast). Norms still compute in fp32 inside. Only frozen tensors of `model.backbone` are cast; the
added vocabulary rows are saved in fp32 (vlpet.checkpoint), so a checkpoint does not depend on it.
"""

from __future__ import annotations

import torch
from torch import nn

from .backbones.norms import is_norm_like
from .errors import ConfigError

LOW_PRECISION = (torch.bfloat16, torch.float16)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_frozen_dtype(choice: str, precision: str) -> torch.dtype:
    """`--frozen-dtype auto` follows bf16 training (fp16 keeps fp32: an fp16 residual stream can overflow)."""
    if choice == "auto":
        return torch.bfloat16 if precision == "bf16" else torch.float32
    if choice not in DTYPES:
        raise ConfigError(f"--frozen-dtype {choice!r}: expected one of auto, {', '.join(DTYPES)}")
    dtype = DTYPES[choice]
    if dtype != torch.float32 and precision != choice:
        raise ConfigError(f"--frozen-dtype {choice} needs --precision {choice} (the frozen weights are used inside "
                          f"autocast of that dtype), got --precision {precision}")
    return dtype


def _keep_input_dtype(module: nn.Module, args: tuple, output):
    """Forward hook on a norm: autocast runs norms in fp32; hand the output back in the input's dtype."""
    x = args[0] if args else None
    if torch.is_tensor(output) and torch.is_tensor(x) and x.dtype in LOW_PRECISION and output.dtype != x.dtype:
        return output.to(x.dtype)
    return None


def apply_frozen_dtype(model: nn.Module, choice: str, precision: str) -> None:
    """`set_frozen_dtype` with the dtype that `--frozen-dtype CHOICE` gives for `--precision PRECISION`."""
    set_frozen_dtype(model, resolve_frozen_dtype(choice, precision))


@torch.no_grad()
def set_frozen_dtype(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast every frozen floating parameter and buffer of `model.backbone` to `dtype` (in place, keeping
    tied parameters tied) and, for a low-precision dtype, make the backbone's norms return their input's
    dtype. Casting back to fp32 is allowed (the values stay rounded); fp32 on an fp32 model changes nothing."""
    backbone = model.backbone
    # A norm with a trainable bias next to a frozen weight (BitFit, LoRA rows) keeps both in fp32: norms
    # are tiny, and a norm kernel takes one dtype for its weight and bias.
    keep = {id(p) for m in backbone.modules() if is_norm_like(m) and any(q.requires_grad for q in m.parameters())
            for p in m.parameters()}
    for p in backbone.parameters():  # unique Parameters: a tied embedding / LM head is cast once
        if not p.requires_grad and p.is_floating_point() and p.dtype != dtype and id(p) not in keep:
            p.data = p.data.to(dtype)
    for mod in backbone.modules():
        for name, b in list(mod._buffers.items()):
            if b is not None and b.is_floating_point() and b.dtype != dtype:
                mod._buffers[name] = b.to(dtype)
    for h in getattr(model, "_norm_dtype_hooks", []):
        h.remove()
    model._norm_dtype_hooks = []
    if dtype in LOW_PRECISION:
        model._norm_dtype_hooks = [m.register_forward_hook(_keep_input_dtype)
                                   for m in backbone.modules() if is_norm_like(m)]
