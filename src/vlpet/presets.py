"""Named recipes: one per row of the paper's Table 2 (BART-base, T5-base) and Table 9, resolved per backbone.

Each preset is a `MethodConfig` (what is built and what trains) plus `TrainDefaults` (the paper's
optimisation settings, spec §4.5-§4.6). Settings per backbone family (spec §4.5):
    BART: r = r_g = 96, N_h = 4, s = 1.0, lr 1e-3, default N(0, 0.02) init, VQA batch 500
    T5:   r = r_g = 192, N_h = 4, s = 0.3, lr 3e-4, zero-init of adapter-up, gate and VPA-up, batch 300
    video (BART): as BART image-text but lr 7e-4, batch 50

Presets are a registry: `@register_preset(name, group)` on a builder `(family settings, d_model) ->
MethodConfig`; names resolve by lookup, and PRESETS / TABLE2 / TABLE9 / BASELINES are lists of it.
The family settings are FAMILIES[`ArchSpec.family`] (a new family is one entry there). A family may
have presets of its own (`register_preset(..., family=...)`, registered by the module its entry names):
the decoder-only VLMs' ("decoder", vlpet.decoder_only).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

from .errors import ConfigError
from .granularity import GateOptions, paper_granularities
from .method import HyperformerSpec, LoraSpec, MethodConfig, ModuleSpec, PromptSpec

ALL_SUBLAYERS = ("encoder.self_attn", "encoder.ffn", "decoder.self_attn", "decoder.cross_attn", "decoder.ffn")
ENCODER_SUBLAYERS = ("encoder.self_attn", "encoder.ffn")
VPA = ("decoder.cross_attn.v",)
LORA_QV = ("encoder.self_attn.q", "encoder.self_attn.v", "decoder.self_attn.q", "decoder.self_attn.v",
           "decoder.cross_attn.q", "decoder.cross_attn.v")
GRANULARITIES = paper_granularities()  # the paper's four, from the granularity registry


@dataclass(frozen=True)
class TrainDefaults:
    lr: float
    batch_size: int  # the VQA batch; other tasks are rescaled (spec §4.2)
    epochs: int = 20


@dataclass(frozen=True)
class Family:
    name: str
    r: int
    r_g: int
    n_heads: int
    scale: float
    zero_init: bool
    lr: float
    batch: int
    # a family with presets of its own: the module that registers them (imported on first lookup, which
    # keeps `import vlpet` light) and the one-line error for a name it does not offer ({name}, {allowed})
    module: str | None = None
    unknown: str = "unknown method/preset {name!r}; allowed: {allowed}"
    value_positions: str | None = None  # decoder-only: where the value adapter acts ("prefix" / "all")


# Decoder-only VLMs (issue 20, docs/decoder-only.md): r = d/8 (the BART family's 96 at width 768), 4 heads,
# r_g = r; zero-initialised W_up (ΔH = 0) and gate (σ gates: G = 0.5, middleY: G = 1) with s = 1 / G_init
# (2, and 1 for middleY), so that every gated preset starts as the exact pretrained LM (as LoRA's B = 0
# does) instead of halving every sub-layer of a pretrained decoder. Not tuned by the paper.
_DECODER = Family("decoder", r=96, r_g=96, n_heads=4, scale=2.0, zero_init=True, lr=3e-4, batch=64,
                  module="vlpet.decoder_only", value_positions="prefix",
                  unknown="preset {name!r} is not offered on decoder-only VLMs; allowed: {allowed}")

# Per family name (`ArchSpec.family`): (image-text settings, video settings).
FAMILIES: dict[str, tuple[Family, Family]] = {
    "bart": (Family("bart", r=96, r_g=96, n_heads=4, scale=1.0, zero_init=False, lr=1e-3, batch=500),
             Family("bart", r=96, r_g=96, n_heads=4, scale=1.0, zero_init=False, lr=7e-4, batch=50)),
    "t5": (Family("t5", r=192, r_g=192, n_heads=4, scale=0.3, zero_init=True, lr=3e-4, batch=300),
           Family("t5", r=192, r_g=192, n_heads=4, scale=0.3, zero_init=True, lr=3e-4, batch=30)),
    "decoder": (_DECODER, _DECODER),  # no video path on decoder-only VLMs
}
BART_FAMILY, VIDEO_BART_FAMILY = FAMILIES["bart"]
T5_FAMILY, VIDEO_T5_FAMILY = FAMILIES["t5"]
R_DEC = 96  # decoder VPA bottleneck in every released setting
REFERENCE_WIDTH = 768  # d_model of BART-base / T5-base, the widths the paper's sizes were set for


def family_for(family: str, video: bool = False, d_model: int | None = None) -> Family:
    """The settings of a preset family (a key of FAMILIES, i.e. an `ArchSpec.family`).

    `d_model` scales the module sizes with the language model's width (issue 18): BART family
    r = r_g = d/8, T5 family r = r_g = d/4; None keeps the paper's sizes (those of width 768)."""
    if family not in FAMILIES:
        raise ConfigError(f"preset family {family!r} is unknown; allowed: {', '.join(FAMILIES)}")
    f = FAMILIES[family][1 if video else 0]
    if d_model is None or d_model == REFERENCE_WIDTH:
        return f
    r = scaled_size(f.r, d_model, f.n_heads)
    return replace(f, r=r, r_g=r)


def scaled_size(size: int, d_model: int | None, multiple: int = 1) -> int:
    """`size` (set for width 768) at width `d_model`, rounded to a positive multiple of `multiple`."""
    if d_model is None or d_model == REFERENCE_WIDTH:
        return size
    return max(multiple, round(size * d_model / REFERENCE_WIDTH / multiple) * multiple)


# -- the registry (one entry per preset name) ------------------------------------------------------

@dataclass(frozen=True)
class Preset:
    name: str
    build: Callable[[Family, int | None], MethodConfig]  # (family settings, d_model) -> method
    group: str  # "baseline" (Table 2's baselines), "vl-pet" (Table 2's VL-PET rows) or "table9"
    lr: float | None = None  # overrides the family's learning rate


_REGISTRY: dict[str, Preset] = {}  # the presets of every family without its own (BART, T5)
_OWN: dict[str, dict[str, Preset]] = {}  # family -> its own presets (Family.module registers them)
GROUPS = ("baseline", "vl-pet", "table9")


def register_preset(name: str, group: str, lr: float | None = None, family: str | None = None):
    """Decorator (or call with the builder) that registers `build(family, d_model) -> MethodConfig`;
    `family`: a preset of that family's own table (None: of the table BART and T5 share)."""
    if group not in GROUPS:
        raise ConfigError(f"preset {name!r}: group {group!r} is not one of {', '.join(GROUPS)}")
    table = _REGISTRY if family is None else _OWN.setdefault(family, {})

    def add(build):
        if name in table:
            raise ConfigError(f"preset {name!r} is registered twice")
        table[name] = Preset(name, build, group, lr)
        return build

    return add


def _table(family: str | None) -> dict[str, Preset]:
    f = FAMILIES.get(family, (None,))[0]
    if f is None or f.module is None:
        return _REGISTRY
    importlib.import_module(f.module)  # registers the family's presets (once)
    return _OWN.get(family, {})


def list_presets(*groups: str, family: str | None = None) -> tuple[str, ...]:
    """Registered preset names in registration order, of the given groups (all without any); `family`:
    the names that family offers (None: those BART and T5 share)."""
    return tuple(n for n, p in _table(family).items() if not groups or p.group in groups)


def lookup_preset(name: str, family: str | None = None) -> Preset:
    """The registry entry of preset `name` (any case) for a backbone family; a ConfigError naming the
    allowed presets for a name the family does not offer."""
    table = _table(family)
    key = name.lower()
    if key not in table:
        template = FAMILIES[family][0].unknown if table is not _REGISTRY else Family.unknown
        raise ConfigError(template.format(name=name, allowed=", ".join(table)))
    return table[key]


def _gated_encoder(f: Family, granularity: str, modification: str, n_heads: int, d_model=None) -> ModuleSpec:
    small = scaled_size(96, d_model, n_heads)
    return ModuleSpec(
        placements=ENCODER_SUBLAYERS, modification=modification, r=f.r if modification == "adapter" else small,
        n_heads=n_heads, gate=GateOptions(kind=granularity, r_g=f.r_g if modification == "adapter" else small),
        scale=f.scale, zero_init=("up", "gate") if f.zero_init else (),
    )


def _vpa(f: Family, modification: str = "adapter", d_model=None) -> ModuleSpec:
    return ModuleSpec(placements=VPA, modification=modification, mode="parallel", r=scaled_size(R_DEC, d_model),
                      zero_init=("up",) if f.zero_init else ())


def _vl_pet(g: str, f: Family, d_model=None) -> MethodConfig:
    return MethodConfig(
        name=f"vl-pet-{g}",
        modules=(_gated_encoder(f, g, "adapter", f.n_heads, d_model), _vpa(f, d_model=d_model)),
        trainable=("visual_embedding", "encoder_layer_norms"),
        description=f"VL-PET with G_{g}: multi-head encoder adapters gated by G, decoder value adapter, encoder LNs",
    )


def _vl_adapter_g_lw(g: str, f: Family, d_model=None) -> MethodConfig:
    return MethodConfig(
        name=f"vl-adapter-g-{g}-lw",
        modules=(_gated_encoder(f, g, "adapter", 1, d_model), _vpa(f, d_model=d_model)),
        trainable=("visual_embedding", "encoder_layer_norms"),
        description=f"Table 9: VL-Adapter's single-head encoder adapter + G_{g} + lightweight designs",
    )


def _compacter_g_lw(g: str, f: Family, d_model=None) -> MethodConfig:
    return MethodConfig(
        name=f"compacter-g-{g}-lw",
        modules=(_gated_encoder(f, g, "phm_adapter", 1, d_model), _vpa(f, "phm_adapter", d_model)),
        trainable=("visual_embedding", "encoder_layer_norms"),
        description=f"Table 9: Compacter PHM encoder adapters + G_{g} + PHM decoder value adapter + encoder LNs "
                    f"(not buildable with the official code, spec §8.3)",
    )


@register_preset("full", "baseline", lr=1e-4)
def _full(f: Family, d_model=None) -> MethodConfig:
    return MethodConfig(name="full", trainable=("all",), task_prompts=False, description="full fine-tuning, no task prompts")


@register_preset("bitfit", "baseline")
def _bitfit(f: Family, d_model=None) -> MethodConfig:
    t5 = f.name == "t5"
    return MethodConfig(name="bitfit", trainable=("visual_embedding", "biases"), add_biases=t5,
                        description="all biases + visual embedding"
                        + (" (T5 has no biases: added as zeros, as the LST paper did)" if t5 else ""))


@register_preset("prompt", "baseline")
def _prompt(f: Family, d_model=None) -> MethodConfig:
    return MethodConfig(name="prompt", prompt=PromptSpec(40, 800),
                        description="40 encoder prompts through Embedding -> Linear(D,800) -> tanh -> Linear(800,D)")


@register_preset("lora", "baseline")
def _lora(f: Family, d_model=None) -> MethodConfig:
    return MethodConfig(name="lora", lora=LoraSpec(LORA_QV, r=150 if f.name == "t5" else 128, alpha=32, dropout=0.1),
                        trainable=("visual_embedding", "biases"),
                        description="LoRA (PEFT) on q, v of every attention + all biases")


@register_preset("compacter", "baseline")
def _compacter(f: Family, d_model=None) -> MethodConfig:
    return MethodConfig(
        name="compacter",
        modules=(ModuleSpec(placements=ALL_SUBLAYERS, modification="phm_adapter", r=scaled_size(96, d_model), phm_n=2),),
        trainable=("visual_embedding", "all_layer_norms"),
        description="Compacter PHM adapters (n=2) after every sub-layer + all LNs")


@register_preset("hyperformer", "baseline")
def _hyperformer(f: Family, d_model=None) -> MethodConfig:
    return MethodConfig(name="hyperformer", hyperformer=HyperformerSpec(r=scaled_size(96, d_model)),
                        trainable=("visual_embedding", "all_layer_norms"), task_prompts=False,
                        description="HyperFormer: adapter weights generated from task + layer embeddings")


@register_preset("vl-adapter", "baseline")
def _vl_adapter(f: Family, d_model=None) -> MethodConfig:
    t5 = f.name == "t5"
    return MethodConfig(
        name="vl-adapter",
        modules=(ModuleSpec(placements=ALL_SUBLAYERS, modification="adapter", r=f.r if t5 else scaled_size(96, d_model)),),
        # LST's T5 run trained no LayerNorm (its unfreeze filter missed its own T5LayerNorm class);
        # the T5 preset reproduces that count (7.98%); add "all_layer_norms" for the intended recipe.
        trainable=("visual_embedding",) if t5 else ("visual_embedding", "all_layer_norms"),
        description="VL-Adapter single adapter after every sub-layer" + ("" if t5 else " + all LNs"))


for _g in GRANULARITIES:
    register_preset(f"vl-pet-{_g}", "vl-pet")(partial(_vl_pet, _g))
for _g in GRANULARITIES:
    register_preset(f"compacter-g-{_g}-lw", "table9")(partial(_compacter_g_lw, _g))
for _g in GRANULARITIES:
    register_preset(f"vl-adapter-g-{_g}-lw", "table9")(partial(_vl_adapter_g_lw, _g))

BASELINES = list_presets("baseline")
TABLE2 = list_presets("baseline", "vl-pet")
TABLE9 = list_presets("table9")
PRESETS = list_presets()

# The paper's Params % (Table 2 and Table 9); None where the paper has no such row.
PAPER_PARAMS_PERCENT = {
    "bart": {"full": 100.0, "bitfit": 1.21, "prompt": 2.00, "compacter": 2.70, "hyperformer": 5.79, "lora": 5.93,
             "vl-adapter": 4.18, "vl-pet-small": 2.98, "vl-pet-middlex": 2.98, "vl-pet-middley": 2.98,
             "vl-pet-large": 4.16, "compacter-g-small-lw": 2.08, "compacter-g-middlex-lw": 2.07,
             "compacter-g-middley-lw": 2.07, "compacter-g-large-lw": 3.28, "vl-adapter-g-small-lw": 2.98,
             "vl-adapter-g-middlex-lw": 2.98, "vl-adapter-g-middley-lw": 2.98, "vl-adapter-g-large-lw": 4.16},
    "t5": {"full": 100.0, "bitfit": 0.83, "prompt": 1.26, "lora": 7.54, "vl-adapter": 7.98,
           "vl-pet-small": 4.51, "vl-pet-middlex": 4.50, "vl-pet-middley": 4.50, "vl-pet-large": 7.31},
}


def get_preset(name: str, family: str = "bart", video: bool = False, d_model: int | None = None) -> MethodConfig:
    """The preset `name` for a backbone family ("bart" / "t5", `ArchSpec.family`); `d_model` scales the
    adapter sizes with the language model's width (None: the paper's sizes, set for width 768).
    "decoder" (decoder-only VLMs, issue 20) has presets of its own: see vlpet.decoder_only."""
    preset = lookup_preset(name, family)
    return preset.build(family_for(family, video, d_model), d_model)


def train_defaults(name: str, family: str = "bart", video: bool = False) -> TrainDefaults:
    """The paper's learning rate and VQA batch for preset `name` (spec §4.5-§4.6): the family's, except
    where the preset sets its own (full fine-tuning: 1e-4; on decoder-only VLMs 1e-5)."""
    preset = lookup_preset(name, family)
    f = family_for(family, video)
    return TrainDefaults(lr=preset.lr if preset.lr is not None else f.lr, batch_size=f.batch, epochs=20)
