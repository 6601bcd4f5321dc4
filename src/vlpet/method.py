"""A PET method as data: modification x granularity control x placement x trainable extras.

A `MethodConfig` is JSON-serialisable (it is written into every adapter folder) and validated with
errors that name the offending field. The paper's rows are instances of it (see `presets.py`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError
from .data.tasks import TASKS
from .granularity import GateOptions

MODIFICATIONS = ("adapter", "phm_adapter", "none")
MODES = ("sequential", "parallel")
SUBLAYER_PLACEMENTS = ("encoder.self_attn", "encoder.ffn", "decoder.self_attn", "decoder.cross_attn", "decoder.ffn")
PROJECTION_PLACEMENTS = tuple(f"{s}.{p}" for s in ("encoder.self_attn", "decoder.self_attn", "decoder.cross_attn")
                              for p in "qkvo")
TRAINABLE_EXTRAS = ("visual_embedding", "encoder_layer_norms", "all_layer_norms", "biases", "all")
ZERO_INITS = ("up", "gate")
VALUE_POSITIONS = ("all", "prefix")


@dataclass(frozen=True)
class ModuleSpec:
    """One kind of module placed at several points of every layer.

    mode "sequential" on a sub-layer: H_new = s · G ⊙ (H + ΔH(H)) replaces the sub-layer output.
    mode "parallel" on a projection (e.g. "decoder.cross_attn.v"): P(E) + ΔH(E) (the VPA, spec §2.2).
    mode "parallel" on a sub-layer: H_new = s · G ⊙ (H + ΔH(X)), X the sub-layer input as the gate sees it.
    """

    placements: tuple[str, ...]
    modification: str = "adapter"
    mode: str = "sequential"
    r: int = 96
    n_heads: int = 1
    phm_n: int = 2
    gate: GateOptions = field(default_factory=GateOptions)
    scale: float = 1.0
    scale_delta_only: bool = False
    zero_init: tuple[str, ...] = ()
    # A parallel module on a projection: "all" positions, or "prefix" = only the image + prompt positions
    # of a decoder-only LM (its self-attention value adapter, vlpet.decoder_only).
    positions: str = "all"

    def __post_init__(self):
        _check_choice("modification", self.modification, MODIFICATIONS)
        _check_choice("positions", self.positions, VALUE_POSITIONS)
        _check_choice("mode", self.mode, MODES)
        for p in self.placements:
            _check_choice("placements", p, SUBLAYER_PLACEMENTS + PROJECTION_PLACEMENTS)
            if p in PROJECTION_PLACEMENTS and (self.mode != "parallel" or self.gate.kind != "none"):
                raise ConfigError(f"placement {p!r} is a projection: it takes mode 'parallel' and no gate")
            if self.gate.kind != "none" and not p.startswith("encoder."):
                raise ConfigError(f"placement {p!r}: granularity gates are defined for encoder sub-layers only "
                                  f"(the official decoder has no gate, spec §1.7)")
        if self.positions == "prefix":
            for p in self.placements:
                if p not in PROJECTION_PLACEMENTS:
                    raise ConfigError(f"positions 'prefix' is for a parallel module on a projection (e.g. "
                                      f"'encoder.self_attn.v'); placement {p!r} is a sub-layer")
        for z in self.zero_init:
            _check_choice("zero_init", z, ZERO_INITS)
        if self.r <= 0 or self.n_heads <= 0 or self.r % self.n_heads:
            raise ConfigError(f"r={self.r} must be positive and divisible by n_heads={self.n_heads}")


@dataclass(frozen=True)
class LoraSpec:
    """LoRA through PEFT on attention projections (placements from PROJECTION_PLACEMENTS)."""

    placements: tuple[str, ...]
    r: int = 128
    alpha: int = 32
    dropout: float = 0.1

    def __post_init__(self):
        for p in self.placements:
            _check_choice("lora.placements", p, PROJECTION_PLACEMENTS)


@dataclass(frozen=True)
class PromptSpec:
    """Encoder prompt tuning with the MLP re-parameterisation (Embedding -> Linear -> tanh -> Linear)."""

    length: int = 40
    mid_dim: int = 800


@dataclass(frozen=True)
class HyperformerSpec:
    """HyperFormer adapters: per-layer adapter weights generated from a task + layer embedding."""

    r: int = 96
    task_embedding_dim: int = 512
    task_hidden_dim: int = 128
    projected_dim: int = 8
    tasks: tuple[str, ...] = TASKS  # the image-text tasks of the task registry


@dataclass(frozen=True)
class MethodConfig:
    name: str
    modules: tuple[ModuleSpec, ...] = ()
    lora: LoraSpec | None = None
    prompt: PromptSpec | None = None
    hyperformer: HyperformerSpec | None = None
    trainable: tuple[str, ...] = ("visual_embedding",)
    add_biases: bool = False  # BitFit on bias-free backbones (T5, as in the LST paper): add zero biases
    task_prompts: bool = True  # "vqa: " etc. in the encoder text (spec §3.5)
    description: str = ""

    def __post_init__(self):
        for t in self.trainable:
            _check_choice("trainable", t, TRAINABLE_EXTRAS)

    # -- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def with_overrides(self, overrides: dict[str, Any], source: str = "--method-overrides") -> "MethodConfig":
        """This config with some top-level fields replaced (checked as `from_dict` checks a whole config)."""
        return type(self).from_dict({**self.to_dict(), **overrides}, source)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "method config") -> "MethodConfig":
        try:
            return _build(cls, data, source)
        except TypeError as exc:
            raise ConfigError(f"{source}: {exc}") from exc


def _check_choice(name: str, value, allowed):
    if value not in allowed:
        raise ConfigError(f"{name}: {value!r} is not allowed; expected one of: {', '.join(map(str, allowed))}")


_NESTED = {"gate": GateOptions, "lora": LoraSpec, "prompt": PromptSpec, "hyperformer": HyperformerSpec}


def _build(cls, data, source):
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a JSON object for {cls.__name__}, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)} in {cls.__name__}; "
                          f"allowed: {', '.join(sorted(names))}")
    kwargs = {}
    for key, value in data.items():
        if key == "modules":
            kwargs[key] = tuple(_build(ModuleSpec, m, f"{source}.modules[{i}]") for i, m in enumerate(value))
        elif key in _NESTED and value is not None:
            kwargs[key] = _build(_NESTED[key], value, f"{source}.{key}")
        elif isinstance(value, list):
            kwargs[key] = tuple(value)
        else:
            kwargs[key] = value
    return cls(**kwargs)
