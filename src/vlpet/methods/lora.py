"""LoRA through Hugging Face PEFT, injected into the existing model (no PeftModel wrapper).

PEFT's `inject_adapter_in_model` replaces the targeted nn.Linear layers by its LoRA layers in place,
which fits vlpet's approach of wrapping sub-modules of an unmodified HF model; the paper's LoRA row
(q and v of every attention, r=128, alpha 32, dropout 0.1) is expressible exactly.
"""

from __future__ import annotations

import re

from torch import nn

from ..backbones.arch import ArchSpec
from ..method import LoraSpec


def lora_target_regex(arch: ArchSpec, spec: LoraSpec) -> str:
    parts = []
    for placement in spec.placements:
        stack = placement.split(".")[0]
        layers = arch.encoder_layers if stack == "encoder" else arch.decoder_layers
        parts.append(re.escape(layers) + r"\.\d+\." + re.escape(arch.projections[placement]))
    return r"^(" + "|".join(parts) + r")$"


def inject_lora(backbone: nn.Module, arch: ArchSpec, spec: LoraSpec) -> list[nn.Module]:
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                        target_modules=lora_target_regex(arch, spec), bias="none")
    inject_adapter_in_model(config, backbone)
    return [m for name, m in backbone.named_modules() if name.endswith(("lora_A", "lora_B"))]
