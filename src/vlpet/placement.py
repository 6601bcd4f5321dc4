"""Placing PET modules into an unmodified HF model by wrapping its sub-modules (never forking its code).

A sequential module on a sub-layer wraps the module whose output is H (`Sublayer.wrap`); when the
gate's X is not that module's own input, a `CaptureInput` wrapper on `Sublayer.capture` hands the
input over through a per-sub-layer slot. Wrapped originals live under `base_layer`, as in PEFT.
"""

from __future__ import annotations

import torch
from torch import nn

from .backbones.arch import ArchSpec
from .backbones.joint import JointContext
from .errors import ConfigError
from .granularity import GatedModification, make_gate
from .method import PROJECTION_PLACEMENTS, MethodConfig, ModuleSpec
from .methods.adapter import Bottleneck, ParallelLinear, PHMBottleneck
from .recompute import run_pet


def get_module(root: nn.Module, path: str) -> nn.Module:
    try:
        return root.get_submodule(path)
    except AttributeError as exc:
        raise ConfigError(f"module path {path!r} not found in {type(root).__name__}: {exc}") from exc


def set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, new)


class _Slot:
    __slots__ = ("x",)

    def __init__(self):
        self.x = None


class CaptureInput(nn.Module):
    """Passes its first input to a slot (the gate's X), then runs the wrapped module unchanged."""

    def __init__(self, base_layer: nn.Module, slot: _Slot):
        super().__init__()
        self.base_layer = base_layer
        self._slot = slot

    def forward(self, x, *args, **kwargs):
        self._slot.x = x
        return self.base_layer(x, *args, **kwargs)


class GatedSublayer(nn.Module):
    """Replaces a sub-layer's output H by the PET module's H_new (before dropout and residual)."""

    def __init__(self, base_layer: nn.Module, pet: GatedModification, output_index: int | None,
                 slot: _Slot | None, ctx: JointContext, parallel: bool = False, out_proj: str | None = None):
        super().__init__()
        self.base_layer = base_layer
        self.pet = pet
        self.output_index = output_index
        self._slot = slot
        self._ctx = [ctx]
        self.parallel = parallel
        # issue 19: the path (inside base_layer) of the sub-layer's last projection, whose output is H; with
        # recompute on, vlpet.recompute defers it into the recomputed region (`_deferred`)
        self.out_proj_path = out_proj
        self._deferred: DeferredProjection | None = None

    disabled = False  # VLModel.disable_adapters: the plain sub-layer

    def forward(self, *args, **kwargs):
        out = self.base_layer(*args, **kwargs)
        # with a deferred output projection, base_layer gave that projection's input O, not H
        h = out if self.output_index is None else out[self.output_index]
        if self.disabled:
            if self._slot is not None:
                self._slot.x = None
            return out if self._deferred is None else self._replace(out, self._deferred.inner(h))
        if self._slot is not None:
            x, self._slot.x = self._slot.x, None
        else:
            x = args[0] if args else kwargs["hidden_states"]
        ctx = self._ctx[0]
        mask = ctx.mask if ctx.active else None
        # issue 19: run_pet recomputes the PET module in the backward when self.pet_recompute is set
        fn = self._project_then_pet if self._deferred is not None else self._pet_fn()
        return self._replace(out, run_pet(self, fn, h, x, mask))

    def _pet_fn(self):
        return self.pet.forward_parallel if self.parallel else self.pet

    def _project_then_pet(self, o, x, mask):
        return self._pet_fn()(self._deferred.inner(o), x, mask)

    def _replace(self, out, new):
        if self.output_index is None:
            return new
        out = list(out)
        out[self.output_index] = new
        return tuple(out)

    def defer_output_projection(self, enabled: bool) -> None:
        """Move the sub-layer's last projection into the recomputed PET region (True) or back (False).

        The backward then keeps the projection's input O instead of its output H; for an attention
        sub-layer O is the attention output, which the attention's own backward keeps anyway, so H no
        longer costs memory, at one more projection in the backward. A projection with trainable
        tensors (LoRA, BitFit biases) stays where it is: its parameter names must not move (decided when
        recompute is switched on: make a projection trainable before `set_recompute`, not after)."""
        if self.out_proj_path is None:
            return
        current = self.base_layer.get_submodule(self.out_proj_path)
        if enabled and self._deferred is None:
            if any(p.requires_grad for p in current.parameters()):
                return
            deferred = DeferredProjection(current)
            set_module(self.base_layer, self.out_proj_path, deferred)
            object.__setattr__(self, "_deferred", deferred)  # a reference, not a second registered child
        elif not enabled and self._deferred is not None:
            set_module(self.base_layer, self.out_proj_path, self._deferred.inner)
            object.__setattr__(self, "_deferred", None)


class DeferredProjection(nn.Module):
    """Stands where a gated sub-layer's output projection was: passes its input through, so that the
    GatedSublayer applies the projection (`inner`) inside the recomputed region (issue 19). State-dict
    keys are those of the projection itself, as if it were not wrapped."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self._register_state_dict_hook(_plain_keys)
        self._register_load_state_dict_pre_hook(_inner_keys)

    def forward(self, o, *args, **kwargs):
        return o


def _plain_keys(module, state_dict, prefix, local_metadata):
    for key in [k for k in state_dict if k.startswith(prefix + "inner.")]:
        state_dict[prefix + key[len(prefix) + len("inner."):]] = state_dict.pop(key)


def _inner_keys(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(prefix + "inner.")]:
        state_dict[prefix + "inner." + key[len(prefix):]] = state_dict.pop(key)


def make_delta(spec: ModuleSpec, d_model: int, d_out: int | None = None) -> nn.Module | None:
    """ΔH reading d_model features and giving d_out (default d_model; only the adapter takes another)."""
    if spec.modification == "adapter":
        return Bottleneck(d_model, spec.r, spec.n_heads, d_out)
    if spec.modification == "phm_adapter":
        return PHMBottleneck(d_model, spec.r, spec.phm_n)
    return None


def _layers(backbone: nn.Module, arch: ArchSpec, stack: str) -> list[nn.Module]:
    path = arch.encoder_layers if stack == "encoder" else arch.decoder_layers
    if not path:  # decoder-only VLMs (issue 20): one stack, addressed as "encoder.*"
        raise ConfigError(f"placement '{stack}.*': {arch.name} is a decoder-only LM with one stack of layers, "
                          f"addressed by the 'encoder.*' placements")
    return list(get_module(backbone, path))


def check_placements(arch: ArchSpec, method: MethodConfig) -> None:
    """What place_modules would refuse, checked before anything is wrapped."""
    for spec in method.modules:
        if spec.positions == "prefix" and not arch.decoder_only:
            raise ConfigError(f"positions 'prefix' (image + prompt positions only) is for decoder-only VLMs; "
                              f"{arch.name} is an encoder-decoder: use positions 'all'")


def place_modules(backbone: nn.Module, arch: ArchSpec, method: MethodConfig, ctx: JointContext,
                  d_model: int) -> list[tuple[nn.Module, ModuleSpec]]:
    """Wrap the backbone in place; returns every new PET module with its spec (for init and zero-init)."""
    check_placements(arch, method)
    created: list[tuple[nn.Module, ModuleSpec]] = []
    for spec in method.modules:
        for placement in spec.placements:
            stack = placement.split(".")[0]
            for layer in _layers(backbone, arch, stack):
                if placement in PROJECTION_PLACEMENTS:
                    created.append((_place_projection(layer, arch, placement, spec, d_model), spec))
                else:
                    created.append((_place_sublayer(layer, arch, placement, spec, d_model, ctx), spec))
    return created


def _place_projection(layer, arch, placement, spec, d_model):
    path = _through_wrappers(layer, arch.projections[placement])
    base = get_module(layer, path)
    out = getattr(base, "out_features", d_model)
    # grouped-query attention: v_proj gives n_kv_heads x head_dim < d_model features (issue 20)
    if out != d_model and spec.modification != "adapter":
        raise ConfigError(f"placement {placement!r}: a {spec.modification} cannot output {out} features "
                          f"(the projection's width); use modification 'adapter'")
    delta = make_delta(spec, d_model, out)
    if spec.positions == "prefix":
        from .decoder_only import PrefixParallelLinear  # image + prompt positions only (issue 20)

        wrapper = PrefixParallelLinear(base, delta)
    else:
        wrapper = ParallelLinear(base, delta)
    set_module(layer, path, wrapper)
    return delta


def _through_wrappers(layer: nn.Module, path: str) -> str:
    """`path` with `.base_layer` inserted where a sub-layer is already wrapped (a decoder-only LM's value
    adapter sits inside the gated self-attention, issue 20)."""
    out, mod = [], layer
    for part in path.split("."):
        while not hasattr(mod, part) and isinstance(mod, (GatedSublayer, CaptureInput)):
            out.append("base_layer")
            mod = mod.base_layer
        out.append(part)
        mod = getattr(mod, part, None)
    return ".".join(out)


def _place_sublayer(layer, arch, placement, spec, d_model, ctx):
    sub = arch.sublayers[placement]
    base = get_module(layer, sub.wrap)
    if isinstance(base, GatedSublayer):
        raise ConfigError(f"placement {placement!r} given twice in one method")
    gate = make_gate(d_model, spec.gate)
    pet = GatedModification(make_delta(spec, d_model), gate, spec.scale, spec.scale_delta_only)
    needs_x = gate is not None or spec.mode == "parallel"
    slot = None
    if needs_x and sub.capture is not None:
        slot = _Slot()
        set_module(layer, sub.capture, CaptureInput(get_module(layer, sub.capture), slot))
    # an attention sub-layer's output projection (arch.projections' "<placement>.o"), relative to the wrapped
    # module: deferred into the recomputed region where the attention keeps its output O anyway
    proj = arch.projections.get(f"{placement}.o") if arch.attention_keeps_output else None
    out_proj = proj[len(sub.wrap) + 1:] if proj and proj.startswith(sub.wrap + ".") else None
    set_module(layer, sub.wrap, GatedSublayer(base, pet, sub.output_index, slot, ctx, spec.mode == "parallel",
                                              out_proj))
    return pet


# -- initialisation (spec §1.4) ----------------------------------------------------------------

def init_new_modules(modules: list[nn.Module], arch: ArchSpec) -> None:
    """BART's hook gives every new nn.Linear N(0, 0.02) and zero bias (and Embeddings N(0, 0.02));
    T5 leaves PyTorch's defaults. PHM layers and the middleY vector keep their own init."""
    if arch.init != "normal":
        return
    for root in modules:
        for m in root.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=arch.init_std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=arch.init_std)


@torch.no_grad()
def apply_zero_init(created: list[tuple[nn.Module, ModuleSpec]]) -> None:
    """The official zero-init flags (spec §1.4): 'up' zeroes W_up and b_up of the adapter (ΔH = 0);
    'gate' is the granularity's own `zero_init` (its last projection: G = σ(0) = 0.5; middleY's z: G = 1)."""
    for module, spec in created:
        delta, gate = (module.delta, module.gate) if isinstance(module, GatedModification) else (module, None)
        if "up" in spec.zero_init and delta is not None:
            for p in delta.up.parameters():
                p.zero_()
        if "gate" in spec.zero_init and gate is not None:
            gate.zero_init()
