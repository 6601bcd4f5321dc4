"""Decoder-only VLMs (issue 20): LLaVA, Idefics3 / SmolVLM, Qwen2-VL, Qwen2.5-VL, PaliGemma.

Tiny random models (LM width 32, 2 layers) are saved to a folder once per session and loaded back through
`VLModel.build(folder, preset)`, the public path. The configs below build and run with transformers 5.24.
"""

from __future__ import annotations

import pytest
import torch
import conftest
from conftest import trainer_run

from vlpet import decoder_only
from vlpet.errors import ConfigError, ShapeError
from vlpet.model import VLModel, get_vlpet_model

_LLAMA = {"vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 128,
          "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
_MROPE = {"rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}}
TINY = {
    "llava": {"vision_config": {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                                "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 32, "patch_size": 8,
                                "projection_dim": 32},
              "text_config": {"model_type": "llama", **_LLAMA}, "image_token_index": 100, "vision_feature_layer": -1,
              "vision_feature_select_strategy": "default", "projector_hidden_act": "gelu"},
    "idefics3": {"vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                   "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
                 "text_config": {"model_type": "llama", **_LLAMA}, "scale_factor": 2, "image_token_id": 100},
    "qwen2_vl": {"vision_config": {"depth": 1, "embed_dim": 32, "hidden_size": 32, "num_heads": 2, "mlp_ratio": 2,
                                   "patch_size": 4, "spatial_merge_size": 2, "temporal_patch_size": 2},
                 "text_config": {"model_type": "qwen2_vl_text", **_LLAMA, **_MROPE}, "image_token_id": 100,
                 "video_token_id": 101, "vision_start_token_id": 102, "vision_end_token_id": 103},
    "qwen2_5_vl": {"vision_config": {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                                     "out_hidden_size": 32, "patch_size": 4, "spatial_merge_size": 2,
                                     "temporal_patch_size": 2, "window_size": 16, "fullatt_block_indexes": [0]},
                   "text_config": {"model_type": "qwen2_5_vl_text", **_LLAMA, **_MROPE}, "image_token_id": 100,
                   "video_token_id": 101, "vision_start_token_id": 102, "vision_end_token_id": 103},
    # Gemma with grouped-query attention (1 KV head of 16): v_proj is narrower than the LM
    "paligemma": {"vision_config": {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                                    "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 32,
                                    "patch_size": 8, "projection_dim": 32},
                  "text_config": {"model_type": "gemma", **_LLAMA, "num_key_value_heads": 1, "head_dim": 16,
                                  "bos_token_id": 2, "eos_token_id": 1},
                  "image_token_index": 100, "projection_dim": 32, "hidden_size": 32},
}
FAMILIES = tuple(TINY)
IMAGE = 100
GRANULARITIES = ("small", "middlex", "middley", "large")
PRESETS = decoder_only.DECODER_PRESETS


def hf_class(family):
    import transformers

    from vlpet.backbones.loading import VLM_CLASSES

    return getattr(transformers, VLM_CLASSES[family])


def make_config(family, **text):
    from transformers import AutoConfig

    kw = {k: (dict(v, **text) if k == "text_config" else v) for k, v in TINY[family].items()}
    return AutoConfig.for_model(family, **kw)


@pytest.fixture(scope="session")
def folders(tmp_path_factory):
    """{family: folder} of tiny random VLMs saved with save_pretrained (seed 0)."""
    out = {}
    for family in FAMILIES:
        torch.manual_seed(0)
        model = hf_class(family)(make_config(family))
        out[family] = tmp_path_factory.mktemp(family)
        model.save_pretrained(out[family])
    return out


def batch(family, b=2, seed=1):
    """Left-padded prompts (row 0 padded by 2) with the family's image tokens, and its image inputs."""
    g = torch.Generator().manual_seed(seed)
    kw = {}
    if family == "idefics3":
        n, kw["pixel_values"] = 4, torch.randn(b, 1, 3, 32, 32, generator=g)
    elif family.startswith("qwen"):
        n = 16
        kw["pixel_values"] = torch.randn(b * 64, 96, generator=g)
        kw["image_grid_thw"] = torch.tensor([[1, 8, 8]] * b)
    else:
        n, kw["pixel_values"] = 16, torch.randn(b, 3, 32, 32, generator=g)
    image = torch.full((b, n), IMAGE)
    if family.startswith("qwen"):
        image = torch.cat([torch.full((b, 1), 102), image, torch.full((b, 1), 103)], 1)
    ids = torch.cat([torch.zeros(b, 2, dtype=torch.long), image, torch.randint(3, 90, (b, 5), generator=g)], 1)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    ids[1:, :2] = 7  # the other rows are not padded
    labels = torch.randint(3, 90, (b, 4), generator=g)
    labels[0, 3] = -100
    return ids, mask, labels, kw


def perturb(model, std=0.2, seed=3):
    """Random values in every trainable tensor, so that gates and adapters are not at their init."""
    conftest.perturb(model, scale=std, seed=seed)


GEN = {"do_sample": False, "num_beams": 1, "suppress_tokens": [IMAGE, 101, 102, 103], "eos_token_id": None}


# -- every preset on every family ----------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_every_preset_forward_backward_generate(folders, family):
    ids, mask, labels, kw = batch(family)
    for preset in PRESETS:
        model = VLModel.build(str(folders[family]), preset)
        out = model(input_ids=ids, attention_mask=mask, labels=labels, **kw)
        assert out.logits.shape == (2, 4, 128), preset
        assert torch.isfinite(out.loss), preset
        out.loss.backward()
        for name, p in model.named_parameters():
            # gradients only where they should be: every trainable tensor, no frozen one
            assert (p.grad is not None) == p.requires_grad, (preset, name)
        new = model.generate(ids, mask, max_new_tokens=3, **GEN, **kw)
        assert new.shape == (2, 3), preset


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_is_token_mean_cross_entropy_of_the_answer(folders, family):
    """The loss is the answer's token-mean cross-entropy, from logits of the plain model on [prompt ; answer]."""
    ids, mask, labels, kw = batch(family)
    model = VLModel.build(str(folders[family]), "vl-pet-large")
    perturb(model)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, **kw)
    ref = torch.nn.functional.cross_entropy(out.logits.reshape(-1, 128), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, ref)
    # the model's own loss (labels over the whole sequence) agrees
    assert out.loss.item() > 0


# -- causal: teacher forcing == KV-cached generation -------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("positions", decoder_only.VALUE_POSITIONS)
def test_teacher_forced_equals_cached_generation(folders, family, positions):
    """For every granularity: the logits of a teacher-forced forward on [prompt ; generated answer] equal the
    step logits of KV-cached greedy generation (so G_small's prefix mean and the prefix-only value adapter
    do not look at future tokens)."""
    ids, mask, _, kw = batch(family)
    for g in GRANULARITIES:
        method = decoder_only.decoder_preset(f"vl-pet-{g}", 32, value_positions=positions)
        model = VLModel(hf_class(family).from_pretrained(folders[family]), method, None, backbone_name="t",
                        native_inputs=True)
        perturb(model)
        gen = model.generate(ids, mask, max_new_tokens=4, output_logits=True, return_dict_in_generate=True,
                             **GEN, **kw)
        steps = torch.stack(gen.logits, 1)
        out = model(input_ids=ids, attention_mask=mask, labels=gen.sequences, **kw)
        torch.testing.assert_close(out.logits, steps, rtol=1e-5, atol=1e-5, msg=f"{family} G_{g} {positions}")


def test_causal_small_reads_only_the_prefix(folders):
    """G_small's value does not depend on the answer tokens (it would if the mean ran over the sequence)."""
    ids, mask, labels, kw = batch("llava")
    model = VLModel.build(str(folders["llava"]), "vl-pet-small")
    perturb(model)
    model.record_gates(True)
    model(input_ids=ids, attention_mask=mask, labels=labels, **kw)
    first = model.gate_values()
    model(input_ids=ids, attention_mask=mask, labels=(labels + 5).masked_fill(labels == -100, -100), **kw)
    second = model.gate_values()
    assert first and set(first) == set(second)
    for k in first:
        assert first[k].shape == (2, 1, 1)
        torch.testing.assert_close(first[k], second[k], rtol=0, atol=0)
    # beam search expands the batch before the prefix pass: the prefix mask follows it
    model.record_gates(False)
    beams = model.generate(ids, mask, max_new_tokens=3, **dict(GEN, num_beams=3), **kw)
    assert beams.shape == (2, 3)


def test_causal_small_ignores_padding(folders):
    """An example's G_small is the same left-padded in a batch as alone without padding (the prefix mean
    excludes padding; RoPE positions only shift)."""
    ids, mask, labels, kw = batch("llava")
    model = VLModel.build(str(folders["llava"]), "vl-pet-small")
    perturb(model)
    model.record_gates(True)
    model(input_ids=ids, attention_mask=mask, labels=labels, **kw)
    padded = {k: v[0] for k, v in model.gate_values().items()}
    model(input_ids=ids[:1, 2:], attention_mask=mask[:1, 2:], labels=labels[:1],
          pixel_values=kw["pixel_values"][:1])
    alone = {k: v[0] for k, v in model.gate_values().items()}
    for k in padded:
        torch.testing.assert_close(padded[k], alone[k], rtol=0, atol=1e-6)


def test_prefix_value_adapter_only_touches_prefix_positions():
    """The 'prefix' value adapter adds ΔV at the image + prompt positions and nothing after them."""
    from vlpet.methods.adapter import Bottleneck

    torch.manual_seed(0)
    base, delta = torch.nn.Linear(8, 8), Bottleneck(8, 4)
    wrap = decoder_only.PrefixParallelLinear(base, delta)
    state = decoder_only.PrefixState(prefix_len=3, mask=torch.ones(2, 3))
    wrap.bind(state)
    x = torch.randn(2, 5, 8)
    out = wrap(x)
    torch.testing.assert_close(out[:, :3], base(x[:, :3]) + delta(x[:, :3]))
    torch.testing.assert_close(out[:, 3:], base(x[:, 3:]), rtol=0, atol=0)
    state.read = True  # a cached generation step: an answer position
    torch.testing.assert_close(wrap(x[:, :1]), base(x[:, :1]), rtol=0, atol=0)


# -- the plain model where nothing should change -------------------------------------------------------

def plain_logits(family, folder, ids, mask, labels, kw):
    """The plain Hugging Face model's logits for the answer positions of [prompt ; answer[:-1]]."""
    hf = hf_class(family).from_pretrained(folder).eval()
    answer = labels[:, :-1].masked_fill(labels[:, :-1] == -100, 0)
    full = torch.cat([ids, answer], 1)
    fmask = torch.cat([mask, (labels[:, :-1] != -100).long()], 1)
    extra = dict(kw)
    if family == "paligemma":
        extra["token_type_ids"] = torch.cat([torch.zeros_like(ids), torch.ones_like(answer)], 1)
    if family == "qwen2_vl":
        extra["mm_token_type_ids"] = (full == IMAGE).long()
    with torch.no_grad():
        return hf(input_ids=full, attention_mask=fmask, **extra).logits[:, ids.shape[1] - 1:]


@pytest.mark.parametrize("family", FAMILIES)
def test_disabled_and_initial_equal_plain_model(folders, family):
    """With PET modules disabled (tuned norms and projector back at their base values) the logits equal the
    plain model's exactly; the gated presets start as the plain model too (ΔH = 0, s · G_init = 1)."""
    ids, mask, labels, kw = batch(family)
    ref = plain_logits(family, folders[family], ids, mask, labels, kw)
    for preset in ("vl-pet-small", "vl-pet-middley", "vl-pet-large", "lora", "bitfit", "vl-adapter"):
        model = VLModel.build(str(folders[family]), preset).eval()
        with torch.no_grad():
            if preset.startswith("vl-pet"):
                init = model(input_ids=ids, attention_mask=mask, labels=labels, **kw).logits
                torch.testing.assert_close(init, ref, rtol=0, atol=0, msg=f"{preset} at init")
            perturb(model)
            tuned = model(input_ids=ids, attention_mask=mask, labels=labels, **kw).logits
            assert (tuned - ref).abs().max() > 1e-3, preset
            with model.disable_adapters():
                off = model(input_ids=ids, attention_mask=mask, labels=labels, **kw).logits
        torch.testing.assert_close(off, ref, rtol=0, atol=0, msg=preset)


@pytest.mark.parametrize("preset", ("vl-pet-large", "lora", "full"))
def test_frozen_tensors_unchanged_by_a_step(folders, preset):
    ids, mask, labels, kw = batch("qwen2_vl")
    model = VLModel.build(str(folders["qwen2_vl"]), preset)
    perturb(model, std=0.05)  # zero-initialised up-projections would leave the down-projections without gradient
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(input_ids=ids, attention_mask=mask, labels=labels, **kw).loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, before[n]), n
        else:
            assert torch.equal(p, before[n]), n
    vision = [n for n in before if ".visual.blocks." in n or ".visual.patch_embed." in n]
    assert vision and not any(dict(model.named_parameters())[n].requires_grad for n in vision)


# -- trainable counts against counts written here --------------------------------------------------
# LLaVA tiny: LM width d = 32, 2 layers, r = d/8 = 4 (4 heads of 1), MHA v_proj 32 -> 32.
#   adapter 32->4->32: (32*4 + 4) + (4*32 + 32) = 292; G_large the same shape: 292; G_small Linear(64, 1): 65;
#   G_middleX Linear(32, 1): 33; G_middleY z: 32; value adapter: 292; projector 2 x Linear(32, 32): 2112;
#   LM RMSNorms 2 x 2 x 32 + final 32 = 160.
# PaliGemma tiny: v_proj 32 -> 16 (one KV head): value adapter (32*4 + 4) + (4*16 + 16) = 212; projector
#   Linear(32, 32) = 1056; norms 160.
_COMMON = {"llava": 2 * 292 + 2112 + 160, "paligemma": 2 * 212 + 1056 + 160}
_GATE = {"small": 65, "middlex": 33, "middley": 32, "large": 292}
EXPECTED = {
    fam: dict({f"vl-pet-{g}": 4 * (292 + n) + common for g, n in _GATE.items()},
              **{f"vl-adapter-g-{g}-lw": 4 * (292 + n) + common for g, n in _GATE.items()})
    for fam, common in _COMMON.items()
}
# LoRA r = d/6 = 5 on q, v: A 32*5 + B 5*out; + projector.  VL-Adapter: 4 adapters of 292 + all norms + projector.
EXPECTED["llava"].update({"lora": 2 * 2 * (32 * 5 + 5 * 32) + 2112, "vl-adapter": 4 * 292 + 160 + 2112,
                          # BitFit: zero biases on every LM Linear (q,k,v,o 32 each, gate/up 64, down 32) and norm
                          "bitfit": 2 * (4 * 32 + 64 + 64 + 32 + 2 * 32) + 32 + 2112})
EXPECTED["paligemma"].update({"lora": 2 * (32 * 5 + 5 * 32 + 32 * 5 + 5 * 16) + 1056})


@pytest.mark.parametrize("family", ("llava", "paligemma"))
def test_trainable_counts(folders, family):
    for preset, want in EXPECTED[family].items():
        model = VLModel.build(str(folders[family]), preset)
        assert model.parameter_counts()[0] == want, preset



def test_gqa_value_adapter_is_built_at_the_projection_width(folders):
    """PaliGemma's v_proj gives 1 KV head x 16 < the LM's 32 features: the value adapter is built 32 -> r -> 16
    (Bottleneck's d_out), not widened afterwards; a PHM adapter, which has no d_out, is refused there."""
    from vlpet.method import MethodConfig, ModuleSpec
    from vlpet.methods.adapter import Bottleneck

    model = VLModel.build(str(folders["paligemma"]), "vl-pet-large")
    deltas = [m.delta for m in model.modules() if isinstance(m, decoder_only.PrefixParallelLinear)]
    assert [(d.down.in_features, d.down.out_features, d.up.in_features, d.up.out_features) for d in deltas] \
        == [(32, 4, 4, 16)] * 2
    assert Bottleneck(32, 8, n_heads=4, d_out=16)(torch.randn(2, 3, 32)).shape == (2, 3, 16)
    assert Bottleneck(32, 8).up.out_features == 32
    phm = MethodConfig(name="phm-v", modules=(ModuleSpec(placements=("encoder.self_attn.v",), modification="phm_adapter",
                                                         mode="parallel", r=4),))
    with pytest.raises(ConfigError, match=r"^placement 'encoder.self_attn.v': a phm_adapter cannot output 16 features"):
        VLModel.build(str(folders["paligemma"]), phm)

def test_full_tunes_projector_and_lm_not_vision(folders):
    model = VLModel.build(str(folders["llava"]), "full")
    hf = hf_class("llava").from_pretrained(folders["llava"])
    vision = sum(p.numel() for p in hf.model.vision_tower.parameters())
    assert model.parameter_counts() == (sum(p.numel() for p in hf.parameters()) - vision,
                                        sum(p.numel() for p in hf.parameters()))


# -- files: adapter folders, wrapping a loaded model ---------------------------------------------------

@pytest.mark.parametrize("family", ("idefics3", "paligemma"))
def test_save_load_round_trip_and_wrap(folders, family, tmp_path):
    ids, mask, labels, kw = batch(family)
    model = VLModel.build(str(folders[family]), "vl-pet-small")
    perturb(model)
    want = model(input_ids=ids, attention_mask=mask, labels=labels, **kw).logits
    model.save_pretrained(tmp_path / "adapter")
    back = VLModel.from_pretrained(tmp_path / "adapter")
    torch.testing.assert_close(back(input_ids=ids, attention_mask=mask, labels=labels, **kw).logits, want,
                               rtol=0, atol=0)
    # PEFT style: the adapter onto a model the user already holds
    held = hf_class(family).from_pretrained(folders[family])
    onto = VLModel.from_pretrained(tmp_path / "adapter", base_model=held)
    torch.testing.assert_close(onto(input_ids=ids, attention_mask=mask, labels=labels, **kw).logits, want,
                               rtol=0, atol=0)
    wrapped = get_vlpet_model(hf_class(family).from_pretrained(folders[family]), "vl-pet-small")
    assert wrapped.parameter_counts() == model.parameter_counts()


# -- built-in random names at real size ----------------------------------------------------------------

def test_builtin_real_size_names_on_meta():
    from vlpet.backbones.loading import load_backbone

    counts = {}
    for name in ("smolvlm-2b", "llava-1.5-7b"):
        counts[name] = sum(p.numel() for p in load_backbone(name, meta=True).parameters())
    # SmolVLM-Instruct is published as 2.25B parameters, LLaVA-1.5-7B as 7.06B
    assert counts == {"smolvlm-2b": 2_246_784_880, "llava-1.5-7b": 7_063_427_072}
    model = VLModel.build("llava-1.5-7b", "vl-pet-large", meta=True, load_tok=False)
    assert model.method.modules[0].r == 4096 // 8 and model.d_model == 4096


# -- errors --------------------------------------------------------------------------------------------

def test_errors_name_what_is_wrong(folders):
    ids, mask, labels, kw = batch("llava")
    model = VLModel.build(str(folders["llava"]), "vl-pet-large")
    right = torch.ones_like(mask)
    right[0, -2:] = 0
    with pytest.raises(ShapeError, match="left-padded"):
        model(input_ids=ids, attention_mask=right, labels=labels, **kw)
    model.backbone.activation_checkpointing_enable()
    model.train()
    with pytest.raises(ConfigError, match="gradient checkpointing"):
        model(input_ids=ids, attention_mask=mask, labels=labels, **kw)
    with pytest.raises(ConfigError, match="not offered on decoder-only"):
        VLModel.build(str(folders["llava"]), "prompt")
    with pytest.raises(ConfigError, match="value_positions"):
        decoder_only.decoder_preset("vl-pet-large", 32, value_positions="answer")
    from vlpet.method import MethodConfig, ModuleSpec

    bad = MethodConfig(name="x", modules=(ModuleSpec(placements=("decoder.ffn",)),))
    with pytest.raises(ConfigError, match="one stack"):
        VLModel(hf_class("llava").from_pretrained(folders["llava"]), bad, None, backbone_name="t",
                native_inputs=True)
    gemma2 = hf_class("paligemma")
    with pytest.raises(ConfigError, match="text_config.model_type in gemma"):
        cfg = make_config("paligemma")
        cfg.text_config.model_type = "gemma2"
        from vlpet.backbones.arch import arch_for

        arch_for(cfg.model_type, cfg)
    assert gemma2 is not None


# -- training through transformers' Trainer; the gate's X ---------------------------------------------

@pytest.mark.parametrize("positions", decoder_only.VALUE_POSITIONS)
def test_trainer_trains_a_wrapped_llava(folders, tmp_path, positions):
    """get_vlpet_model + transformers Trainer (the issue-18 training path) on a tiny LLaVA: the loss falls
    over 8 steps on one batch and no frozen tensor moves (for both value-adapter positions)."""
    method = decoder_only.decoder_preset("vl-pet-large", 32, value_positions=positions)
    model = get_vlpet_model(hf_class("llava").from_pretrained(folders["llava"]), method)
    ids, mask, labels, kw = batch("llava", b=4)
    rows = [{"input_ids": ids[i], "attention_mask": mask[i], "pixel_values": kw["pixel_values"][i],
             "labels": labels[i]} for i in range(4)]

    losses, changed = trainer_run(model, rows, tmp_path / "run")
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.1
    assert not changed  # no frozen tensor moved


@pytest.mark.parametrize("family", FAMILIES)
def test_gate_reads_the_residual_stream_before_the_norm(folders, family):
    """Pre-LN: the gate's X is the input of the sub-layer's RMSNorm (self-attention: input_layernorm, MLP:
    post_attention_layernorm), not the normed tensor the sub-layer reads; every decoder-only entry."""
    from vlpet.placement import get_module

    ids, mask, labels, kw = batch(family)
    model = VLModel.build(str(folders[family]), "vl-pet-middlex")
    perturb(model)
    layer = get_module(model.backbone, model.arch.encoder_layers)[1]
    seen, norm_in = {}, {}
    for name in ("self_attn", "mlp"):
        gate = getattr(layer, name).pet.gate
        gate.register_forward_hook(lambda m, args, out, name=name: seen.__setitem__(name, args[0].detach()))
    for name, norm in (("self_attn", layer.input_layernorm), ("mlp", layer.post_attention_layernorm)):
        norm.base_layer.register_forward_hook(
            lambda m, args, out, name=name: norm_in.__setitem__(name, (args[0].detach(), out.detach())))
    model(input_ids=ids, attention_mask=mask, labels=labels, **kw)
    for name in ("self_attn", "mlp"):
        torch.testing.assert_close(seen[name], norm_in[name][0], rtol=0, atol=0)
        assert not torch.allclose(seen[name], norm_in[name][1])


def test_return_loss_false_keeps_the_answer_logits(folders):
    """The trainers' call (return_loss=False): same [B, T, V] answer logits as with the loss, and no loss."""
    ids, mask, labels, kw = batch("llava")
    model = VLModel.build(str(folders["llava"]), "vl-pet-small")
    perturb(model)
    ref = model(input_ids=ids, attention_mask=mask, labels=labels, **kw)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, return_loss=False, **kw)
    assert out.loss is None
    torch.testing.assert_close(out.logits, ref.logits)


def test_recompute_refuses_the_causal_small_gate(folders):
    """Its prefix mean reads the call's PrefixState, cleared before the backward: refused, not a crash there."""
    from vlpet.recompute import set_recompute

    model = VLModel.build(str(folders["llava"]), "vl-pet-small")
    with pytest.raises(ConfigError, match="causal G_small"):
        set_recompute(model, True)
    assert set_recompute(model, False) > 0  # switching off stays allowed


def test_recompute_prefix_value_adapter_equals_stored_and_recomputes(folders):
    """The prefix-only value adapter goes through run_pet: same logits and gradients, and its adapter runs
    again in the backward (it was counted as switched on but never recomputed)."""
    from vlpet.recompute import set_recompute

    ids, mask, labels, kw = batch("llava")
    model = VLModel.build(str(folders["llava"]), "vl-pet-large")
    perturb(model)
    prefix = [m for m in model.modules() if isinstance(m, decoder_only.PrefixParallelLinear)]
    assert prefix
    calls = []
    # on the down-projection: the recompute may stop early (torch.utils.checkpoint) once it has what it needs
    prefix[0].delta.down.register_forward_hook(lambda *a: calls.append(1))

    def step():
        model.zero_grad(set_to_none=True)
        calls.clear()
        out = model(input_ids=ids, attention_mask=mask, labels=labels, return_loss=False, **kw)
        out.logits.float().square().mean().backward()
        return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref, ref_grads = step()
    assert len(calls) == 1
    set_recompute(model, True)
    got, grads = step()
    assert len(calls) == 2  # forward + recompute in the backward
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("settings", ({"do_sample": True, "num_return_sequences": 2},
                                      {"num_beams": 2, "num_return_sequences": 2}))
def test_generate_several_sequences_per_prompt_with_causal_small(folders, settings):
    """generate expands each prompt's rows (sampling or beams) before the prefix pass: the prefix mask
    follows. Every returned row of a prompt starts from the same G_small as a forward of that prompt."""
    ids, mask, _, kw = batch("llava")
    model = VLModel.build(str(folders["llava"]), "vl-pet-small")
    perturb(model)
    gen = dict(GEN, **settings)
    torch.manual_seed(0)
    new = model.generate(ids, mask, max_new_tokens=3, **gen, **kw)
    assert new.shape == (4, 3)
    model.record_gates(True)
    model(input_ids=ids, attention_mask=mask, **kw)
    ref = model.gate_values()
    model.generate(ids, mask, max_new_tokens=1, **gen, **kw)  # G is frozen after the prefix pass
    for key, g in model.gate_values().items():
        torch.testing.assert_close(g, ref[key].repeat_interleave(2, dim=0), msg=key)


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(n, type(m)) for n, m in model.named_modules()], model.config.to_json_string())


def _assert_untouched(model, snap):
    state, types, config = snap
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)
    assert [(n, type(m)) for n, m in model.named_modules()] == types
    assert model.config.to_json_string() == config


def test_mismatched_adapter_or_method_leaves_the_given_model_untouched(folders, tmp_path):
    """Validation (architecture facts, method vs architecture) comes before anything is wrapped."""
    from vlpet.errors import CheckpointError
    from vlpet.method import MethodConfig, ModuleSpec

    VLModel.build(str(folders["llava"]), "vl-pet-large").save_pretrained(tmp_path / "adapter")
    torch.manual_seed(0)
    deeper = hf_class("llava")(make_config("llava", num_hidden_layers=3))  # the adapter has 2 layers
    snap = _snapshot(deeper)
    with pytest.raises(CheckpointError, match="encoder_layers=2"):
        VLModel.from_pretrained(tmp_path / "adapter", base_model=deeper)
    _assert_untouched(deeper, snap)
    held = hf_class("llava").from_pretrained(folders["llava"])
    snap = _snapshot(held)
    bad = MethodConfig(name="x", modules=(ModuleSpec(placements=("decoder.ffn",)),))
    with pytest.raises(ConfigError, match="one stack"):
        get_vlpet_model(held, bad)
    _assert_untouched(held, snap)


def test_decoder_only_config_gets_no_decoder_start_token(folders):
    model = VLModel.build(str(folders["llava"]), "vl-pet-large")
    assert getattr(model.backbone.config.text_config, "decoder_start_token_id", None) is None


def test_benchmark_tiny_smoke(tmp_path):
    """benchmarks/train_step.py --backbones <decoder-only> runs its own matrix on the CPU --tiny path, with the
    rows named in --methods (also in the --methods=... form) and the recompute rows named <preset>+rc."""
    import json

    from conftest import import_benchmark

    train_step = import_benchmark("train_step")

    rc = train_step.main(["--backbones", "smolvlm-2b", "--methods=floor,vl-pet-large+rc", "--device", "cpu",
                          "--tiny", "--steps", "1", "--warmup", "0", "--out", str(tmp_path),
                          "--results-dir", str(tmp_path)])
    assert rc == 0
    (path,) = tmp_path.glob("train_step-*.json")
    rows = json.loads(path.read_text())["results"]["smolvlm-2b"]["fp32"]
    assert set(rows) == {"floor", "vl-pet-large+rc"}
    assert 0 < rows["floor"]["trainable_percent"] < rows["vl-pet-large+rc"]["trainable_percent"]
    with pytest.raises(SystemExit):  # --recompute is for the VL-BART / VL-T5 matrix; here rows say +rc
        train_step.parse_args(["--backbones", "smolvlm-2b", "--recompute", "on"])
    # PEFT's row may be compiled (a compiled-against-compiled ratio), but it has no PET module to recompute
    assert train_step.parse_args(["--backbones", "smolvlm-2b", "--methods",
                                  "plain-peft-lora+compile"]).methods == ["plain-peft-lora+compile"]
    with pytest.raises(SystemExit):
        train_step.parse_args(["--backbones", "smolvlm-2b", "--methods", "plain-peft-lora+rc"])
