"""VL-PET on decoder-only VLMs (issue 20): LLaVA, Idefics3 / SmolVLM, Qwen2-VL / Qwen2.5-VL, PaliGemma.

The mapping (docs/decoder-only.md says why):
- one stack of LM layers, addressed by the "encoder.*" placements: a gated multi-head adapter after the
  self-attention and after the MLP of every layer; the gate's X is the residual stream before the
  sub-layer's RMSNorm (pre-LN, spec §1.5);
- G_small becomes `CausalSmallGate` ("causal_small"): the mean of σ(w · [X ; Y] + b) over the image +
  prompt prefix only (padding excluded), computed when the prefix is read and frozen for every later
  token, so a teacher-forced forward and KV-cached generation give the same outputs. G_large, G_middleX
  (per token) and G_middleY (a constant) are causal as they are;
- the value adapter sits in parallel on self-attention `v_proj` (`PrefixParallelLinear`), on every position
  ("all") or on the image + prompt positions only ("prefix"): then the answer tokens read adapted
  values of the image and the prompt, as the paper's decoder reads adapted encoder values;
- the model takes the seq2seq interface of the rest of vlpet: `input_ids` is the (left-padded) prompt with
  its image tokens, `labels` the answer; the forward feeds [prompt ; answer[:-1]] and returns the
  logits that predict the answer ([B, T, V]), generation returns the new tokens only.
"""

from __future__ import annotations

import contextlib

from dataclasses import dataclass, replace
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from .errors import ConfigError, ShapeError
from .granularity import GateOptions, SmallGate, paper_granularities, register_gate
from .method import VALUE_POSITIONS, LoraSpec, MethodConfig, ModuleSpec
from .methods.adapter import ParallelLinear
from .presets import (REFERENCE_WIDTH, Family, family_for, list_presets, lookup_preset, register_preset,
                      scaled_size)
from .recompute import run_pet

# -- the prefix state one VLModel call shares with its gates and value adapters ----------------------


@dataclass
class PrefixState:
    """Filled by the VLModel around each forward / generate call of a decoder-only backbone.

    prefix_len: length of the (left-padded) image + prompt prefix in this call; None outside a VLModel call
    (the modules then treat the whole sequence as the prefix: a bare backbone call is not causal-safe).
    mask: [B, prefix_len] attention mask of the prefix (padding excluded from G_small's mean).
    read: False while the pass that reads the prefix runs (teacher-forced forward or generation's prefill);
    set True after it, so that KV-cached generation steps reuse what the prefix gave."""

    prefix_len: int | None = None
    mask: torch.Tensor | None = None
    read: bool = False

    @contextlib.contextmanager
    def call(self, prefix_len: int, mask: torch.Tensor):
        """The state of one VLModel call (the prefix of this batch), cleared when the call ends."""
        self.prefix_len, self.mask, self.read = prefix_len, mask, False
        try:
            yield self
        finally:
            self.prefix_len, self.mask, self.read = None, None, False


class _Bound:
    """Gives a module the model's PrefixState without registering it as a sub-module."""

    _state: list | None = None

    def bind(self, state: PrefixState) -> None:
        self._state = [state]

    @property
    def prefix(self) -> PrefixState | None:
        return self._state[0] if self._state else None


@register_gate
class CausalSmallGate(_Bound, SmallGate):
    """G_small for decoder-only LMs: mean over the image + prompt prefix of σ(w · [X ; Y] + b), [B, 1, 1].

    The paper's G_small averages over the whole encoder input. In a decoder the sequence grows with the
    answer, so the mean is taken over the prefix only (padding excluded) and frozen once the prefix is read:
    a teacher-forced forward and KV-cached generation then see the same G at every position."""

    kind, paper = "causal_small", False
    official: dict[str, str] = {}  # the official code has no decoder-only LM

    def __init__(self, d_model, opts):
        super().__init__(d_model, opts)  # G_small's `proj` over [X ; Y], X first: same parameters, same names
        self._frozen: torch.Tensor | None = None

    def forward(self, x, y, mask=None):
        st = self.prefix
        if st is not None and st.prefix_len is not None and st.read:
            if self._frozen is None or self._frozen.shape[0] != x.shape[0]:
                raise ShapeError("causal G_small: a cached generation step came without the prefix pass "
                                 "(generate through VLModel.generate, which reads the prefix first)")
            return self._frozen.to(y.dtype)
        g = self.token_gates(x, y)  # [B, N, 1]
        if st is not None and st.prefix_len is not None:
            n = st.prefix_len
            m = st.mask
            if x.shape[0] != m.shape[0]:
                # generate expands each prompt's rows before the prefix pass (beams, num_return_sequences)
                if x.shape[0] % m.shape[0]:
                    raise ShapeError(f"causal G_small: batch {x.shape[0]} is not a multiple of the prefix "
                                     f"mask's {m.shape[0]}")
                m = m.repeat_interleave(x.shape[0] // m.shape[0], dim=0)
            g, m = g[:, :n], m[:, :n].to(g.device, g.dtype).unsqueeze(-1)
            out = (g * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp_min(1.0)
        else:  # a bare backbone call: no prefix known, the mean runs over this call's tokens
            out = g.mean(dim=1, keepdim=True)
        self._frozen = out.detach()
        return out


class PrefixParallelLinear(_Bound, ParallelLinear):
    """Self-attention `v_proj` + a parallel adapter on the image + prompt positions only ("prefix"): the
    values the answer tokens read from the image and the prompt are adapted; the answer's own are not.
    In KV-cached generation the prefix values are cached once, adapted; later steps add nothing."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.disabled:
            return out
        st = self.prefix
        # issue 19: run_pet recomputes the adapter in the backward when self.pet_recompute is set; the prefix
        # is cut out here, before it, so the recompute does not depend on the (by then cleared) PrefixState
        if st is None or st.prefix_len is None:  # bare backbone call: every position is prefix
            return out + run_pet(self, self.delta, x)
        if st.read:  # a generation step after the prefix: an answer position
            return out
        n = min(st.prefix_len, x.shape[1])
        delta = run_pet(self, self.delta, x[:, :n]).to(out.dtype)
        return out + F.pad(delta, (0, 0, 0, x.shape[1] - n))


# -- presets ---------------------------------------------------------------------------------------

# The decoder-only presets are entries of the preset registry under family "decoder" (its settings,
# with why they are so, are presets.FAMILIES["decoder"]); registered below, on the first lookup of that
# family (presets.Family.module).
SELF_ATTN_FFN = ("encoder.self_attn", "encoder.ffn")
VALUE = ("encoder.self_attn.v",)
# Chosen because it is the paper's placement read literally (adapted values of the image + text the answer attends
# to). Measured against "all" on the offline task (benchmarks/decoder_only_easyvqa.py, docs/decoder-only.md "Does
# the mapping learn?"): within seed noise (all - prefix = +0.4 to +2.1 points over 3 seeds, 4 points of seed
# spread), so the measurement did not decide it either way. The value itself is presets.FAMILIES["decoder"]'s.
DEFAULT_VALUE_POSITIONS = family_for("decoder").value_positions


def adapter_rank(d_model: int, multiple: int = 1) -> int:
    """r = d/8: the family's r (the BART family's 96 at width 768), scaled as every other preset size is."""
    return scaled_size(family_for("decoder").r, d_model, multiple)


def _gate_kind(g: str) -> str:
    return "causal_small" if g == "small" else g


def _gated(g: str, f: Family, d_model: int, n_heads: int) -> ModuleSpec:
    r = adapter_rank(d_model, n_heads)
    return ModuleSpec(placements=SELF_ATTN_FFN, modification="adapter", r=r, n_heads=n_heads,
                      gate=GateOptions(kind=_gate_kind(g), r_g=r), scale=1.0 if g == "middley" else f.scale,
                      zero_init=("up", "gate"))


def value_adapter(d_model: int, positions: str = DEFAULT_VALUE_POSITIONS) -> ModuleSpec:
    return ModuleSpec(placements=VALUE, modification="adapter", mode="parallel", r=adapter_rank(d_model),
                      zero_init=("up",), positions=positions)


def _vl_pet(g: str, single_head: bool, name: str, f: Family, d_model=None) -> MethodConfig:
    d = d_model or REFERENCE_WIDTH
    n_heads = 1 if single_head else f.n_heads
    positions = f.value_positions
    return MethodConfig(
        name=name, modules=(_gated(g, f, d, n_heads), value_adapter(d, positions)),
        trainable=("visual_embedding", "encoder_layer_norms"), task_prompts=False,
        description=f"VL-PET with G_{g} on a decoder-only LM: {n_heads}-head adapters after self-attention and "
                    f"MLP of every layer, value adapter on self-attention v_proj ({positions} positions), "
                    f"projector, LM norms")


@register_preset("full", "baseline", lr=1e-5, family="decoder")
def _full(f: Family, d_model=None) -> MethodConfig:
    return MethodConfig(name="full", trainable=("all",), task_prompts=False,
                        description="full fine-tuning of projector + LM (vision tower frozen)")


@register_preset("bitfit", "baseline", family="decoder")
def _bitfit(f: Family, d_model=None) -> MethodConfig:
    return MethodConfig(name="bitfit", trainable=("visual_embedding", "biases"), add_biases=True,
                        task_prompts=False, description="all LM biases (zeros added where the LM has none) "
                        "+ projector")


@register_preset("lora", "baseline", family="decoder")
def _lora(f: Family, d_model=None) -> MethodConfig:
    d = d_model or REFERENCE_WIDTH
    return MethodConfig(name="lora", task_prompts=False,
                        lora=LoraSpec(("encoder.self_attn.q", "encoder.self_attn.v"),
                                      r=max(1, round(d / 6)), alpha=32, dropout=0.1),
                        trainable=("visual_embedding",),
                        description="the paper's LoRA row: PEFT LoRA on q, v of every LM layer (r = d/6, "
                                    "128 at width 768) + projector")


@register_preset("vl-adapter", "baseline", family="decoder")
def _vl_adapter(f: Family, d_model=None) -> MethodConfig:
    return MethodConfig(name="vl-adapter", task_prompts=False,
                        modules=(ModuleSpec(placements=SELF_ATTN_FFN, modification="adapter",
                                            r=adapter_rank(d_model or REFERENCE_WIDTH), zero_init=("up",)),),
                        trainable=("visual_embedding", "all_layer_norms"),
                        description="VL-Adapter: one single-head adapter after every sub-layer + LM norms")


for _g in paper_granularities():
    register_preset(f"vl-pet-{_g}", "vl-pet", family="decoder")(partial(_vl_pet, _g, False, f"vl-pet-{_g}"))
for _g in paper_granularities():
    register_preset(f"vl-adapter-g-{_g}-lw", "table9", family="decoder")(
        partial(_vl_pet, _g, True, f"vl-adapter-g-{_g}-lw"))

DECODER_PRESETS = list_presets(family="decoder")


def decoder_preset(name: str, d_model: int, value_positions: str = DEFAULT_VALUE_POSITIONS) -> MethodConfig:
    """The preset `name` for a decoder-only VLM with LM width `d_model`, its value adapter on
    `value_positions` ("prefix": the image + prompt positions, or "all")."""
    if value_positions not in VALUE_POSITIONS:
        raise ConfigError(f"value_positions {value_positions!r} is not allowed; expected one of: "
                          f"{', '.join(VALUE_POSITIONS)}")
    preset = lookup_preset(name, "decoder")
    return preset.build(replace(family_for("decoder", d_model=d_model), value_positions=value_positions), d_model)


# -- the model side: forward and generate with the seq2seq interface -----------------------------------

def check_method(method: MethodConfig) -> None:
    if method.prompt is not None or method.hyperformer is not None:
        raise ConfigError(f"method {method.name!r}: prompt tuning and HyperFormer are not offered on decoder-only "
                          f"VLMs; allowed presets: {', '.join(DECODER_PRESETS)}")
    for spec in method.modules:
        for p in spec.placements:
            if not p.startswith("encoder."):
                raise ConfigError(f"placement {p!r}: a decoder-only VLM has one stack of LM layers, addressed "
                                  f"as 'encoder.self_attn', 'encoder.ffn', 'encoder.self_attn.<q|k|v|o>'")


def bind(model: nn.Module, state: PrefixState) -> None:
    for m in model.modules():
        if isinstance(m, _Bound):
            m.bind(state)


def _check_prompt(input_ids, attention_mask):
    if input_ids is None or input_ids.dim() != 2:
        raise ShapeError(f"input_ids has shape {None if input_ids is None else tuple(input_ids.shape)}; "
                         f"expected [B, L] (the prompt with its image tokens)")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if bool((attention_mask[:, -1] == 0).any()):
        raise ShapeError("decoder-only VLMs take left-padded prompts (the answer follows the last prompt token); "
                         "set the tokenizer's padding_side='left'")
    return attention_mask


def _family_inputs(arch, config, ids, n_prefix, kwargs):
    """Inputs a family's forward needs over the whole [prompt ; answer] sequence."""
    kw = dict(kwargs)
    n = ids.shape[1]
    if arch.image_path == "paligemma":
        # prefix (image + prompt) attends bidirectionally, the answer causally: 0 / 1 as PaliGemma's processor
        tt = kw.pop("token_type_ids", None)
        if tt is None:
            tt = torch.zeros(ids.shape[0], n_prefix, dtype=torch.long, device=ids.device)
        kw["token_type_ids"] = F.pad(tt[:, :n_prefix], (0, n - n_prefix), value=1)
    if arch.image_path == "qwen2_vl" and "image_grid_thw" in kw:
        # M-RoPE reads which tokens are image tokens (the processor returns this; derive it when absent)
        kw["mm_token_type_ids"] = (ids == config.image_token_id).long()
    return kw


def _checkpointing(backbone) -> bool:
    name = "is_activation_checkpointing" if hasattr(type(backbone), "is_activation_checkpointing") \
        else "is_gradient_checkpointing"  # renamed in transformers 5.x
    return bool(getattr(backbone, name, False))


def forward(model, input_ids, attention_mask, labels, return_loss, kwargs):
    """Teacher-forced [prompt ; answer[:-1]]: returns the logits that predict the answer, [B, T, V]."""
    mask = _check_prompt(input_ids, attention_mask)
    if model.training and _checkpointing(model.backbone) and any(isinstance(m, _Bound) for m in model.backbone.modules()):
        # the recomputation in backward would run after the prefix state is cleared (another G_small)
        raise ConfigError("gradient checkpointing is not supported with the causal G_small or the prefix-only "
                          "value adapter; use another granularity / value_positions='all', or no checkpointing")
    n = input_ids.shape[1]
    if labels is None:  # a prompt-only pass: next-token logits after the prompt
        answer = input_ids[:, :0]
        labels_in = None
    else:
        if labels.dim() != 2 or labels.shape[0] != input_ids.shape[0]:
            raise ShapeError(f"labels has shape {tuple(labels.shape)}; expected [B, T] with B = {input_ids.shape[0]}")
        pad = model._pad_id()
        answer = labels[:, :-1].masked_fill(labels[:, :-1] == -100, pad)
        labels_in = labels
    ids = torch.cat([input_ids, answer], dim=1)
    full_mask = torch.cat([mask, (labels[:, :-1] != -100).to(mask.dtype)] if labels is not None else [mask], dim=1)
    kw = _family_inputs(model.arch, model.backbone.config, ids, n, kwargs)
    kw.pop("use_cache", None)
    keep = max(1, answer.shape[1] + 1)
    with model._prefix_state.call(n, mask):
        out = model.backbone(input_ids=ids, attention_mask=full_mask, use_cache=False, logits_to_keep=keep,
                             return_dict=True, **kw)
    logits = out.logits[:, -keep:]
    loss = None
    if labels_in is not None and return_loss:
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels_in.reshape(-1), ignore_index=-100)
    return CausalLMOutputWithPast(loss=loss, logits=logits)


def generate(model, input_ids, attention_mask, settings, kwargs):
    """KV-cached generation from the prompt; returns the new tokens only (as the seq2seq path returns the
    decoder's tokens), or the generate output with `sequences` cut the same way."""
    mask = _check_prompt(input_ids, attention_mask)
    n = input_ids.shape[1]
    kw = _family_inputs(model.arch, model.backbone.config, input_ids, n, kwargs)
    settings.setdefault("pad_token_id", model._pad_id())
    with model._prefix_state.call(n, mask):  # CausalSmallGate expands the mask to generate's rows
        out = model.backbone.generate(input_ids=input_ids, attention_mask=mask, **kw, **settings)
    if isinstance(out, torch.Tensor):
        return out[:, n:]
    out.sequences = out.sequences[:, n:]
    return out


def mark_prefix_read(state: PrefixState):
    """Forward hook on the LM stack: after the pass that read the prefix, later passes are cached steps."""

    def hook(module, args, output):
        if state.prefix_len is not None:
            state.read = True

    return hook
