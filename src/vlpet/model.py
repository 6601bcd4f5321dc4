"""`VLModel`: an unmodified HF encoder-decoder that reads visual features, with a PET method placed in it.

    model = VLModel.build("facebook/bart-base", "vl-pet-large")      # or "bart-base" (offline, random)
    out = model(input_ids, attention_mask, vis_feats=feats, labels=labels)   # out.loss, out.logits
    ids = model.generate(input_ids, attention_mask, vis_feats=feats, num_beams=5, max_length=40)
    model.save_pretrained("adapter/")                                  # trainable tensors + config only
    model = VLModel.from_pretrained("adapter/")                       # base model + adapter folder
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutput

from .backbones.arch import ArchSpec, arch_for
from .backbones.head import AlignedLMHead
from .backbones.joint import JointContext, TextOnlyNorm, TextOnlyPositions, TextOnlyRelativeBias
from .backbones.loading import load_backbone, load_tokenizer, vocab_size_after_extension
from .backbones.norms import BiasedNorm, is_norm
from .backbones.visual import VisualEmbedding, pool_grid
from .checkpoint import (CONFIG_NAME, WEIGHTS_NAME, check_compatible, load_tensors, load_trainable,
                         read_adapter_config, save_adapter)
from .errors import CheckpointError, ShapeError
from .frozen_precision import set_frozen_dtype
from .granularity import GatedModification
from .method import MethodConfig
from .methods.hyperformer import HyperAdapter, HyperNetController, TaskEmbeddings
from .methods.prompt import EncoderPrompt
from .placement import GatedSublayer, apply_zero_init, get_module, init_new_modules, place_modules, set_module
from .presets import ALL_SUBLAYERS, get_preset
from .rng import fork_rng

FORMAT_VERSION = 1


@dataclass(frozen=True)
class VisualConfig:
    feat_dim: int = 2048
    pool_side: int | None = 6  # 7x7 grid -> 6x6 (36 tokens, spec §3.1); None keeps the tokens (video)
    n_images: int = 2
    video: bool = False

    @classmethod
    def for_task(cls, video: bool = False, feat_dim: int | None = None) -> "VisualConfig":
        if video:
            return cls(feat_dim=feat_dim or 512, pool_side=None, n_images=2, video=True)
        return cls(feat_dim=feat_dim or 2048)


class VLModel(nn.Module):
    def __init__(self, backbone: nn.Module, method: MethodConfig, visual: VisualConfig, *,
                 backbone_name: str, tokenizer=None, vocab_rows: int | None = None, seed: int = 0):
        super().__init__()
        cfg = backbone.config
        self.arch: ArchSpec = arch_for(cfg.model_type)
        self.method = method
        self.visual_config = visual
        self.backbone_name = backbone_name
        self.tokenizer = tokenizer
        self.seed = seed
        self.d_model = cfg.d_model
        self.ctx = JointContext()
        meta = next(backbone.parameters()).device.type == "meta"
        if getattr(cfg, "decoder_start_token_id", None) is None:  # T5 convention: start with pad
            cfg.decoder_start_token_id = cfg.pad_token_id

        with fork_rng(seed, enabled=not meta):
            self.original_vocab_rows = backbone.get_input_embeddings().num_embeddings
            rows = vocab_rows or vocab_size_after_extension(backbone_name, backbone, tokenizer)
            self._extend_vocabulary(backbone, rows)
            head = backbone.get_output_embeddings()
            if head is not None:  # same weights, a GPU-friendly product (vlpet.backbones.head)
                backbone.set_output_embeddings(AlignedLMHead.replace(head))
            self.backbone = backbone
            self._wrap_joint_input()
            self.visual_embedding = VisualEmbedding(visual.feat_dim, self.d_model, self.arch.norm, self.arch.norm_eps,
                                                    n_images=visual.n_images)
            new_modules: list[nn.Module] = [self.visual_embedding]
            created = place_modules(self.backbone, self.arch, method, self.ctx, self.d_model)
            new_modules += [m for m, _ in created]
            self.prompt = EncoderPrompt(self.d_model, method.prompt.length, method.prompt.mid_dim) \
                if method.prompt else None
            if self.prompt is not None:
                new_modules.append(self.prompt)
            if method.hyperformer is not None:
                new_modules += self._place_hyperformer()
            init_new_modules(new_modules, self.arch)
            apply_zero_init(created)
            lora_modules = []
            if method.lora is not None:
                from .methods.lora import inject_lora

                lora_modules = inject_lora(self.backbone, self.arch, method.lora)
            if method.add_biases:
                _add_zero_biases(self)
        self._pet_modules = new_modules[1:] + lora_modules
        self._set_neutral_generation_config()
        self.configure_trainable()

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def build(cls, backbone: str = "bart-base", method: str | MethodConfig = "vl-pet-large", *,
              video: bool = False, feat_dim: int | None = None, tokenizer=None, seed: int = 0,
              meta: bool = False, load_tok: bool = True) -> "VLModel":
        """Backbone: a built-in name (offline, random weights), a HF id or a local folder."""
        model = load_backbone(backbone, seed=seed, meta=meta)
        arch = arch_for(model.config.model_type)
        if isinstance(method, str):
            method = get_preset(method, arch.family, video=video)
        if tokenizer is None and load_tok and not meta:
            tokenizer = load_tokenizer(backbone)
        return cls(model, method, VisualConfig.for_task(video, feat_dim), backbone_name=backbone,
                   tokenizer=tokenizer, seed=seed)

    def _extend_vocabulary(self, backbone, rows: int) -> None:
        old = backbone.get_input_embeddings().num_embeddings
        if rows == old:
            return
        backbone.resize_token_embeddings(rows, mean_resizing=False)
        emb = backbone.get_input_embeddings().weight
        if rows > old and emb.device.type != "meta":
            # The added rows (spec §3.2): N(0, 0.02) for BART, N(0, 1) for T5; frozen, read by the
            # visual embedding as object-order rows. Saved in every adapter folder.
            with torch.no_grad():
                emb[old:].normal_(0.0, self.arch.new_vocab_row_std)

    def _wrap_joint_input(self) -> None:
        a = self.arch
        if a.text_only_positions:
            set_module(self.backbone, a.text_only_positions,
                       TextOnlyPositions(get_module(self.backbone, a.text_only_positions), self.ctx))
        if a.text_only_norm:
            set_module(self.backbone, a.text_only_norm,
                       TextOnlyNorm(get_module(self.backbone, a.text_only_norm), self.ctx))
        if a.relative_bias:
            set_module(self.backbone, a.relative_bias,
                       TextOnlyRelativeBias(get_module(self.backbone, a.relative_bias), self.ctx))

    def _place_hyperformer(self) -> list[nn.Module]:
        spec = self.method.hyperformer
        self.task_embeddings = TaskEmbeddings(spec.tasks, spec.task_embedding_dim)
        created: list[nn.Module] = [self.task_embeddings]
        self.hypernets = nn.ModuleDict()
        for stack in ("encoder", "decoder"):
            placements = [p for p in ALL_SUBLAYERS if p.startswith(stack)]
            blocks = [p.split(".")[1] for p in placements]
            layers = list(get_module(self.backbone, self.arch.encoder_layers if stack == "encoder"
                                     else self.arch.decoder_layers))
            ctrl = HyperNetController(len(layers), blocks, self.d_model, spec.r, spec.task_embedding_dim,
                                      spec.task_hidden_dim, spec.projected_dim)
            self.hypernets[stack] = ctrl
            created.append(ctrl)
            for i, layer in enumerate(layers):
                for placement, block in zip(placements, blocks):
                    sub = self.arch.sublayers[placement]
                    delta = HyperAdapter(ctrl, self.task_embeddings, i, block, self.ctx)
                    pet = GatedModification(delta, None)
                    set_module(layer, sub.wrap, GatedSublayer(get_module(layer, sub.wrap), pet, sub.output_index,
                                                              None, self.ctx))
        return created

    def _set_neutral_generation_config(self) -> None:
        """Nothing is inherited from a backbone's generation defaults (spec §3.7, §8.1.9): every call
        pins its own settings through `generate(...)`."""
        from transformers import GenerationConfig

        old = self.backbone.generation_config
        c = self.backbone.config

        def token(name):
            value = getattr(old, name, None)
            return value if value is not None else getattr(c, name, None)

        start = token("decoder_start_token_id")
        self.backbone.generation_config = GenerationConfig(
            decoder_start_token_id=start if start is not None else token("pad_token_id"),
            bos_token_id=token("bos_token_id"), eos_token_id=token("eos_token_id"), pad_token_id=token("pad_token_id"))

    # -- trainable set (spec §2.3) -------------------------------------------------------------
    def configure_trainable(self) -> None:
        extras = set(self.method.trainable)
        for p in self.parameters():
            p.requires_grad_("all" in extras)
        if "all" in extras:
            return
        if "visual_embedding" in extras:
            self.visual_embedding.requires_grad_(True)
        if "encoder_layer_norms" in extras or "all_layer_norms" in extras:
            root = get_module(self.backbone, self.arch.encoder) if "all_layer_norms" not in extras else self.backbone
            for m in root.modules():
                if is_norm(m):
                    m.requires_grad_(True)
        if "biases" in extras:
            for name, p in self.backbone.named_parameters():
                if name.endswith("bias"):
                    p.requires_grad_(True)
        for m in self._pet_modules:
            m.requires_grad_(True)

    def set_frozen_dtype(self, dtype: torch.dtype) -> None:
        """Store the frozen backbone tensors in `dtype` (bf16 for bf16 training; see vlpet.frozen_precision).
        Call after the trainable set is final (it decides what counts as frozen)."""
        set_frozen_dtype(self, dtype)

    def parameter_counts(self) -> tuple[int, int]:
        """(trainable, total) over unique parameters: the paper's Params % definition (spec §2.3)."""
        trainable = total = 0
        for p in self.parameters():
            total += p.numel()
            if p.requires_grad:
                trainable += p.numel()
        return trainable, total

    def print_trainable_parameters(self) -> None:
        t, n = self.parameter_counts()
        print(f"trainable params: {t:,} || all params: {n:,} || trainable%: {100 * t / n:.4f}")

    # -- forward -----------------------------------------------------------------------------------
    def visual_tokens(self, vis_feats: torch.Tensor, vis_attention_mask=None, boxes=None):
        """[B, V, F] or [B, M, V, F] -> ([B, M·V', D] embeddings, [B, M·V'] mask)."""
        vc = self.visual_config
        given = tuple(vis_feats.shape)  # name the tensor as the caller passed it in errors
        if vis_feats.dim() == 3:
            vis_feats = vis_feats.unsqueeze(1)
            if vis_attention_mask is not None:
                vis_attention_mask = vis_attention_mask.unsqueeze(1)
        if vis_feats.dim() != 4 or vis_feats.shape[-1] != vc.feat_dim:
            raise ShapeError(f"vis_feats has shape {given}; expected [B, V, {vc.feat_dim}] or "
                             f"[B, M, V, {vc.feat_dim}] (feat_dim {vc.feat_dim} for this model)")
        b, m, v, f = vis_feats.shape
        if m > vc.n_images:
            raise ShapeError(f"vis_feats has {m} images per example; this model takes at most {vc.n_images}")
        feats = vis_feats.reshape(b * m, v, f)
        if vc.pool_side and math.isqrt(v) ** 2 == v and math.isqrt(v) > vc.pool_side:
            feats = pool_grid(feats, vc.pool_side)
            vis_attention_mask = None  # grid tokens are never padding
        v2 = feats.shape[1]
        feats = feats.reshape(b, m * v2, f)
        img_ids = torch.arange(m, device=feats.device).repeat_interleave(v2)
        obj_ids = torch.arange(v2, device=feats.device).repeat(m)
        emb = self.visual_embedding(feats.to(self.visual_embedding.feat_embedding[0].weight.dtype), boxes,
                                    img_ids, obj_ids, self.backbone.get_input_embeddings().weight)
        if vis_attention_mask is None:
            mask = torch.ones(b, m * v2, dtype=torch.long, device=feats.device)
        else:
            mask = vis_attention_mask.reshape(b, m * v2).long()
        return emb, mask

    def encode(self, input_ids, attention_mask=None, vis_feats=None, vis_attention_mask=None, boxes=None):
        """Run the encoder on [prompt ; text ; visual]; returns (BaseModelOutput, joint attention mask).
        Call inside `self.task_context(...)` (forward and generate do)."""
        if input_ids.dim() != 2:
            raise ShapeError(f"input_ids has shape {tuple(input_ids.shape)}; expected [B, L]")
        b, length = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        parts = [self.backbone.get_input_embeddings()(input_ids)]
        masks = [attention_mask.long()]
        prompt_len = 0
        if self.prompt is not None:
            parts.insert(0, self.prompt(b).to(parts[0].dtype))
            masks.insert(0, torch.ones(b, self.prompt.length, dtype=torch.long, device=input_ids.device))
            prompt_len = self.prompt.length
        if vis_feats is not None:
            if vis_feats.dim() >= 1 and vis_feats.shape[0] != b:
                raise ShapeError(f"vis_feats has shape {tuple(vis_feats.shape)}, batch size {vis_feats.shape[0]}; "
                                 f"expected batch size {b} (that of input_ids {tuple(input_ids.shape)})")
            emb, vmask = self.visual_tokens(vis_feats, vis_attention_mask, boxes)
            parts.append(emb.to(parts[0].dtype))
            masks.append(vmask)
        embeds = torch.cat(parts, dim=1)
        mask = torch.cat(masks, dim=1)
        self.ctx.prompt_len, self.ctx.text_len, self.ctx.mask = prompt_len, length, mask
        encoder = self.backbone.get_encoder()
        if torch.compiler.is_compiling():
            # No try block while torch.compile traces: a graph break inside one (transformers 5.17's encoder has
            # a copy.deepcopy) makes dynamo compile every layer as its own graph (17 graphs instead of 2).
            enc = encoder(inputs_embeds=embeds, attention_mask=mask, return_dict=True)
            self.ctx.text_len, self.ctx.mask = None, None
        else:
            try:
                enc = encoder(inputs_embeds=embeds, attention_mask=mask, return_dict=True)
            finally:
                self.ctx.text_len, self.ctx.mask = None, None
        return BaseModelOutput(last_hidden_state=enc.last_hidden_state), mask

    @contextlib.contextmanager
    def task_context(self, task: str | None):
        old = getattr(self.ctx, "task", None)
        self.ctx.task = task
        try:
            yield
        finally:
            self.ctx.task = old

    def forward(self, input_ids, attention_mask=None, vis_feats=None, vis_attention_mask=None, boxes=None,
                labels=None, decoder_input_ids=None, decoder_attention_mask=None, task: str | None = None,
                return_loss: bool = True, **kwargs):
        """`labels` give the teacher-forced decoder input (shifted right) and, with `return_loss`, transformers'
        token-mean loss. Trainers that compute their own task loss pass `return_loss=False` to skip that
        second cross-entropy over the vocabulary."""
        if labels is not None and not return_loss:
            if decoder_input_ids is None:
                decoder_input_ids = self.backbone.prepare_decoder_input_ids_from_labels(labels=labels)
            labels = None
        # A teacher-forced forward needs no KV cache; building one costs time, and in transformers 5.17 its
        # constructor (a config deepcopy) breaks torch.compile's graph. Generation passes its own.
        kwargs.setdefault("use_cache", False)

        def run():
            enc, mask = self.encode(input_ids, attention_mask, vis_feats, vis_attention_mask, boxes)
            return self.backbone(encoder_outputs=enc, attention_mask=mask, labels=labels,
                                 decoder_input_ids=decoder_input_ids, decoder_attention_mask=decoder_attention_mask,
                                 return_dict=True, **kwargs)

        if torch.compiler.is_compiling():  # no with-block around the backbone while tracing (see encode)
            old, self.ctx.task = self.ctx.task, task
            out = run()
            self.ctx.task = old
            return out
        with self.task_context(task):
            return run()

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, vis_feats=None, vis_attention_mask=None, boxes=None,
                 task: str | None = None, **generation_settings):
        """transformers' generation from the VL encoder output. Pass every setting explicitly
        (num_beams, max_length / max_new_tokens, no_repeat_ngram_size, ...); none is inherited."""
        with self.task_context(task):
            enc, mask = self.encode(input_ids, attention_mask, vis_feats, vis_attention_mask, boxes)
            generation_settings.setdefault("num_beams", 1)
            generation_settings.setdefault("do_sample", False)
            return self.backbone.generate(encoder_outputs=enc, attention_mask=mask, **generation_settings)

    # -- gates -------------------------------------------------------------------------------------
    def gated_modules(self) -> dict[str, GatedModification]:
        """{'encoder.<layer>.<self_attn|ffn>': module} for every module with a gate."""
        out = {}
        for stack in ("encoder", "decoder"):
            path = self.arch.encoder_layers if stack == "encoder" else self.arch.decoder_layers
            for i, layer in enumerate(get_module(self.backbone, path)):
                for placement, sub in self.arch.sublayers.items():
                    if not placement.startswith(stack):
                        continue
                    mod = get_module(layer, sub.wrap)
                    if isinstance(mod, GatedSublayer) and mod.pet.gate is not None:
                        out[f"{stack}.{i}.{placement.split('.')[1]}"] = mod.pet
        return out

    def record_gates(self, enabled: bool = True) -> None:
        for m in self.gated_modules().values():
            m.record = enabled
            m.last_gate = None

    def gate_values(self) -> dict[str, torch.Tensor]:
        """G of every gated sub-layer from the last forward (after `record_gates(True)`)."""
        return {k: m.last_gate for k, m in self.gated_modules().items() if m.last_gate is not None}

    # -- adapter-only checkpoints -------------------------------------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}

    def config_dict(self) -> dict:
        c = self.backbone.config
        enc_layers = len(get_module(self.backbone, self.arch.encoder_layers))
        dec_layers = len(get_module(self.backbone, self.arch.decoder_layers))
        return {
            "format_version": FORMAT_VERSION,
            "backbone": self.backbone_name,
            "backbone_seed": self.seed,
            "architecture": {"model_type": c.model_type, "arch": self.arch.name, "d_model": c.d_model,
                             "encoder_layers": enc_layers, "decoder_layers": dec_layers},
            "vocab": {"original_rows": self.original_vocab_rows,
                      "rows": self.backbone.get_input_embeddings().num_embeddings},
            "visual": dataclasses.asdict(self.visual_config),
            "method": self.method.to_dict(),
        }

    def save_pretrained(self, folder: str | Path) -> Path:
        return save_adapter(self, folder)

    @classmethod
    def from_pretrained(cls, folder: str | Path, backbone: str | None = None, device=None,
                        strict: bool = True) -> "VLModel":
        """An adapter folder (save_pretrained) on its backbone (`backbone` overrides the one it names)."""
        folder = Path(folder)
        cfg = read_adapter_config(folder)
        method = MethodConfig.from_dict(cfg["method"], source=f"{folder / CONFIG_NAME}: method")
        try:
            visual = VisualConfig(**cfg["visual"])
        except TypeError as exc:
            raise CheckpointError(f"{folder / CONFIG_NAME}: bad 'visual' field ({exc})") from exc
        name = backbone or cfg["backbone"]
        base = load_backbone(name, seed=cfg.get("backbone_seed", 0))
        tokenizer = None
        if (folder / "tokenizer_config.json").exists():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(folder)
        if base.config.model_type != cfg["architecture"]["model_type"]:
            raise CheckpointError(f"{folder}: adapter was made for model_type={cfg['architecture']['model_type']!r} "
                                  f"but backbone {name!r} is {base.config.model_type!r}")
        model = cls(base, method, visual, backbone_name=name, tokenizer=tokenizer,
                    vocab_rows=cfg["vocab"]["rows"], seed=cfg.get("backbone_seed", 0))
        check_compatible(cfg, model, str(folder))
        load_trainable(model, load_tensors(folder / WEIGHTS_NAME), source=str(folder / WEIGHTS_NAME), strict=strict)
        if device is not None:
            model.to(device)
        return model


def _add_zero_biases(model: VLModel) -> None:
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Linear) and m.bias is None:
            m.bias = nn.Parameter(torch.zeros(m.out_features, device=m.weight.device, dtype=m.weight.dtype))
        elif is_norm(m) and getattr(m, "bias", None) is None and not isinstance(m, BiasedNorm) \
                and not name.endswith("base_layer"):
            set_module(model, name, BiasedNorm(m, m.weight.shape[0]))
