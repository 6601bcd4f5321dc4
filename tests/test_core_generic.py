"""The generic path: other HF encoder-decoders (mBART, Pegasus) through their architecture-table entry."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def generic_backbones(tmp_path_factory):
    from transformers import MBartConfig, MBartForConditionalGeneration, PegasusConfig, PegasusForConditionalGeneration

    root = tmp_path_factory.mktemp("generic")
    kw = dict(vocab_size=300, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
              decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128)
    torch.manual_seed(0)
    MBartForConditionalGeneration(MBartConfig(**kw, pad_token_id=1, eos_token_id=2, bos_token_id=0,
                                              decoder_start_token_id=2)).save_pretrained(root / "mbart")
    PegasusForConditionalGeneration(PegasusConfig(**kw, pad_token_id=0, eos_token_id=1,
                                                  decoder_start_token_id=0)).save_pretrained(root / "pegasus")
    return root


@pytest.mark.parametrize("arch", ["mbart", "pegasus"])
@pytest.mark.parametrize("method", ["vl-pet-large", "vl-pet-small", "lora", "vl-adapter", "prompt"])
def test_generic_architectures_train_and_generate(generic_backbones, arch, method):
    from vlpet.model import VLModel

    model = VLModel.build(str(generic_backbones / arch), method, feat_dim=16, load_tok=False)
    ids = torch.randint(5, 200, (2, 6))
    feats = torch.randn(2, 49, 16)
    out = model(ids, vis_feats=feats, labels=torch.randint(5, 200, (2, 3)))
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    model.eval()
    cached = model.generate(ids, vis_feats=feats, max_new_tokens=4, num_beams=2)
    uncached = model.generate(ids, vis_feats=feats, max_new_tokens=4, num_beams=2, use_cache=False)
    assert torch.equal(cached, uncached)
    if method.startswith("vl-pet"):
        model.record_gates(True)
        model(ids, vis_feats=feats, labels=torch.randint(5, 200, (2, 3)))
        assert len(model.gate_values()) == 2 * 2  # 2 encoder layers x (self-attention, FFN)


def test_visual_tokens_get_no_positions_on_pegasus(generic_backbones):
    """Text-only positions hold for a sinusoidal-position architecture too (the visual rows get zeros)."""
    from vlpet.model import VLModel

    model = VLModel.build(str(generic_backbones / "pegasus"), "vl-pet-large", feat_dim=16, load_tok=False).eval()
    seen = {}
    wrapper = model.backbone.model.encoder.embed_positions
    hook = wrapper.register_forward_hook(lambda m, a, out: seen.setdefault("pos", out.detach()))
    model(torch.randint(5, 200, (2, 6)), vis_feats=torch.randn(2, 49, 16), labels=torch.randint(5, 200, (2, 3)))
    hook.remove()
    pos = seen["pos"]
    assert pos.shape[-2] == 6 + 36
    assert torch.count_nonzero(pos[..., 6:, :]) == 0 and torch.count_nonzero(pos[..., :6, :]) > 0
