"""Initialisation (spec §1.4, §8.1.1): BART's N(0, 0.02) gives sigmoid gates ≈ 0.5; T5's zero-inits give
an encoder sub-layer output of exactly 0.15·H (small, middleX, large) or 0.3·H (middleY) and a VPA
that equals the frozen value projection. The non-identity start is reproduced, not "fixed"."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_batch, rel_err

GRANULARITIES = ("small", "middlex", "middley", "large")


@pytest.fixture(scope="module")
def originals(backbone_dirs):
    """Unwrapped copies of the tiny backbones (the same weights the VL models were built from)."""
    from transformers import AutoModelForSeq2SeqLM

    return {arch: AutoModelForSeq2SeqLM.from_pretrained(path).eval() for arch, path in backbone_dirs.items()}


@pytest.mark.parametrize("kind", GRANULARITIES)
def test_bart_gates_start_near_one_half(build, kind):
    model = build("bart", f"vl-pet-{kind}")
    model.record_gates(True)
    with torch.no_grad():
        model.encode(**make_batch("bart"))
    gates = model.gate_values()
    model.record_gates(False)
    assert len(gates) == 4
    for name, g in gates.items():
        if kind == "middley":  # G = 1 + z, z ~ N(0, 0.02): no sigmoid
            assert float((g - 1).abs().max()) < 0.1, name
        else:
            assert float((g - 0.5).abs().max()) < 0.1, name
            assert abs(float(g.mean()) - 0.5) < 0.05, name
            assert float((g - 0.5).abs().max()) > 0  # not zero-initialised: σ of a small random logit


@pytest.mark.parametrize("kind", GRANULARITIES)
def test_bart_new_linears_are_normal_002_with_zero_bias(build, kind):
    """BART's _init_weights hook: every new nn.Linear N(0, 0.02), zero bias (adapters, gates, VPA)."""
    model = build("bart", f"vl-pet-{kind}")
    seen = 0
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and (".pet." in name or ".delta." in name or
                                                 name.startswith("visual_embedding.")):
            w, b = mod.weight.detach(), mod.bias.detach()
            assert torch.equal(b, torch.zeros_like(b)), name
            if w.numel() >= 1000:
                std = float(w.std())
                assert 0.017 < std < 0.023, (name, std)
                assert abs(float(w.mean())) < 0.003, name
            seen += 1
    assert seen >= 4 * 2 + 2  # two adapter Linears per encoder sub-layer, two per VPA at least
    if kind == "middley":
        zs = [p.detach() for n, p in model.named_parameters() if n.endswith("gate.z")]
        assert len(zs) == 4
        z = torch.cat(zs)
        assert 0.01 < float(z.std()) < 0.03


@pytest.mark.parametrize("kind", GRANULARITIES)
def test_t5_zero_init_scales_the_frozen_sublayer_output(build, originals, kind):
    """H_new = 0.3 · 0.5 · H (small, middleX, large) or 0.3 · 1 · H (middleY), against the unwrapped
    sub-modules of the same backbone; the residual stream is X + H_new."""
    factor = 0.3 if kind == "middley" else 0.15
    model = build("t5", f"vl-pet-{kind}")
    orig = originals["t5"]
    gen = torch.Generator().manual_seed(0)
    for i, (block, oblock) in enumerate(zip(model.backbone.encoder.block, orig.encoder.block)):
        X = torch.randn(2, 11, 32, generator=gen) * 3
        store = {}
        hooks = [block.layer[0].SelfAttention.register_forward_hook(lambda m, a, o: store.__setitem__("a", o[0])),
                 block.layer[1].DenseReluDense.register_forward_hook(lambda m, a, o: store.__setitem__("f", o))]
        try:
            with torch.no_grad():
                out_attn = block.layer[0](X)[0]
                out_ffn = block.layer[1](X)
        finally:
            for h in hooks:
                h.remove()
        with torch.no_grad():
            H_attn = oblock.layer[0].SelfAttention(oblock.layer[0].layer_norm(X))[0]
            H_ffn = oblock.layer[1].DenseReluDense(oblock.layer[1].layer_norm(X))
        torch.testing.assert_close(store["a"], factor * H_attn, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(store["f"], factor * H_ffn, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(out_attn, X + factor * H_attn, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(out_ffn, X + factor * H_ffn, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", GRANULARITIES)
def test_t5_vpa_zero_init_equals_frozen_value_projection(build, originals, kind):
    model = build("t5", f"vl-pet-{kind}")
    E = torch.randn(2, 9, 32)
    for block, oblock in zip(model.backbone.decoder.block, originals["t5"].decoder.block):
        with torch.no_grad():
            assert torch.equal(block.layer[1].EncDecAttention.v(E), oblock.layer[1].EncDecAttention.v(E))
            # ... while its down-projection is live (only the up-projection is zeroed)
            delta = block.layer[1].EncDecAttention.v.delta
            assert delta.down.weight.abs().sum() > 0
            assert torch.equal(delta.up.weight, torch.zeros_like(delta.up.weight))


def test_bart_vpa_is_not_zero_initialised(build, originals):
    model = build("bart", "vl-pet-small")
    E = torch.randn(2, 9, 32)
    layer, olayer = model.backbone.model.decoder.layers[0], originals["bart"].model.decoder.layers[0]
    with torch.no_grad():
        assert not torch.equal(layer.encoder_attn.v_proj(E), olayer.encoder_attn.v_proj(E))


@pytest.mark.parametrize("kind", ["small", "large"])
def test_t5_new_linears_keep_pytorch_default_init(build, kind):
    """T5's _init_weights ignores plain nn.Linear: kaiming-uniform, |w| ≤ 1/sqrt(fan_in) (spec §1.4)."""
    model = build("t5", f"vl-pet-{kind}")
    pet = model.backbone.encoder.block[0].layer[0].SelfAttention.pet
    w = pet.delta.down.weight.detach()  # [r, D], r = 192 on the T5 preset
    bound = 1 / math.sqrt(w.shape[1])
    assert float(w.abs().max()) <= bound + 1e-7
    assert float(w.abs().max()) > 0.9 * bound  # uniform over the whole range, not N(0, 0.02)
    assert abs(float(w.std()) - bound / math.sqrt(3)) < 0.1 * bound
    if kind == "large":
        gd = pet.gate.down.weight.detach()
        assert float(gd.abs().max()) <= bound + 1e-7 and float(gd.abs().max()) > 0.9 * bound


def test_t5_model_output_is_not_identity_at_init(build, originals):
    """The encoder output of a fresh T5 VL-PET model differs from the frozen backbone's (×0.15 sub-layers)."""
    model = build("t5", "vl-pet-small")
    ids = make_batch("t5")["input_ids"]
    with torch.no_grad():
        a = model.backbone.get_encoder()(input_ids=ids).last_hidden_state
        b = originals["t5"].get_encoder()(input_ids=ids).last_hidden_state
    assert rel_err(a, b) > 1e-2
