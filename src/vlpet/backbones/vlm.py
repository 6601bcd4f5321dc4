"""The VLM's own input path (issue 18): images -> frozen vision part -> projector -> image-token slots.

For Florence-2 and BLIP-2 / InstructBLIP with a T5 LM, the VLM defines how image features enter its
language encoder: the processor puts `image_token_id` placeholders in `input_ids` and the projected
features replace them (`masked_scatter`). vlpet reproduces that merge step by step (the same calls
the VLM's forward makes, so outputs are bit-identical to the plain model's) because it needs two
seams the VLMs' forward does not offer: prompt-tuning tokens before the encoder input, and a split
between the frozen part (cached per image, `frozen_image_features`) and the trainable projector.

    frozen part                              projector (the `visual_embedding` extra)
    Florence-2:   vision_tower               multi_modal_projector
    BLIP-2:       vision_model + Q-Former    language_projection
    InstructBLIP: vision_model               Q-Former (reads the instruction) + language_projection

Everything here is a function of (backbone, tensors); the architecture table names which path a
backbone takes (`ArchSpec.image_path`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ShapeError


def text_config(config):
    """The language model's config (composite VLM configs keep d_model and token ids in `text_config`)."""
    return getattr(config, "text_config", None) or config


def lm_width(config) -> int:
    """The language model's hidden width (`d_model` for BART/T5, `hidden_size` for decoder-only LMs)."""
    c = text_config(config)
    width = getattr(c, "d_model", None)
    return width if width is not None else c.hidden_size


def seq2seq_module(backbone: nn.Module, image_path: str | None) -> nn.Module:
    """The module that runs the language encoder-decoder from `encoder_outputs` (forward and generate):
    Florence-2's own top-level model (its forward accepts encoder outputs), BLIP-2's T5."""
    if image_path in ("blip2", "instructblip"):
        return backbone.language_model
    return backbone


def image_token_id(config) -> int:
    value = getattr(config, "image_token_id", None)
    if value is None:
        value = getattr(config, "image_token_index", None)
    return value


#: the modules `frozen_features` runs, by image path (paths from the VLM's root): their inputs are images only,
#: so their shapes change with the batch alone (InstructBLIP's Q-Former reads the instruction: not here)
FROZEN_FEATURE_MODULES = {"florence2": ("model.vision_tower",), "blip2": ("vision_model", "qformer"),
                          "instructblip": ("vision_model",)}


def _blip_vision(backbone, pixel_values):
    return backbone.vision_model(pixel_values=pixel_values, return_dict=True).last_hidden_state


def _qformer(backbone, image_embeds, qformer_input_ids=None, qformer_attention_mask=None):
    """BLIP-2 / InstructBLIP's Q-Former step, as their get_image_features runs it."""
    b = image_embeds.shape[0]
    image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
    queries = backbone.query_tokens.expand(b, -1, -1)
    kw = {}
    if qformer_input_ids is not None:  # InstructBLIP: the Q-Former reads the instruction after the queries
        query_mask = torch.ones(queries.shape[:-1], dtype=torch.long, device=image_embeds.device)
        if qformer_attention_mask is None:
            qformer_attention_mask = torch.ones_like(qformer_input_ids)
        kw = {"input_ids": qformer_input_ids,
              "attention_mask": torch.cat([query_mask, qformer_attention_mask.to(query_mask.device)], dim=1)}
    out = backbone.qformer(query_embeds=queries, encoder_hidden_states=image_embeds,
                           encoder_attention_mask=image_mask, return_dict=True, **kw)[0]
    out = out[:, : queries.shape[1], :]
    # BLIP-2 keeps its Q-Former in fp32 and casts its output back to the vision tower's dtype
    return out.to(image_embeds.dtype) if out.dtype != image_embeds.dtype else out


def frozen_features(backbone: nn.Module, image_path: str, pixel_values: torch.Tensor,
                    qformer_input_ids=None, qformer_attention_mask=None) -> torch.Tensor:
    """The output of the frozen part of the image path (what a per-image cache may hold)."""
    if pixel_values.dim() != 4:
        raise ShapeError(f"pixel_values has shape {tuple(pixel_values.shape)}; expected [B, 3, H, W]")
    if image_path == "florence2":
        return backbone.model.vision_tower(pixel_values).last_hidden_state
    if image_path == "blip2":
        return _qformer(backbone, _blip_vision(backbone, pixel_values))
    if image_path == "instructblip":
        return _blip_vision(backbone, pixel_values)
    raise ValueError(f"no image path {image_path!r}")


def project(backbone: nn.Module, image_path: str, features: torch.Tensor,
            qformer_input_ids=None, qformer_attention_mask=None) -> torch.Tensor:
    """Frozen features -> [B, n_image_tokens, d_model] language-model inputs."""
    if image_path == "florence2":
        return backbone.model.multi_modal_projector(features)
    if image_path == "blip2":
        return backbone.language_projection(features)
    if image_path == "instructblip":
        if qformer_input_ids is None:
            raise ShapeError("InstructBLIP needs qformer_input_ids (the instruction the Q-Former reads; "
                             "its processor returns them)")
        return backbone.language_projection(_qformer(backbone, features, qformer_input_ids, qformer_attention_mask))
    raise ValueError(f"no image path {image_path!r}")


def merge_image_tokens(config, input_ids: torch.Tensor, embeds: torch.Tensor, image_embeds: torch.Tensor):
    """Put the projected image features into the image-token slots, as the VLM's forward does."""
    slots = input_ids == image_token_id(config)
    # the count check syncs with the device: skipped while torch.compile traces (a graph break otherwise)
    n_slots = None if torch.compiler.is_compiling() else int(slots.sum())
    if n_slots is not None and n_slots * embeds.shape[-1] != image_embeds.numel():
        raise ShapeError(
            f"input_ids hold {n_slots} image tokens (id {image_token_id(config)}) but the images give "
            f"{image_embeds.shape[0]} x {image_embeds.shape[1]} features; use the model's processor, which puts "
            f"one image token per feature at the start of the text")
    return embeds.masked_scatter(slots.unsqueeze(-1).to(embeds.device), image_embeds.to(embeds.device, embeds.dtype))
