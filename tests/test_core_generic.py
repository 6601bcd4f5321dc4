"""The generic path: other HF encoder-decoders (mBART, Pegasus) through their architecture-table entry."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, layer_norm, make_batch, rel_err
from test_core_gates import EXPECTED_G_SHAPE, GRANULARITIES, TOL, _first, gelu_erf, h_new, linear, tiny_method


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


# -- the generic pre-LN entries (mBART, Pegasus): G reads the residual stream, not the LayerNorm output --

@pytest.mark.parametrize("kind", GRANULARITIES)
@pytest.mark.parametrize("arch", ["mbart", "pegasus"])
def test_preln_gated_sublayers_match_hand_computation(build, generic_backbones, arch, kind):
    """Pre-LN layer (spec §1.5): X1 = X + H_new(LN1(X)), out = X1 + H_new(LN2(X1)); the attention gate reads X
    (the input of self_attn_layer_norm) and the FFN gate X1 (the input of final_layer_norm)."""
    method = tiny_method("bart", kind, "adapter")  # both entries use the BART preset family
    spec = method.modules[0]
    model = build(arch, method, perturbed=True, folder=generic_backbones / arch)
    assert model.arch.name == arch
    batch = make_batch("bart" if arch == "mbart" else "t5", pads=(0, 2))  # pad ids 1 / 0 as in the configs
    store, handles = {}, []
    for i, layer in enumerate(model.backbone.model.encoder.layers):
        handles += [
            layer.register_forward_pre_hook(lambda m, a, k, i=i: store.__setitem__(("X", i), _first(a, k)),
                                            with_kwargs=True),
            layer.self_attn.base_layer.register_forward_hook(lambda m, a, o, i=i: store.__setitem__(("H1", i), o[0])),
            layer.register_forward_hook(lambda m, a, o, i=i: store.__setitem__(("out", i), o[0] if isinstance(o, tuple) else o)),
        ]
    model.record_gates(True)
    try:
        with torch.no_grad():
            model(**batch, decoder_input_ids=torch.zeros(2, 1, dtype=torch.long))
    finally:
        for h in handles:
            h.remove()
        gates = model.gate_values()
        model.record_gates(False)
    kw = dict(n_heads=spec.n_heads, s=spec.scale)
    for i, layer in enumerate(model.backbone.model.encoder.layers):
        X = store[("X", i)]
        B, N, D = X.shape
        with torch.no_grad():
            Y1, G1 = h_new(layer.self_attn.pet, kind, X, store[("H1", i)], **kw)
            X1 = X + Y1
            ln2 = getattr(layer.final_layer_norm, "base_layer", layer.final_layer_norm)  # capture wrapper
            fc1, fc2 = layer.fc1, layer.fc2.base_layer
            H2 = linear(gelu_erf(linear(layer_norm(X1, ln2.weight, ln2.bias), fc1.weight, fc1.bias)),
                        fc2.weight, fc2.bias)
            Y2, G2 = h_new(layer.fc2.pet, kind, X1, H2, **kw)
            assert rel_err(store[("out", i)], X1 + Y2) < TOL, f"{arch} layer {i} output"
        shape = EXPECTED_G_SHAPE[kind](B, N, D)
        for name, G in ((f"encoder.{i}.self_attn", G1), (f"encoder.{i}.ffn", G2)):
            assert tuple(gates[name].shape) == shape, name
            assert rel_err(gates[name], G.expand(shape)) < TOL, (arch, name)


def test_every_architecture_entry_has_a_gate_input_test():
    """A new ArchSpec must come with its own hand-computed gate-input test (add it above, then here)."""
    from vlpet.backbones.arch import ARCHITECTURES

    # the VLM entries' gate-input tests: test_vlm.py::test_gate_reads_the_spec_input (encoder-decoder VLMs) and
    # test_decoder_only.py::test_gate_reads_the_residual_stream_before_the_norm (every decoder-only family)
    vlms = ("florence2", "blip2-t5", "instructblip-t5", "llava", "idefics3", "qwen2-vl", "qwen2.5-vl", "paligemma")
    assert sorted(a.name for a in ARCHITECTURES) == sorted((*ARCHS, "mbart", "pegasus", *vlms))
