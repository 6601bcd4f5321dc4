"""Where the modules go (spec §2.1-§2.2, §4.6) and what wrapping leaves untouched.

VL-PET: a gated module after self-attention and after the FFN of every encoder layer (own parameters
each), a VPA on every decoder cross-attention value projection, nothing else in the decoder. The
backbone weights are those of the unmodified HF model; only the vocabulary grows by 200 rows.
"""

from __future__ import annotations

import re

import pytest
import torch

GRANULARITIES = ("small", "middlex", "middley", "large")


def _wrapped(model, cls_name):
    return sorted(n for n, m in model.backbone.named_modules() if type(m).__name__ == cls_name)


def _vl_pet_expected(arch):
    if arch == "bart":
        gated = [f"model.encoder.layers.{i}.{s}" for i in range(2) for s in ("fc2", "self_attn")]
        capture = [f"model.encoder.layers.{i}.fc1" for i in range(2)]  # the FFN gate's X is the fc1 input
        vpa = [f"model.decoder.layers.{i}.encoder_attn.v_proj" for i in range(2)]
    else:
        gated = [f"encoder.block.{i}.layer.{j}.{s}" for i in range(2) for j, s in ((0, "SelfAttention"),
                                                                               (1, "DenseReluDense"))]
        capture = [f"encoder.block.{i}.layer.{j}.layer_norm" for i in range(2) for j in (0, 1)]
        vpa = [f"decoder.block.{i}.layer.1.EncDecAttention.v" for i in range(2)]
    return sorted(gated), sorted(capture), sorted(vpa)


@pytest.mark.parametrize("kind", GRANULARITIES)
@pytest.mark.parametrize("arch", ["bart", "t5"])
def test_vl_pet_placement(build, arch, kind):
    model = build(arch, f"vl-pet-{kind}")
    gated, capture, vpa = _vl_pet_expected(arch)
    assert _wrapped(model, "GatedSublayer") == gated
    assert _wrapped(model, "CaptureInput") == capture
    assert _wrapped(model, "ParallelLinear") == vpa
    for name in gated:
        pet = model.backbone.get_submodule(name).pet
        assert pet.gate is not None and pet.gate.kind == kind and pet.delta is not None
    for name in vpa:  # the VPA: a plain bottleneck, no gate
        delta = model.backbone.get_submodule(name).delta
        assert tuple(delta.down.weight.shape) == (96, 32) and tuple(delta.up.weight.shape) == (32, 96)
    # no module of any kind in a decoder sub-layer other than the value projection
    decoder_new = [n for n, p in model.named_parameters() if p.requires_grad and ".decoder." in n]
    assert decoder_new and all(re.search(r"\.(v_proj|v)\.delta\.", n) for n in decoder_new)


@pytest.mark.parametrize("arch", ["bart", "t5"])
def test_no_parameter_sharing_across_layers_or_sublayers(build, arch):
    model = build(arch, "vl-pet-large")
    pet_params = [(n, p) for n, p in model.named_parameters() if ".pet." in n or ".delta." in n]
    assert len({p.data_ptr() for _, p in pet_params}) == len(pet_params)
    # 4 encoder sub-layers x (adapter down/up, gate down/up) x (weight, bias) + 2 VPAs x 4
    assert len(pet_params) == 4 * 8 + 2 * 4


@pytest.mark.parametrize("arch", ["bart", "t5"])
def test_baseline_placements(build, arch):
    n_sub = 2 * 2 + 2 * 3  # encoder: self-attn, FFN; decoder: self-attn, cross-attn, FFN
    m = build(arch, "vl-adapter")
    assert len(_wrapped(m, "GatedSublayer")) == n_sub and not _wrapped(m, "ParallelLinear")
    assert all(m.backbone.get_submodule(n).pet.gate is None for n in _wrapped(m, "GatedSublayer"))
    m = build(arch, "compacter")
    subs = _wrapped(m, "GatedSublayer")
    assert len(subs) == n_sub
    assert all(type(m.backbone.get_submodule(n).pet.delta).__name__ == "PHMBottleneck" for n in subs)
    m = build(arch, "hyperformer")
    assert len(_wrapped(m, "GatedSublayer")) == n_sub
    m = build(arch, "lora")
    lora = sorted({n.rsplit(".lora_A", 1)[0] for n, _ in m.backbone.named_parameters() if ".lora_A." in n})
    proj = ("q_proj", "v_proj") if arch == "bart" else ("q", "v")
    # q and v of encoder self-attention, decoder self-attention and decoder cross-attention, every layer
    assert len(lora) == 2 * 2 + 2 * 2 * 2
    assert all(n.rsplit(".", 1)[1] in proj for n in lora)
    m = build(arch, "prompt")
    assert not _wrapped(m, "GatedSublayer") and m.prompt is not None and m.prompt.length == 40


@pytest.mark.parametrize("arch", ["bart", "t5"])
def test_backbone_weights_are_the_unmodified_models(build, backbone_dirs, arch):
    from transformers import AutoModelForSeq2SeqLM

    model = build(arch, "vl-pet-large")
    orig = AutoModelForSeq2SeqLM.from_pretrained(backbone_dirs[arch])
    ours = {re.sub(r"\.base_layer\b", "", n): p for n, p in model.backbone.named_parameters()}
    theirs = dict(orig.named_parameters())
    assert set(theirs) <= set(ours)
    old_rows = orig.get_input_embeddings().num_embeddings
    for n, p in theirs.items():
        q = ours[n]
        if q.shape != p.shape:  # the resized vocabulary
            assert q.shape[0] == p.shape[0] + 200 and torch.equal(q[:old_rows], p), n
        else:
            assert torch.equal(q, p), n
    # 200 new rows (100 <extra_id>, 100 <vis_extra_id>): N(0, 0.02) for BART, N(0, 1) for T5 (spec §3.2)
    new_rows = model.backbone.get_input_embeddings().weight[old_rows:].detach()
    assert new_rows.shape[0] == 200
    want = 0.02 if arch == "bart" else 1.0
    assert abs(float(new_rows.std()) / want - 1) < 0.1
    assert model.original_vocab_rows == old_rows


def test_prefix_positions_only_on_a_decoder_only_projection():
    """positions='prefix' (vlpet.decoder_only's value adapter) on a sub-layer placement or an encoder-decoder is a
    one-line ConfigError, raised before the backbone is changed."""
    from transformers import BartConfig, BartForConditionalGeneration

    from vlpet.errors import ConfigError
    from vlpet.method import MethodConfig, ModuleSpec
    from vlpet.model import get_vlpet_model

    with pytest.raises(ConfigError, match="placement 'encoder.ffn' is a sub-layer"):
        ModuleSpec(placements=("encoder.ffn",), positions="prefix")
    spec = ModuleSpec(placements=("decoder.cross_attn.v",), mode="parallel", r=8, positions="prefix")
    torch.manual_seed(0)
    bart = BartForConditionalGeneration(BartConfig(vocab_size=100, d_model=32, encoder_layers=1, decoder_layers=1,
                                                   encoder_attention_heads=2, decoder_attention_heads=2,
                                                   encoder_ffn_dim=32, decoder_ffn_dim=32))
    types = [type(m) for m in bart.modules()]  # vocab 100: the LM head would be replaced (AlignedLMHead)
    with pytest.raises(ConfigError, match="positions 'prefix'.*decoder-only VLMs"):
        get_vlpet_model(bart, MethodConfig(name="x", modules=(spec,)))
    assert [type(m) for m in bart.modules()] == types
