"""`VLModel`: an unmodified HF encoder-decoder that reads visual features, with a PET method placed in it.

    model = VLModel.build("facebook/bart-base", "vl-pet-large")      # or "bart-base" (offline, random)
    out = model(input_ids, attention_mask, vis_feats=feats, labels=labels)   # out.loss, out.logits
    ids = model.generate(input_ids, attention_mask, vis_feats=feats, num_beams=5, max_length=40)
    model.save_pretrained("adapter/")                                  # trainable tensors + config only
    model = VLModel.from_pretrained("adapter/")                       # base model + adapter folder

Today's VLMs (issue 18) take their own inputs through their own processor and frozen vision part:

    model = VLModel.build("florence-community/Florence-2-base", "vl-pet-large")  # or "florence2-base" (random)
    out = model(**model.processor(images=img, text="What is in the image?"), labels=labels)
    model = vlpet.get_vlpet_model(hf_model, "vl-pet-large")          # wrap a model you already hold (PEFT style)
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
from .backbones import vlm
from . import decoder_only
from .backbones.loading import load_backbone, load_processor, load_tokenizer, vocab_size_after_extension
from .backbones.norms import BiasedNorm, is_norm
from .backbones.visual import VisualEmbedding, pool_grid
from .checkpoint import (CONFIG_NAME, WEIGHTS_NAME, check_compatible, load_tensors, load_trainable,
                         read_adapter_config, save_adapter)
from .errors import CheckpointError, ConfigError, ShapeError
from .frozen_precision import set_frozen_dtype
from .granularity import GatedModification
from .method import MethodConfig
from .methods.adapter import ParallelLinear
from .methods.hyperformer import HyperAdapter, HyperNetController, TaskEmbeddings
from .methods.prompt import EncoderPrompt
from .placement import (GatedSublayer, apply_zero_init, check_placements, get_module, init_new_modules, place_modules,
                        set_module)
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
    _adapters_disabled = False  # inside `disable_adapters()`
    def __init__(self, backbone: nn.Module, method: MethodConfig, visual: VisualConfig | None, *,
                 backbone_name: str, tokenizer=None, vocab_rows: int | None = None, seed: int = 0,
                 native_inputs: bool | None = None, processor=None):
        super().__init__()
        cfg = backbone.config
        self.arch: ArchSpec = arch_for(cfg.model_type, cfg)
        # The VLM's own input path (issue 18): always for VLMs; for a plain BART/T5 when wrapped PEFT-style
        # (get_vlpet_model). False: the VL-BART / VL-T5 path over precomputed features.
        self.native_inputs = bool(self.arch.image_path) if native_inputs is None else bool(native_inputs)
        if self.arch.image_path and not self.native_inputs:
            raise ShapeError(f"{cfg.model_type} defines its own image input; it cannot take the VL-BART feature path")
        if self.arch.decoder_only:  # validated before anything in the backbone is changed
            decoder_only.check_method(method)
        check_placements(self.arch, method)
        self.method = method
        self.visual_config = None if self.native_inputs else visual
        self.backbone_name = backbone_name
        self.processor = processor
        if tokenizer is None and processor is not None:
            tokenizer = getattr(processor, "tokenizer", None)
        self.tokenizer = tokenizer
        self.seed = seed
        tcfg = vlm.text_config(cfg)
        self.d_model = vlm.lm_width(cfg)
        self.ctx = JointContext()
        meta = next(backbone.parameters()).device.type == "meta"
        # T5 convention: start with pad (a decoder-only LM has no decoder start; its config stays as it is)
        if not self.arch.decoder_only and getattr(tcfg, "decoder_start_token_id", None) is None:
            tcfg.decoder_start_token_id = tcfg.pad_token_id

        # on a meta backbone (parameter counting) the new modules are meta too: no allocation, no init
        with fork_rng(seed, enabled=not meta), (torch.device("meta") if meta else contextlib.nullcontext()):
            self.original_vocab_rows = backbone.get_input_embeddings().num_embeddings
            if not self.native_inputs:  # the 200 VL rows belong to the VL-BART input path only
                rows = vocab_rows or vocab_size_after_extension(backbone_name, backbone, tokenizer)
                self._extend_vocabulary(backbone, rows)
            head = backbone.get_output_embeddings()
            if head is not None:  # same weights, a GPU-friendly product (vlpet.backbones.head)
                backbone.set_output_embeddings(AlignedLMHead.replace(head))
            self.backbone = backbone
            new_modules: list[nn.Module] = []
            if self.native_inputs:
                self.visual_embedding = None  # the VLM's projector plays its part (ArchSpec.projector)
            else:
                self._wrap_joint_input()
                self.visual_embedding = VisualEmbedding(visual.feat_dim, self.d_model, self.arch.norm,
                                                        self.arch.norm_eps, n_images=visual.n_images)
                new_modules.append(self.visual_embedding)
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
                _add_zero_biases(self.language_model if self.native_inputs else self)
        self._pet_modules = [m for m in new_modules if m is not self.visual_embedding] + lora_modules
        if self.arch.decoder_only:  # the prefix the causal G_small and the value adapter read (issue 20)
            self._prefix_state = decoder_only.PrefixState()
            decoder_only.bind(self.backbone, self._prefix_state)
            get_module(self.backbone, self.arch.encoder).register_forward_hook(
                decoder_only.mark_prefix_read(self._prefix_state))
        self._set_neutral_generation_config()
        self.configure_trainable()
        self._frozen_vision_eval()  # other modules keep the mode the model came in (as PEFT does)
        # The frozen backbone values of the trainable backbone tensors (norms, biases, projector): the
        # disable context puts them back, so that it gives the plain model's outputs (CPU copies, not state).
        self._base_values = {} if meta or "all" in method.trainable else {
            n: p.detach().to("cpu", copy=True) for n, p in self._backbone_trainables()}

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def build(cls, backbone: str = "bart-base", method: str | MethodConfig = "vl-pet-large", *,
              video: bool = False, feat_dim: int | None = None, tokenizer=None, seed: int = 0,
              meta: bool = False, load_tok: bool = True) -> "VLModel":
        """Backbone: a built-in name (offline, random weights), a HF id or a local folder. Florence-2 and
        BLIP-2 / InstructBLIP (T5 LM) take their own input path, with the VLM's processor when one exists."""
        model = load_backbone(backbone, seed=seed, meta=meta)
        arch = arch_for(model.config.model_type, model.config)
        if arch.image_path:
            method = vlm_method(method, model.config, arch)
            processor = load_processor(backbone) if load_tok and not meta else None
            return cls(model, method, None, backbone_name=backbone, tokenizer=tokenizer, seed=seed,
                       processor=processor)
        if isinstance(method, str):
            method = get_preset(method, arch.family, video=video)
        if tokenizer is None and load_tok and not meta:
            tokenizer = load_tokenizer(backbone)
        return cls(model, method, VisualConfig.for_task(video, feat_dim), backbone_name=backbone,
                   tokenizer=tokenizer, seed=seed)

    @property
    def language_model(self) -> nn.Module:
        """The language encoder-decoder inside the backbone (the backbone itself for BART / T5)."""
        return get_module(self.backbone, self.arch.language_model) if self.arch.language_model else self.backbone

    @property
    def _seq2seq(self) -> nn.Module:
        return vlm.seq2seq_module(self.backbone, self.arch.image_path) if self.native_inputs else self.backbone

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

        target = self._seq2seq
        old = target.generation_config
        c = vlm.text_config(target.config)

        def token(name):
            value = getattr(old, name, None)
            return value if value is not None else getattr(c, name, None)

        start = token("decoder_start_token_id")
        target.generation_config = GenerationConfig(
            decoder_start_token_id=start if start is not None else token("pad_token_id"),
            bos_token_id=token("bos_token_id"), eos_token_id=token("eos_token_id"), pad_token_id=token("pad_token_id"))

    # -- trainable set (spec §2.3) -------------------------------------------------------------
    def configure_trainable(self) -> None:
        """The method's trainable set. On a VLM the extras map onto its language model (`visual_embedding` =
        the vision-to-language projector); the vision tower and Q-Former stay frozen in every method, as the
        paper's CLIP did (so the frozen image features can be cached)."""
        extras = set(self.method.trainable)
        for p in self.parameters():
            p.requires_grad_("all" in extras)
        if "all" in extras:
            for part in self.arch.vision_parts if self.native_inputs else ():
                _part(self.backbone, part).requires_grad_(False)
            return
        if "visual_embedding" in extras:
            if self.visual_embedding is not None:
                self.visual_embedding.requires_grad_(True)
            elif self.arch.projector:
                get_module(self.backbone, self.arch.projector).requires_grad_(True)
        lm = self.language_model
        if "encoder_layer_norms" in extras or "all_layer_norms" in extras:
            root = get_module(self.backbone, self.arch.encoder) if "all_layer_norms" not in extras else lm
            for m in root.modules():
                if is_norm(m):
                    m.requires_grad_(True)
        if "biases" in extras:
            for name, p in lm.named_parameters():
                if name.endswith("bias"):
                    p.requires_grad_(True)
        for m in self._pet_modules:
            m.requires_grad_(True)

    def train(self, mode: bool = True):
        """A frozen vision part (and Q-Former) runs in eval mode even while training: no dropout / drop-path in
        it, so that its features are the deterministic ones `frozen_image_features` caches."""
        super().train(mode)
        self._frozen_vision_eval()
        return self

    def _frozen_vision_eval(self) -> None:
        for path in self.arch.vision_parts if self.native_inputs else ():
            part = _part(self.backbone, path)
            if isinstance(part, nn.Module) and not any(p.requires_grad for p in part.parameters()):
                part.eval()

    def _pet_parameter_ids(self) -> set[int]:
        return {id(p) for m in self._pet_modules for p in m.parameters()}

    def _backbone_trainables(self):
        """Trainable tensors of the backbone itself (not of a PET module): norms, biases, the projector."""
        pet = self._pet_parameter_ids()
        return [(n, p) for n, p in self.backbone.named_parameters() if p.requires_grad and id(p) not in pet]

    @contextlib.contextmanager
    def disable_adapters(self):
        """Inside: every PET module is bypassed and the trainable backbone tensors (norms, biases, projector)
        hold their base values, so outputs equal the plain model's (PEFT's `disable_adapter`)."""
        if "all" in self.method.trainable:
            raise ConfigError("disable_adapters: full fine-tuning has no adapters; every backbone tensor is tuned")
        params = dict(self.backbone.named_parameters())
        tuned = {}
        with torch.no_grad():
            for n, base in self._base_values.items():
                tuned[n] = params[n].detach().clone()
                params[n].copy_(base.to(params[n].device, params[n].dtype))
        lora = [m for m in self.backbone.modules() if hasattr(m, "enable_adapters") and hasattr(m, "lora_A")]
        wrappers = [m for m in self.modules() if isinstance(m, (GatedSublayer, ParallelLinear))]
        old = self._adapters_disabled
        self._adapters_disabled = True
        for m in wrappers:
            m.disabled = True
        for m in lora:
            m.enable_adapters(False)
        try:
            yield self
        finally:
            self._adapters_disabled = old
            for m in wrappers:
                m.disabled = old
            for m in lora:
                m.enable_adapters(not old)
            with torch.no_grad():
                for n, t in tuned.items():
                    params[n].copy_(t)

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
        if self.prompt is not None and not self._adapters_disabled:
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
        enc = self._run_encoder(self.backbone.get_encoder(), embeds, mask, prompt_len, length)
        return BaseModelOutput(last_hidden_state=enc.last_hidden_state), mask

    def _run_encoder(self, encoder, embeds, mask, prompt_len: int, text_len: int):
        """The encoder call of both input paths, with the JointContext active around it: the gates read the
        joint mask from it (masked_mean), the VL-BART wrappers the text span."""
        self.ctx.prompt_len, self.ctx.text_len, self.ctx.mask = prompt_len, text_len, mask
        if torch.compiler.is_compiling():
            # No try block while torch.compile traces: a graph break inside one (transformers 5.17's encoder has
            # a copy.deepcopy) makes dynamo compile every layer as its own graph (17 graphs instead of 2).
            enc = encoder(inputs_embeds=embeds, attention_mask=mask, return_dict=True)
            self.ctx.text_len, self.ctx.mask = None, None
            return enc
        try:
            return encoder(inputs_embeds=embeds, attention_mask=mask, return_dict=True)
        finally:
            self.ctx.text_len, self.ctx.mask = None, None

    # -- the VLM's own input path (issue 18; vlpet.backbones.vlm) --------------------------------------
    def _check_native(self, what: str) -> None:
        if not self.native_inputs:
            raise ShapeError(f"{what} is for VLM backbones (Florence-2, BLIP-2 / InstructBLIP); {self.backbone_name!r} "
                             f"reads precomputed features through vis_feats=")
        if not self.arch.image_path:
            raise ShapeError(f"{what}: {self.backbone_name!r} is a text-only seq2seq model; it takes no images")
        if self.arch.decoder_only:
            raise ShapeError(f"{what} is not offered for decoder-only VLMs ({self.arch.name}); pass pixel_values")

    @torch.no_grad()
    def frozen_image_features(self, pixel_values: torch.Tensor, **kw) -> torch.Tensor:
        """The output of the frozen part of the image path, per image and deterministic (eval mode): Florence-2's
        vision tower, BLIP-2's vision tower + Q-Former, InstructBLIP's vision tower (its Q-Former reads the
        instruction). Pass it back as `image_features=` to skip that part (a per-image cache)."""
        self._check_native("frozen_image_features")
        was = [(m, m.training) for m in (_part(self.backbone, p) for p in self.arch.vision_parts)
               if isinstance(m, nn.Module)]
        for m, _ in was:
            m.eval()
        try:
            return vlm.frozen_features(self.backbone, self.arch.image_path, pixel_values)
        finally:
            for m, mode in was:
                m.train(mode)

    def image_features_key(self, processor=None) -> str:
        """A short digest of everything that determines `frozen_image_features`: the backbone's config, the
        frozen vision weights, and the processor's image settings (for a disk cache)."""
        import hashlib
        import json

        self._check_native("image_features_key")
        h = hashlib.sha256()
        h.update(json.dumps(self.backbone.config.to_dict(), sort_keys=True, default=str).encode())
        h.update(self._vision_weights_digest().encode())
        proc = processor if processor is not None else self.processor
        image_proc = getattr(proc, "image_processor", None)
        if image_proc is not None:
            h.update(json.dumps(image_proc.to_dict(), sort_keys=True, default=str).encode())
        return h.hexdigest()[:16]

    def _vision_weights_digest(self) -> str:
        """SHA-256 of the frozen vision weights (about 4 GB for BLIP-2's ViT-g): computed once per model and
        kept while the tensors are the same ones, unmodified (their in-place version counters unchanged)."""
        import hashlib

        tensors = []
        for part in self.arch.vision_parts:
            mod = _part(self.backbone, part)
            items = [("", mod)] if isinstance(mod, torch.Tensor) else list(mod.state_dict().items())
            tensors += [(f"{part}.{name}", t) for name, t in sorted(items, key=lambda kv: kv[0])]
        stamp = tuple((n, t.data_ptr(), t.dtype, t._version) for n, t in tensors)
        cached = getattr(self, "_vision_digest", None)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        h = hashlib.sha256()
        for name, t in tensors:
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
            h.update(t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
        self._vision_digest = (stamp, h.hexdigest())
        return self._vision_digest[1]

    def _native_encode(self, input_ids, attention_mask=None, pixel_values=None, image_features=None,
                       qformer_input_ids=None, qformer_attention_mask=None, inputs_embeds=None):
        """The VLM's input merge (image features into the image-token slots), then its language encoder;
        prompt-tuning tokens, if any, go first. Returns (BaseModelOutput, attention mask)."""
        if pixel_values is not None and image_features is not None:
            raise ShapeError("give pixel_values or image_features, not both")
        if inputs_embeds is None:
            if input_ids is None or input_ids.dim() != 2:
                raise ShapeError(f"input_ids has shape {None if input_ids is None else tuple(input_ids.shape)}; "
                                 f"expected [B, L]")
            inputs_embeds = self.backbone.get_input_embeddings()(input_ids)
        b = inputs_embeds.shape[0]
        if attention_mask is None:
            attention_mask = torch.ones(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device)
        if pixel_values is not None or image_features is not None:
            self._check_native("pixel_values / image_features")
            if input_ids is None:  # checked before the (costly) image path runs
                raise ShapeError("images need input_ids (their image tokens mark where the features go)")
            if image_features is None:
                # no autograd graph through the frozen part unless something in it trains
                image_features = vlm.frozen_features(self.backbone, self.arch.image_path, pixel_values)
            if image_features.shape[0] != b:
                raise ShapeError(f"image batch {image_features.shape[0]} != text batch {b}")
            image_embeds = vlm.project(self.backbone, self.arch.image_path, image_features,
                                       qformer_input_ids, qformer_attention_mask)
            inputs_embeds = vlm.merge_image_tokens(self.backbone.config, input_ids, inputs_embeds, image_embeds)
        mask = attention_mask
        text_len, prompt_len = inputs_embeds.shape[1], 0
        if self.prompt is not None and not self._adapters_disabled:
            inputs_embeds = torch.cat([self.prompt(b).to(inputs_embeds.dtype), inputs_embeds], dim=1)
            mask = torch.cat([torch.ones(b, self.prompt.length, dtype=mask.dtype, device=mask.device), mask], dim=1)
            prompt_len = self.prompt.length
        # the VLM's merged input (image + text tokens) is the "text" span here: no VL-BART wrappers on this path
        enc = self._run_encoder(self._seq2seq.get_encoder(), inputs_embeds, mask, prompt_len, text_len)
        return BaseModelOutput(last_hidden_state=enc.last_hidden_state), mask

    def _native_forward(self, input_ids, attention_mask, labels, decoder_input_ids, decoder_attention_mask,
                        pixel_values, image_features, qformer_input_ids, qformer_attention_mask, task, kwargs):
        with self.task_context(task):
            enc, mask = self._native_encode(input_ids, attention_mask, pixel_values, image_features,
                                            qformer_input_ids, qformer_attention_mask, kwargs.pop("inputs_embeds", None))
            out = self._seq2seq(encoder_outputs=enc, attention_mask=mask, labels=labels,
                                decoder_input_ids=decoder_input_ids, decoder_attention_mask=decoder_attention_mask,
                                return_dict=True, **kwargs)
        return out

    @contextlib.contextmanager
    def task_context(self, task: str | None):
        old = getattr(self.ctx, "task", None)
        self.ctx.task = task
        try:
            yield
        finally:
            self.ctx.task = old

    def forward(self, input_ids=None, attention_mask=None, vis_feats=None, vis_attention_mask=None, boxes=None,
                labels=None, decoder_input_ids=None, decoder_attention_mask=None, task: str | None = None,
                return_loss: bool = True, pixel_values=None, image_features=None, qformer_input_ids=None,
                qformer_attention_mask=None, **kwargs):
        """`labels` give the teacher-forced decoder input (shifted right) and, with `return_loss`, transformers'
        token-mean loss. Trainers that compute their own task loss pass `return_loss=False` to skip that
        second cross-entropy over the vocabulary.

        VLM backbones take the VLM's own inputs (`model(**processor(images=..., text=...), labels=...)`):
        `pixel_values` (or `image_features` from `frozen_image_features`), and InstructBLIP's `qformer_*`."""
        # A teacher-forced forward needs no KV cache; building one costs time, and in transformers 5.17 its
        # constructor (a config deepcopy) breaks torch.compile's graph. Generation passes its own.
        kwargs.setdefault("use_cache", False)
        # decoder-only first: it needs the labels themselves to build [prompt ; answer] (and skips the loss
        # itself when return_loss is False); the shift below is the encoder-decoder's teacher forcing
        if self.arch.decoder_only:  # [prompt ; answer] through the decoder-only VLM's own forward (issue 20)
            if vis_feats is not None or image_features is not None:
                raise ShapeError("decoder-only VLMs take pixel_values (and their processor's image inputs); "
                                 "vis_feats / image_features are not accepted")
            with self.task_context(task):
                return decoder_only.forward(self, input_ids, attention_mask, labels, return_loss,
                                            dict(kwargs, pixel_values=pixel_values) if pixel_values is not None
                                            else kwargs)
        if labels is not None and not return_loss:
            if decoder_input_ids is None:
                decoder_input_ids = (self._shift_labels(labels) if self.native_inputs
                                     else self.backbone.prepare_decoder_input_ids_from_labels(labels=labels))
            labels = None
        if self.native_inputs:
            if vis_feats is not None:
                raise ShapeError("vis_feats is the VL-BART feature path; this model takes pixel_values "
                                 "(or image_features) through its own processor")
            return self._native_forward(input_ids, attention_mask, labels, decoder_input_ids, decoder_attention_mask,
                                        pixel_values, image_features, qformer_input_ids, qformer_attention_mask,
                                        task, kwargs)
        if input_ids is None:
            raise ShapeError("input_ids is required")

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

    def _pad_id(self) -> int:
        c = vlm.text_config(self.backbone.config)
        for value in (getattr(self.backbone.generation_config, "pad_token_id", None), c.pad_token_id,
                      getattr(self.backbone.config, "pad_token_id", None), c.eos_token_id):
            if isinstance(value, int):
                return value
        return 0

    def _shift_labels(self, labels):
        from transformers.models.bart.modeling_bart import shift_tokens_right

        c = vlm.text_config(self._seq2seq.config)
        start = c.decoder_start_token_id if c.decoder_start_token_id is not None else c.pad_token_id
        return shift_tokens_right(labels, c.pad_token_id, start)  # -100 becomes pad, as in BART and T5

    @torch.no_grad()
    def generate(self, input_ids=None, attention_mask=None, vis_feats=None, vis_attention_mask=None, boxes=None,
                 task: str | None = None, pixel_values=None, image_features=None, qformer_input_ids=None,
                 qformer_attention_mask=None, **generation_settings):
        """transformers' generation from the VL encoder output. Pass every setting explicitly
        (num_beams, max_length / max_new_tokens, no_repeat_ngram_size, ...); none is inherited.
        VLMs: the language model's own `generate` from the merged encoder input (what the VLM's generate runs)."""
        generation_settings.setdefault("num_beams", 1)
        generation_settings.setdefault("do_sample", False)
        with self.task_context(task):
            if self.arch.decoder_only:
                from .data.images import DECODER_ONLY_INPUT_KEYS

                extra = {k: generation_settings.pop(k) for k in DECODER_ONLY_INPUT_KEYS if k in generation_settings}
                if pixel_values is not None:
                    extra["pixel_values"] = pixel_values
                return decoder_only.generate(self, input_ids, attention_mask, generation_settings, extra)
            if self.native_inputs:
                enc, mask = self._native_encode(input_ids, attention_mask, pixel_values, image_features,
                                                qformer_input_ids, qformer_attention_mask)
                return self._seq2seq.generate(encoder_outputs=enc, attention_mask=mask, **generation_settings)
            enc, mask = self.encode(input_ids, attention_mask, vis_feats, vis_attention_mask, boxes)
            return self.backbone.generate(encoder_outputs=enc, attention_mask=mask, **generation_settings)

    # -- gates -------------------------------------------------------------------------------------
    def gated_modules(self) -> dict[str, GatedModification]:
        """{'encoder.<layer>.<self_attn|ffn>': module} for every module with a gate."""
        out = {}
        for stack in ("encoder", "decoder"):
            path = self.arch.encoder_layers if stack == "encoder" else self.arch.decoder_layers
            if not path:  # decoder-only: one stack
                continue
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
        out = {
            "format_version": FORMAT_VERSION,
            "backbone": self.backbone_name,
            "backbone_seed": self.seed,
            "architecture": _architecture(self.backbone, self.arch),
            "vocab": {"original_rows": self.original_vocab_rows,
                      "rows": self.backbone.get_input_embeddings().num_embeddings},
            "visual": None if self.visual_config is None else dataclasses.asdict(self.visual_config),
            "method": self.method.to_dict(),
        }
        if self.native_inputs:
            out["native_inputs"] = True
        return out

    def save_pretrained(self, folder: str | Path) -> Path:
        return save_adapter(self, folder)

    @classmethod
    def from_pretrained(cls, folder: str | Path, backbone: str | None = None, *, base_model: nn.Module | None = None,
                        device=None, strict: bool = True) -> "VLModel":
        """Base model + adapter folder (save_pretrained). `backbone` overrides the backbone the folder names;
        `base_model`: a loaded Hugging Face model to put the adapter onto, in place (as PEFT's
        `PeftModel.from_pretrained`)."""
        folder = Path(folder)
        cfg = read_adapter_config(folder)
        method = MethodConfig.from_dict(cfg["method"], source=f"{folder / CONFIG_NAME}: method")
        native = bool(cfg.get("native_inputs", False))
        visual = None
        if not native:
            try:
                visual = VisualConfig(**cfg["visual"])
            except TypeError as exc:
                raise CheckpointError(f"{folder / CONFIG_NAME}: bad 'visual' field ({exc})") from exc
        name = backbone or cfg["backbone"]
        if base_model is not None:
            base = base_model
            name = name or getattr(base.config, "_name_or_path", "")
        else:
            base = load_backbone(name, seed=cfg.get("backbone_seed", 0))
        tokenizer = None
        if (folder / "tokenizer_config.json").exists():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(folder)
        if base.config.model_type != cfg["architecture"]["model_type"]:
            raise CheckpointError(f"{folder}: adapter was made for model_type={cfg['architecture']['model_type']!r} "
                                  f"but backbone {name!r} is {base.config.model_type!r}")
        # before wrapping: a mismatched folder leaves a given base_model as it was
        arch = arch_for(base.config.model_type, base.config)
        check_compatible(cfg, _architecture(base, arch), name, str(folder))
        if arch.decoder_only:
            decoder_only.check_method(method)
        processor = load_processor(name) if native and base_model is None and name else None
        model = cls(base, method, visual, backbone_name=name, tokenizer=tokenizer,
                    vocab_rows=cfg["vocab"]["rows"], seed=cfg.get("backbone_seed", 0),
                    native_inputs=native, processor=processor)
        load_trainable(model, load_tensors(folder / WEIGHTS_NAME), source=str(folder / WEIGHTS_NAME), strict=strict)
        if device is not None:
            model.to(device)
        return model


def vlm_method(method: str | MethodConfig, config, arch) -> MethodConfig:
    """A preset name resolved for a VLM (or a model wrapped in place): module sizes scale with the language
    model's width (issue 18); a MethodConfig is used as it is."""
    return get_preset(method, arch.family, d_model=vlm.lm_width(config)) if isinstance(method, str) else method


def get_vlpet_model(model: nn.Module, method: str | MethodConfig = "vl-pet-large", *, seed: int = 0,
                    processor=None) -> VLModel:
    """Put a VL-PET method into a loaded Hugging Face model, in place, as PEFT's `get_peft_model` does:
    BART / T5 (plain text seq2seq: their own inputs, no VL-BART feature path) and Florence-2, BLIP-2 and
    InstructBLIP with a T5 LM (their own image path). Module sizes follow the language model's width."""
    if isinstance(model, VLModel):
        raise ConfigError("get_vlpet_model: the model already holds a VL-PET method")
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(model, "get_input_embeddings"):
        raise ConfigError(f"get_vlpet_model expects a Hugging Face PreTrainedModel, got {type(model).__name__}")
    method = vlm_method(method, cfg, arch_for(cfg.model_type, cfg))
    return VLModel(model, method, None, backbone_name=getattr(cfg, "_name_or_path", "") or "", seed=seed,
                   native_inputs=True, processor=processor)


def _architecture(backbone: nn.Module, arch: ArchSpec) -> dict:
    """The architecture facts an adapter folder records and checks (read from the backbone, changing nothing)."""
    enc_layers = len(get_module(backbone, arch.encoder_layers))
    dec_layers = len(get_module(backbone, arch.decoder_layers)) if arch.decoder_layers else 0
    return {"model_type": backbone.config.model_type, "arch": arch.name, "d_model": vlm.lm_width(backbone.config),
            "encoder_layers": enc_layers, "decoder_layers": dec_layers}


def _part(root: nn.Module, path: str):
    """A module or a bare parameter (BLIP-2's `query_tokens`) by dotted path."""
    parent, _, name = path.rpartition(".")
    owner = root.get_submodule(parent) if parent else root
    return getattr(owner, name)



def _add_zero_biases(model: VLModel) -> None:
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Linear) and m.bias is None:
            m.bias = nn.Parameter(torch.zeros(m.out_features, device=m.weight.device, dtype=m.weight.dtype))
        elif is_norm(m) and getattr(m, "bias", None) is None and not isinstance(m, BiasedNorm) \
                and not name.endswith("base_layer"):
            set_module(model, name, BiasedNorm(m, m.weight.shape[0]))
