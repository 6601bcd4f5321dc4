"""AdamW and the linear warm-up / decay schedule of spec §4.1.

Weight decay 0.01 except biases and normalisation weights (the intended rule). The official code's
no-decay list ("bias", "LayerNorm.weight") never matches BART/T5 norm names, so its LNs *are*
decayed: `official_ln_decay=True` reproduces that.
"""

from __future__ import annotations

import torch
from torch import nn

from ..backbones.norms import is_norm


def _norm_param_ids(model: nn.Module) -> set[int]:
    ids = set()
    for m in model.modules():
        if is_norm(m):
            ids.update(id(p) for p in m.parameters(recurse=False))
    return ids


def param_groups(model: nn.Module, weight_decay: float = 0.01, official_ln_decay: bool = False):
    norm_ids = _norm_param_ids(model)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if official_ln_decay:
            skip = "bias" in name or "LayerNorm.weight" in name
        else:
            skip = name.endswith("bias") or id(p) in norm_ids
        (no_decay if skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.01, eps: float = 1e-6,
                    official_ln_decay: bool = False, fused: bool | None = None,
                    betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Optimizer:
    groups = param_groups(model, weight_decay, official_ln_decay)
    on_cuda = any(p.is_cuda for g in groups for p in g["params"])
    kwargs = {"fused": True} if (fused if fused is not None else on_cuda) else {}
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **kwargs)


LR_SCHEDULES = ("linear", "constant")


def build_scheduler(optimizer, total_steps: int, warmup_ratio: float = 0.1, schedule: str = "linear"):
    """Linear warm-up over ``warmup_ratio`` of the steps, then linear decay to 0 (spec §4.1, "linear")
    or a constant learning rate ("constant")."""
    from transformers import get_constant_schedule_with_warmup, get_linear_schedule_with_warmup

    warmup = int(total_steps * warmup_ratio)
    if schedule == "constant":
        return get_constant_schedule_with_warmup(optimizer, warmup)
    if schedule != "linear":
        raise ValueError(f"lr schedule {schedule!r}: expected one of {', '.join(LR_SCHEDULES)}")
    return get_linear_schedule_with_warmup(optimizer, warmup, max(total_steps, 1))
