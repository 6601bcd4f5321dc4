"""Import (and export) checkpoints of the official VL-PET implementation (spec §7.6).

    model, report = import_official("VLBart_multitask_last.pth", "facebook/bart-base", "vl-pet-large",
                                    output_dir="adapters/vl-pet-large")
    print(report.summary())          # mapped / missing / unexpected keys
    official = export_official(model)  # the inverse: our model -> a state dict with the official names

An official checkpoint is a full `state_dict()` of the VL-BART / VL-T5 model (transformers 4.2.1 names)
saved with `torch.save`. It is read with `torch.load(..., weights_only=True)`: no arbitrary object is
ever unpickled. Every official key is mapped onto a tensor of a `VLModel`:

- backbone tensors keep their Hugging Face names; they go to the same place under `backbone.`, also
  where vlpet's wrappers moved the frozen module under `base_layer` (`self_attn.k_proj.weight` ->
  `self_attn.base_layer.k_proj.weight`, `fc2.weight` -> `fc2.base_layer.weight`, ...). This part of
  the mapping is derived from the model itself (wrapper segments removed, checked against the names
  of an unwrapped HF model of the same config), so it follows whatever vlpet wraps;
- the N_h heads `{attn,ff}_adapter_multihead_down.{h}` are concatenated in head order into the fused
  `pet.delta.down` (weight rows stacked, biases concatenated; any N_h), `..._multihead_up` -> `pet.delta.up`;
- the gates `encoder_{attn,ff}_adapter_gating_{large_x_down, large_x_up, middle_xy_add, small_xy_cat,
  middle_ia3_add}` -> `pet.gate.{down, up, proj, proj, z}` (small: [1, 2D] with X first, our layout);
- the decoder VPA `...attn_value_parallel_adapter.adapters.{task}.{down,up}_sampler.*`, one tensor listed
  under every task key, -> `...v_proj.delta.{down,up}` (BART) / `...EncDecAttention.v.delta.*` (T5);
  the task copies must agree;
- `visual_embedding.{feat_embedding, absolute_vis_pos_embedding}.{0,1}.*` and `img_order_embedding`
  -> `visual_embedding.*`;
- the shared token embedding, listed under five aliases (`shared`, `encoder.embed_tokens`,
  `decoder.embed_tokens`, `encoder.visual_embedding.obj_order_embedding`, `lm_head`), -> one tensor
  (the copies must agree); BART's `final_logits_bias` buffer is copied too.

Shapes must match exactly (an error names the key and both shapes). Keys that map nowhere are listed
as `unexpected`, our tensors that no key supplies as `missing`; nothing is dropped silently, and
`strict=True` turns either list into an error.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .data.tasks import TASKS
from .errors import CheckpointError, ConfigError
from .granularity import GATES

# TASKS (data/tasks.py): the keys under which the official single-adapter AdapterController lists the
# decoder VPA (§2.4), the paper's image-text tasks.
SUPPORTED_ARCHS = ("bart", "t5")
_SUBLAYER_TAG = {"encoder.self_attn": "attn", "encoder.ffn": "ff"}
_HEAD_RE = re.compile(r"^(?P<stem>.+_adapter_multihead_down)\.(?P<h>\d+)\.(?P<leaf>weight|bias)$")
_TASK_RE = re.compile(r"^(?P<stem>.+\.attn_value_parallel_adapter\.adapters)\.(?P<task>[^.]+)\.(?P<leaf>.+)$")
_MAX_LISTED = 20


@dataclass
class ImportReport:
    """What `import_official` / `load_official` did with every key."""

    source: str
    mapped: dict[str, str] = field(default_factory=dict)  # official key -> our parameter / buffer name
    missing: list[str] = field(default_factory=list)  # our tensors that no official key supplied
    unexpected: list[str] = field(default_factory=list)  # official keys that map to nothing
    # Frozen tensors whose official value differs from the backbone the model was built on. An adapter
    # folder keeps only trainable tensors (+ added vocabulary rows), so these would not survive a
    # save_pretrained / from_pretrained round trip on that backbone.
    frozen_changed: list[str] = field(default_factory=list)
    output_dir: str | None = None

    @property
    def ok(self) -> bool:
        return not self.missing and not self.unexpected

    def __getitem__(self, key: str):  # dict-style access: report["mapped"], report["missing"], ...
        if key not in {f.name for f in dataclasses.fields(self)}:
            raise KeyError(key)
        return getattr(self, key)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        lines = [f"{self.source}: {len(self.mapped)} official keys mapped, {len(self.missing)} of our tensors "
                 f"missing, {len(self.unexpected)} official keys unexpected"]
        if self.missing:
            lines.append("missing: " + _listing(self.missing))
        if self.unexpected:
            lines.append("unexpected: " + _listing(self.unexpected))
        if self.frozen_changed:
            lines.append(f"{len(self.frozen_changed)} frozen tensors differ from the backbone: "
                         + _listing(self.frozen_changed))
        if self.output_dir:
            lines.append(f"adapter folder written to {self.output_dir}")
        return "\n".join(lines)


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f", ... ({len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else "")


# -- reading an official file ------------------------------------------------------------------------

def load_official_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read an official checkpoint as {name: tensor} with weights-only unpickling.

    Accepts a plain state dict, one nested under 'state_dict' / 'model' keys, and DDP's 'module.' prefix;
    a `.safetensors` file is read with safetensors.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        from .checkpoint import load_tensors

        obj = load_tensors(path)
    else:
        from .checkpoint import torch_load_weights_only

        obj = torch_load_weights_only(path, hint="; expected the official run's LAST.pth (a state dict)")
    return normalize_state_dict(obj, source=str(path))


def normalize_state_dict(obj, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Unwrap 'state_dict' / 'model' nesting, check that every entry is a tensor, strip 'module.'."""
    for _ in range(4):
        if not isinstance(obj, Mapping):
            break
        inner = next((obj[k] for k in ("state_dict", "model") if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source}: holds a {type(obj).__name__}, not a state dict of tensors")
    if not obj:
        raise CheckpointError(f"{source}: the state dict is empty")
    out: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{source}: state dict key {key!r} is not a string")
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{source}: entry {key!r} is a {type(value).__name__}, not a tensor")
        name = key[len("module."):] if key.startswith("module.") else key
        if name in out:
            raise CheckpointError(f"{source}: key {name!r} appears both with and without the 'module.' prefix")
        out[name] = value
    return out


# -- the name mapping --------------------------------------------------------------------------------

@dataclass
class _Target:
    """One tensor of our model and the official key(s) that carry it.

    kind 'alias': every name in `names` is a full copy (they must agree);
    kind 'heads': `names[0]` has a '{h}' slot, the heads are stacked along dim 0 (`n_heads` for export);
    kind 'tasks': `names[0]` has a '{task}' slot, one tensor listed under every task key.
    """

    ours: str
    tensor: torch.Tensor
    kind: str = "alias"
    names: list[str] = field(default_factory=list)
    n_heads: int = 1
    trainable: bool = False


def _check_arch(model) -> None:
    if model.arch.name not in SUPPORTED_ARCHS:
        raise ConfigError(f"official VL-PET checkpoints exist for BART and T5 only; backbone "
                          f"{model.backbone_name!r} is {model.arch.name!r}")


_HF_NAMES: dict[str, frozenset[str]] = {}


def _hf_names(backbone: nn.Module) -> frozenset[str]:
    """State-dict names of an unwrapped HF model of the same config (built on the meta device, cached)."""
    import copy

    from transformers import AutoModelForSeq2SeqLM

    key = backbone.config.to_json_string(use_diff=False)
    if key not in _HF_NAMES:
        with torch.device("meta"):
            bare = AutoModelForSeq2SeqLM.from_config(copy.deepcopy(backbone.config))
        _HF_NAMES[key] = frozenset(bare.state_dict().keys())
    return _HF_NAMES[key]


def _submodule(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:  # the path moved under another wrapper: not a place the official names cover
        return None


def _strip_wrappers(name: str) -> str:
    return ".".join(part for part in name.split(".") if part != "base_layer")


def _targets(model) -> list[_Target]:
    """Every tensor of `model.state_dict()` (params + persistent buffers), once, with its official names."""
    from .methods.adapter import Bottleneck, ParallelLinear
    from .placement import GatedSublayer, get_module

    _check_arch(model)
    arch = model.arch
    named = model.state_dict(keep_vars=True)
    by_id: dict[int, _Target] = {}
    order: list[_Target] = []
    for name, t in named.items():
        if id(t) not in by_id:
            tgt = _Target(ours=name, tensor=t, trainable=bool(getattr(t, "requires_grad", False)))
            by_id[id(t)] = tgt
            order.append(tgt)
    claimed: set[int] = set()

    def claim(t: torch.Tensor) -> _Target:
        claimed.add(id(t))
        return by_id[id(t)]

    # Encoder multi-head adapters and gates (per layer, per sub-layer).
    for i, layer in enumerate(get_module(model.backbone, arch.encoder_layers)):
        for placement, tag in _SUBLAYER_TAG.items():
            sub = arch.sublayers[placement]
            mod = _submodule(layer, sub.wrap)
            if not isinstance(mod, GatedSublayer) or mod.parallel:
                continue
            holder = sub.wrap.rpartition(".")[0]
            prefix = f"{arch.encoder_layers}.{i}." + (f"{holder}." if holder else "")
            delta, gate = mod.pet.delta, mod.pet.gate
            if isinstance(delta, Bottleneck):
                for leaf in ("weight", "bias"):
                    tgt = claim(getattr(delta.down, leaf))
                    tgt.kind, tgt.n_heads = "heads", delta.n_heads
                    tgt.names = [f"{prefix}{tag}_adapter_multihead_down.{{h}}.{leaf}"]
                    claim(getattr(delta.up, leaf)).names = [f"{prefix}{tag}_adapter_multihead_up.{leaf}"]
            if gate is not None:
                for ours, theirs in type(gate).official.items():
                    claim(gate.get_parameter(ours)).names = [f"{prefix}encoder_{tag}_adapter_gating_{theirs}"]

    # Decoder value adapters (VPA) on the cross-attention value projection.
    v_path = arch.projections["decoder.cross_attn.v"]
    attn_path = v_path.rpartition(".")[0]
    for i, layer in enumerate(get_module(model.backbone, arch.decoder_layers)):
        mod = _submodule(layer, v_path)
        if not isinstance(mod, ParallelLinear) or not isinstance(mod.delta, Bottleneck):
            continue
        stem = f"{arch.decoder_layers}.{i}.{attn_path}.attn_value_parallel_adapter.adapters.{{task}}"
        for ours, theirs in (("down", "down_sampler"), ("up", "up_sampler")):
            for leaf in ("weight", "bias"):
                tgt = claim(getattr(getattr(mod.delta, ours), leaf))
                tgt.kind, tgt.names = "tasks", [f"{stem}.{theirs}.{leaf}"]

    # Visual embedding: the same sub-names under the encoder.
    for name, t in model.visual_embedding.state_dict(keep_vars=True).items():
        claim(t).names = [f"{arch.encoder}.visual_embedding.{name}"]

    # Backbone tensors: our name minus 'backbone.' and wrapper segments is the HF name (all aliases).
    valid = _hf_names(model.backbone)
    for name, t in named.items():
        if id(t) in claimed or not name.startswith("backbone."):
            continue
        hf = _strip_wrappers(name[len("backbone."):])
        tgt = by_id[id(t)]
        if hf in valid and hf not in tgt.names:
            tgt.names.append(hf)
    emb = model.backbone.get_input_embeddings().weight
    by_id[id(emb)].names.append(f"{arch.encoder}.visual_embedding.obj_order_embedding.weight")
    return order


def official_name_map(model) -> dict[str, list[str]]:
    """{our tensor name: [official names]} ('{h}' / '{task}' slots for heads and task copies)."""
    return {t.ours: list(t.names) for t in _targets(model)}


# -- import ------------------------------------------------------------------------------------------

def _resolve(targets: list[_Target], sd: dict[str, torch.Tensor]):
    """Match official keys to targets: {id(target): {slot: key}}, and the unmatched keys."""
    alias, heads, tasks = {}, {}, {}
    for tgt in targets:
        for n in tgt.names:
            {"alias": alias, "heads": heads, "tasks": tasks}[tgt.kind][n] = tgt
    found: dict[int, dict] = {}
    unexpected = []
    for key in sd:
        if key in alias:
            found.setdefault(id(alias[key]), {})[key] = key
            continue
        m = _HEAD_RE.match(key)
        if m and f"{m['stem']}.{{h}}.{m['leaf']}" in heads:
            found.setdefault(id(heads[f"{m['stem']}.{{h}}.{m['leaf']}"]), {})[int(m["h"])] = key
            continue
        m = _TASK_RE.match(key)
        if m and f"{m['stem']}.{{task}}.{m['leaf']}" in tasks:
            found.setdefault(id(tasks[f"{m['stem']}.{{task}}.{m['leaf']}"]), {})[m["task"]] = key
            continue
        unexpected.append(key)
    return found, unexpected


def _shape(t) -> tuple:
    return tuple(t.shape)


def _value_for(tgt: _Target, slots: dict, sd: dict[str, torch.Tensor], source: str) -> torch.Tensor:
    """The one tensor the official keys give for `tgt`, after shape and agreement checks."""
    want = _shape(tgt.tensor)
    if tgt.kind == "heads":
        idx = sorted(slots)
        if idx != list(range(len(idx))):
            gap = next(h for h in range(len(idx) + 1) if h not in slots)
            raise CheckpointError(f"{source}: {tgt.names[0].format(h=gap)!r} is missing although heads "
                                  f"{idx} of that adapter are present")
        parts = [sd[slots[h]] for h in idx]
        first = parts[0]
        for h, p in zip(idx, parts):
            if _shape(p)[1:] != want[1:] or _shape(p) != _shape(first):
                raise CheckpointError(f"{source}: {slots[h]!r} has shape {_shape(p)}; every head must have shape "
                                      f"{(want[0] // len(parts),) + want[1:]} to fill {tgt.ours!r} {want}")
        value = torch.cat(parts, dim=0)
        if _shape(value) != want:
            raise CheckpointError(f"{source}: {len(parts)} heads {tgt.names[0]!r} of shape {_shape(first)} give "
                                  f"{_shape(value)}, the model's {tgt.ours!r} has shape {want}")
        return value
    keys = list(slots.values())
    first = sd[keys[0]]
    for k in keys:
        if _shape(sd[k]) != want:
            raise CheckpointError(f"{source}: {k!r} has shape {_shape(sd[k])}, the model's {tgt.ours!r} has "
                                  f"shape {want}")
    for k in keys[1:]:
        if not torch.equal(sd[k].to(first.dtype), first):
            what = "task copy" if tgt.kind == "tasks" else "alias"
            raise CheckpointError(f"{source}: {k!r} differs from {keys[0]!r}; as a {what} of one tensor "
                                  f"({tgt.ours!r}) the copies must be equal")
    return first


@torch.no_grad()
def load_official(model, state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint",
                  strict: bool = False) -> ImportReport:
    """Copy an official state dict (already read) into `model`. Everything is checked before anything
    is written: a shape mismatch, disagreeing copies or (with `strict`) missing/unexpected keys leave
    the model untouched."""
    sd = normalize_state_dict(state_dict, source)
    targets = _targets(model)
    found, unexpected = _resolve(targets, sd)
    report = ImportReport(source=source, unexpected=sorted(unexpected))
    updates: list[tuple[_Target, torch.Tensor]] = []
    for tgt in targets:
        slots = found.get(id(tgt))
        if not slots:
            report.missing.append(tgt.ours)
            continue
        updates.append((tgt, _value_for(tgt, slots, sd, source)))
        for key in slots.values():
            report.mapped[key] = tgt.ours
    if strict and (report.missing or report.unexpected):
        raise CheckpointError(f"{source}: does not fit method {model.method.name!r} on {model.backbone_name!r}: "
                              f"{len(report.missing)} missing ({_listing(report.missing)}); "
                              f"{len(report.unexpected)} unexpected ({_listing(report.unexpected)})")
    emb = model.backbone.get_input_embeddings().weight
    for tgt, value in updates:
        t = tgt.tensor
        value = value.to(device=t.device, dtype=t.dtype)
        if not tgt.trainable:
            old, new = (t[:model.original_vocab_rows], value[:model.original_vocab_rows]) if t is emb else (t, value)
            if not torch.equal(old, new):
                report.frozen_changed.append(tgt.ours)
        t.copy_(value)
    return report


def detect_granularity(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """'small' / 'middlex' / 'middley' / 'large' from the official gate names, None without gates;
    a checkpoint with several kinds is refused (the official layers have exactly one)."""
    tags = {kind: cls.official_tag() for kind, cls in GATES.items() if cls.official}
    found = {kind for kind, tag in tags.items()
             if any(re.search(rf"adapter_gating_{tag}(\.|$)", k) for k in state_dict)}
    if len(found) > 1:
        raise CheckpointError(f"the checkpoint holds gates of several granularities ({', '.join(sorted(found))})")
    return found.pop() if found else None


def _build(backbone: str, method, sd: dict[str, torch.Tensor], *, seed: int, video: bool,
           feat_dim: int | None, load_tok: bool):
    from .backbones.arch import arch_for
    from .backbones.loading import load_backbone, load_tokenizer
    from .model import VisualConfig, VLModel
    from .presets import get_preset

    base = load_backbone(backbone, seed=seed)
    arch = arch_for(base.config.model_type)
    if arch.name not in SUPPORTED_ARCHS:
        raise ConfigError(f"official VL-PET checkpoints exist for BART and T5 only; backbone {backbone!r} "
                          f"is {arch.name!r}")
    found = detect_granularity(sd)
    if method is None:
        if found is None:
            raise CheckpointError("the checkpoint has no VL-PET gate tensors (encoder_*_adapter_gating_*); "
                                  "name the method explicitly")
        method = f"vl-pet-{found}"
    if isinstance(method, str):
        method = get_preset(method, arch.family, video=video)
    kinds = {spec.gate.kind for spec in method.modules if spec.gate.kind != "none"}
    if found is not None and kinds and kinds != {found}:
        raise CheckpointError(f"the checkpoint holds G_{found} gates (encoder_*_adapter_gating_"
                              f"{GATES[found].official_tag()}) but method {method.name!r} uses G_{'/'.join(sorted(kinds))}; "
                              f"use the vl-pet-{found} preset (or method=None)")
    # The official vocabulary size (BART 50465, T5 32200), visual feature size and image count.
    rows = next((sd[k].shape[0] for k in (f"{arch.shared_embedding}.weight", "lm_head.weight") if k in sd), None)
    ve = f"{arch.encoder}.visual_embedding."
    if feat_dim is None and f"{ve}feat_embedding.0.weight" in sd:
        feat_dim = int(sd[f"{ve}feat_embedding.0.weight"].shape[1])
    visual = VisualConfig.for_task(video, feat_dim)
    if f"{ve}img_order_embedding.weight" in sd:
        visual = dataclasses.replace(visual, n_images=int(sd[f"{ve}img_order_embedding.weight"].shape[0]))
    tokenizer = load_tokenizer(backbone, required=True) if load_tok else None
    if tokenizer is not None and rows is not None and len(tokenizer) != rows:
        raise CheckpointError(f"the checkpoint has {rows} vocabulary rows but the tokenizer of {backbone!r} "
                              f"(with the VL tokens) has {len(tokenizer)}: not the backbone of this checkpoint")
    return VLModel(base, method, visual, backbone_name=backbone, tokenizer=tokenizer, vocab_rows=rows, seed=seed)


def import_official(checkpoint_path: str | Path, backbone: str, method, output_dir: str | Path | None = None, *,
                    strict: bool = False, seed: int = 0, video: bool = False, feat_dim: int | None = None,
                    load_tok: bool = False):
    """Build a `VLModel` for `backbone` + `method` and fill it from an official VL-PET checkpoint.

    Returns (model, ImportReport). `method` is a preset name or a `MethodConfig` that matches the
    official run (e.g. 'vl-pet-middlex' for `--use_encoder_adapter_gating_middle_xy_add`), or None
    to take the `vl-pet-<granularity>` preset that the checkpoint's gate names reveal. A method whose
    granularity differs from the checkpoint's gates is refused. The vocabulary size, `feat_dim`
    (unless given) and the number of images come from the checkpoint. `video=True` selects the
    video presets / visual config (feat_dim 512, no grid pooling).

    With `strict=False` (default) missing and unexpected keys are only reported; `strict=True` raises a
    CheckpointError listing them. Shape mismatches and disagreeing alias / task copies always raise.

    `output_dir`: also write the result as a vlpet adapter folder (`model.save_pretrained`). Such a
    folder holds only the trainable tensors and the added vocabulary rows, and is later applied to
    `backbone` again; the frozen weights then come from that backbone, not from the checkpoint. So
    `backbone` must be the same pretrained model the official run started from (facebook/bart-base
    or t5-base), whose frozen weights the official checkpoint carries unchanged. The report lists
    any frozen tensor that differs (`frozen_changed`) and a warning is issued when a folder is written
    in that case.
    """
    source = str(checkpoint_path)
    sd = load_official_state_dict(checkpoint_path)
    model = _build(backbone, method, sd, seed=seed, video=video, feat_dim=feat_dim, load_tok=load_tok)
    report = load_official(model, sd, source=source, strict=strict)
    if output_dir is not None:
        if report.frozen_changed:
            warnings.warn(f"{source}: {len(report.frozen_changed)} frozen tensors differ from backbone "
                          f"{backbone!r} (e.g. {report.frozen_changed[:3]}); the adapter folder keeps only "
                          f"trainable tensors, so loading it on {backbone!r} will not reproduce them. Use the "
                          f"pretrained backbone the official run started from.", stacklevel=2)
        model.save_pretrained(output_dir)
        report.output_dir = str(output_dir)
    return model, report


# -- export ------------------------------------------------------------------------------------------

@torch.no_grad()
def export_official(model, tasks: tuple[str, ...] = TASKS) -> dict[str, torch.Tensor]:
    """Our model -> a state dict with the official names (heads split back, the VPA under every task
    key, all aliases of the shared embedding). Raises ConfigError when the model holds tensors the
    official naming has no place for (e.g. a method other than VL-PET)."""
    targets = _targets(model)
    unnamed = [t.ours for t in targets if not t.names]
    if unnamed:
        raise ConfigError(f"method {model.method.name!r}: {len(unnamed)} tensors have no official name "
                          f"({_listing(unnamed)})")
    out: dict[str, torch.Tensor] = {}
    for tgt in targets:
        value = tgt.tensor.detach().cpu().clone()
        if tgt.kind == "heads":
            for h, part in enumerate(value.chunk(tgt.n_heads, dim=0)):
                out[tgt.names[0].format(h=h)] = part.clone()
        elif tgt.kind == "tasks":
            for task in tasks:
                out[tgt.names[0].format(task=task)] = value
        else:
            for n in tgt.names:
                out[n] = value
    return out
