"""Tests of vlpet.official: importing / exporting official VL-PET checkpoints (spec §7.6).

Tiny random BART and T5 models are saved to a temporary folder and used as "pretrained" tiny_backbones.
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

from vlpet.errors import CheckpointError, ConfigError
from vlpet.model import VLModel
from vlpet.official import TASKS, detect_granularity, export_official, import_official, load_official
from vlpet.presets import GRANULARITIES, get_preset

D, R, RG, R_DEC, N_HEADS, FEAT = 16, 8, 8, 8, 4, 8
VOCAB = 64  # + 200 VL rows -> 264


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Every test here runs single-threaded (conftest.one_thread)."""


@pytest.fixture(scope="module")
def tiny_backbones(tmp_path_factory):
    from transformers import BartConfig, BartForConditionalGeneration, T5Config, T5ForConditionalGeneration

    root = tmp_path_factory.mktemp("official_backbones")
    torch.manual_seed(0)
    bart = BartConfig(vocab_size=VOCAB, d_model=D, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                      decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64)
    BartForConditionalGeneration(bart).save_pretrained(root / "bart")
    t5 = T5Config(vocab_size=VOCAB, d_model=D, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=2, num_heads=2,
                  decoder_start_token_id=0)
    T5ForConditionalGeneration(t5).save_pretrained(root / "t5")
    return {"bart": str(root / "bart"), "t5": str(root / "t5")}


def tiny_method(arch: str, granularity: str):
    m = get_preset(f"vl-pet-{granularity}", arch)
    enc, vpa = m.modules
    assert enc.n_heads == N_HEADS
    enc = dataclasses.replace(enc, r=R, gate=dataclasses.replace(enc.gate, r_g=RG))
    return dataclasses.replace(m, modules=(enc, dataclasses.replace(vpa, r=R_DEC)))


def make_model(tiny_backbones, arch, granularity, seed):
    return VLModel.build(tiny_backbones[arch], tiny_method(arch, granularity), feat_dim=FEAT, load_tok=False,
                         seed=seed)


@torch.no_grad()
def randomise(model, trainable_only: bool):
    g = torch.Generator().manual_seed(123)
    for p in model.parameters():
        if p.requires_grad or not trainable_only:
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    if not trainable_only:
        for b in model.buffers():
            b.add_(0.2 * torch.randn(b.shape, generator=g))


@torch.no_grad()
def logits(model):
    model.eval()
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, VOCAB + 200, (2, 5), generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    feats = torch.randn(2, 4, FEAT, generator=g)
    dec = torch.randint(3, VOCAB, (2, 3), generator=g)
    return model(ids, mask, vis_feats=feats, decoder_input_ids=dec).logits


def enc_layer(model, i=0):
    return model.backbone.get_encoder().layers[i] if model.arch.name == "bart" else model.backbone.encoder.block[i]


def attn_pet(model, i=0):
    layer = enc_layer(model, i)
    return layer.self_attn.pet if model.arch.name == "bart" else layer.layer[0].SelfAttention.pet


def ff_pet(model, i=0):
    layer = enc_layer(model, i)
    return layer.fc2.pet if model.arch.name == "bart" else layer.layer[1].DenseReluDense.pet


def vpa_delta(model, i=0):
    if model.arch.name == "bart":
        return model.backbone.model.decoder.layers[i].encoder_attn.v_proj.delta
    return model.backbone.decoder.block[i].layer[1].EncDecAttention.v.delta


def save(obj, path):
    torch.save(obj, path)
    return path


# -- round trips -------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["bart", "t5"])
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_round_trip_reproduces_logits(tiny_backbones, tmp_path, arch, granularity):
    a = make_model(tiny_backbones, arch, granularity, seed=1)
    randomise(a, trainable_only=False)  # frozen tensors too: every backbone mapping is exercised
    official = export_official(a)
    prefix = "model." if arch == "bart" else ""
    heads = [k for k in official if "attn_adapter_multihead_down." in k and k.endswith(".weight")]
    assert len(heads) == N_HEADS * 2  # 2 encoder layers
    assert f"{prefix}encoder.visual_embedding.obj_order_embedding.weight" in official
    assert ("final_logits_bias" in official) == (arch == "bart")
    path = save(official, tmp_path / "official.pth")

    b, report = import_official(path, tiny_backbones[arch], tiny_method(arch, granularity), seed=2)
    assert report.missing == [] and report.unexpected == [] and report.ok
    assert set(report.mapped) == set(official)
    assert logits(b).equal(logits(a))
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(sa[k].equal(sb[k]) for k in sa)
    # The randomised frozen weights differ from the backbone folder and are reported as such.
    assert any(n.endswith("base_layer.weight") for n in report.frozen_changed)
    trainable = set(b.trainable_state_dict())
    assert not trainable & set(report.frozen_changed)
    assert report["missing"] == report.missing  # dict-style access, as the CLI reads it
    # Exporting the imported model gives the same official state dict back.
    again = export_official(b)
    assert again.keys() == official.keys() and all(again[k].equal(official[k]) for k in official)


@pytest.mark.parametrize("arch,granularity", [("bart", "middlex"), ("t5", "small")])
def test_output_dir_is_an_adapter_folder_that_rebuilds_the_model(tiny_backbones, tmp_path, arch, granularity):
    a = make_model(tiny_backbones, arch, granularity, seed=1)
    randomise(a, trainable_only=True)  # an official run leaves the frozen backbone untouched
    path = save(export_official(a), tmp_path / "official.pth")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing frozen differs: no warning
        b, report = import_official(path, tiny_backbones[arch], tiny_method(arch, granularity),
                                    output_dir=tmp_path / "adapter", seed=2)
    assert report.frozen_changed == [] and report.output_dir == str(tmp_path / "adapter")
    c = VLModel.from_pretrained(tmp_path / "adapter")
    assert logits(c).equal(logits(a))


def test_output_dir_warns_when_frozen_weights_differ(tiny_backbones, tmp_path):
    a = make_model(tiny_backbones, "bart", "small", seed=1)
    randomise(a, trainable_only=False)
    path = save(export_official(a), tmp_path / "official.pth")
    with pytest.warns(UserWarning, match="frozen tensors differ"):
        _, report = import_official(path, tiny_backbones["bart"], tiny_method("bart", "small"),
                                    output_dir=tmp_path / "adapter")
    assert report.frozen_changed


def test_nested_and_ddp_prefixed_state_dicts_are_accepted(tiny_backbones, tmp_path):
    a = make_model(tiny_backbones, "t5", "large", seed=1)
    randomise(a, trainable_only=True)
    official = export_official(a)
    for i, wrapped in enumerate([{"epoch": 3, "state_dict": {f"module.{k}": v for k, v in official.items()}},
                                 {"model": official}]):
        path = save(wrapped, tmp_path / f"official{i}.pth")
        b, report = import_official(path, tiny_backbones["t5"], tiny_method("t5", "large"), seed=2)
        assert report.ok and logits(b).equal(logits(a))


# -- a hand-written official state dict (spec §7.6 names and shapes) ---------------------------------

def synthetic_layer(arch: str, granularity: str, g: torch.Generator) -> dict[str, torch.Tensor]:
    """The official tensors of encoder layer 0, decoder layer 0's VPA and the visual embedding."""
    def rnd(*shape):
        return torch.randn(*shape, generator=g)

    sd = {}
    for tag, prefix in (("attn", "model.encoder.layers.0." if arch == "bart" else "encoder.block.0.layer.0."),
                        ("ff", "model.encoder.layers.0." if arch == "bart" else "encoder.block.0.layer.1.")):
        for h in range(N_HEADS):
            sd[f"{prefix}{tag}_adapter_multihead_down.{h}.weight"] = rnd(R // N_HEADS, D)
            sd[f"{prefix}{tag}_adapter_multihead_down.{h}.bias"] = rnd(R // N_HEADS)
        sd[f"{prefix}{tag}_adapter_multihead_up.weight"] = rnd(D, R)
        sd[f"{prefix}{tag}_adapter_multihead_up.bias"] = rnd(D)
        gate = f"{prefix}encoder_{tag}_adapter_gating_"
        if granularity == "large":
            sd.update({f"{gate}large_x_down.weight": rnd(RG, D), f"{gate}large_x_down.bias": rnd(RG),
                       f"{gate}large_x_up.weight": rnd(D, RG), f"{gate}large_x_up.bias": rnd(D)})
        elif granularity == "middlex":
            sd.update({f"{gate}middle_xy_add.weight": rnd(1, D), f"{gate}middle_xy_add.bias": rnd(1)})
        elif granularity == "small":
            sd.update({f"{gate}small_xy_cat.weight": rnd(1, 2 * D), f"{gate}small_xy_cat.bias": rnd(1)})
        else:
            sd[f"{gate}middle_ia3_add"] = rnd(D)
    vpa = ("model.decoder.layers.0.encoder_attn" if arch == "bart" else "decoder.block.0.layer.1.EncDecAttention")
    shared = {"down_sampler.weight": rnd(R_DEC, D), "down_sampler.bias": rnd(R_DEC),
              "up_sampler.weight": rnd(D, R_DEC), "up_sampler.bias": rnd(D)}
    for task in TASKS:
        for leaf, t in shared.items():
            sd[f"{vpa}.attn_value_parallel_adapter.adapters.{task}.{leaf}"] = t.clone()
    ve = "model.encoder.visual_embedding." if arch == "bart" else "encoder.visual_embedding."
    sd.update({f"{ve}feat_embedding.0.weight": rnd(D, FEAT), f"{ve}feat_embedding.0.bias": rnd(D),
               f"{ve}feat_embedding.1.weight": rnd(D), f"{ve}absolute_vis_pos_embedding.0.weight": rnd(D, 5),
               f"{ve}absolute_vis_pos_embedding.0.bias": rnd(D), f"{ve}absolute_vis_pos_embedding.1.weight": rnd(D),
               f"{ve}img_order_embedding.weight": rnd(2, D)})
    if arch == "bart":  # T5's LayerNorms have a weight only
        sd[f"{ve}feat_embedding.1.bias"] = rnd(D)
        sd[f"{ve}absolute_vis_pos_embedding.1.bias"] = rnd(D)
    return sd


@pytest.mark.parametrize("arch,granularity", [("bart", "large"), ("bart", "middlex"), ("t5", "small"),
                                              ("t5", "middley")])
def test_synthetic_official_layer_maps_exactly(tiny_backbones, tmp_path, arch, granularity):
    sd = synthetic_layer(arch, granularity, torch.Generator().manual_seed(5))
    path = save(sd, tmp_path / "official.pth")
    model, report = import_official(path, tiny_backbones[arch], tiny_method(arch, granularity))
    assert report.unexpected == [] and set(report.mapped) == set(sd)
    assert report.missing  # layer 1, the backbone, ...: reported, not an error without strict
    assert any(".1." in n and "pet.delta.down.weight" in n for n in report.missing)

    p = "model.encoder.layers.0." if arch == "bart" else "encoder.block.0.layer.0."
    pf = "model.encoder.layers.0." if arch == "bart" else "encoder.block.0.layer.1."
    per = R // N_HEADS
    for pet, tag, prefix in ((attn_pet(model), "attn", p), (ff_pet(model), "ff", pf)):
        down = pet.delta.down
        for h in range(N_HEADS):  # head h fills rows [h*r/N_h, (h+1)*r/N_h) of the fused down-projection
            assert down.weight[h * per:(h + 1) * per].equal(sd[f"{prefix}{tag}_adapter_multihead_down.{h}.weight"])
            assert down.bias[h * per:(h + 1) * per].equal(sd[f"{prefix}{tag}_adapter_multihead_down.{h}.bias"])
        assert pet.delta.up.weight.equal(sd[f"{prefix}{tag}_adapter_multihead_up.weight"])
        gate = f"{prefix}encoder_{tag}_adapter_gating_"
        if granularity == "large":
            assert pet.gate.down.weight.equal(sd[f"{gate}large_x_down.weight"])
            assert pet.gate.up.bias.equal(sd[f"{gate}large_x_up.bias"])
        elif granularity == "middlex":
            assert pet.gate.proj.weight.equal(sd[f"{gate}middle_xy_add.weight"])
        elif granularity == "small":
            w, b = sd[f"{gate}small_xy_cat.weight"], sd[f"{gate}small_xy_cat.bias"]
            assert pet.gate.proj.weight.equal(w)
            # The official gate: mean_N σ(Linear(2D->1)([X ; Y])), X first.
            x, y = torch.randn(2, 3, D), torch.randn(2, 3, D)
            ref = torch.sigmoid(torch.cat([x, y], -1) @ w.T + b).mean(1, keepdim=True)
            assert torch.allclose(pet.gate(x, y), ref, atol=1e-6)
        else:
            assert pet.gate.z.equal(sd[f"{gate}middle_ia3_add"])
    vpa = "model.decoder.layers.0.encoder_attn" if arch == "bart" else "decoder.block.0.layer.1.EncDecAttention"
    delta = vpa_delta(model)
    assert delta.down.weight.equal(sd[f"{vpa}.attn_value_parallel_adapter.adapters.vqa.down_sampler.weight"])
    assert delta.up.bias.equal(sd[f"{vpa}.attn_value_parallel_adapter.adapters.caption.up_sampler.bias"])
    ve = "model.encoder.visual_embedding." if arch == "bart" else "encoder.visual_embedding."
    assert model.visual_embedding.feat_embedding[0].weight.equal(sd[f"{ve}feat_embedding.0.weight"])
    assert model.visual_embedding.img_order_embedding.weight.equal(sd[f"{ve}img_order_embedding.weight"])

    with pytest.raises(CheckpointError, match="missing"):
        import_official(path, tiny_backbones[arch], tiny_method(arch, granularity), strict=True)


def test_any_number_of_heads_is_stacked_in_order(tiny_backbones):
    """N_h only fixes the layout: 2 official heads of r/2 rows fill the same fused Linear(D, r)."""
    model = make_model(tiny_backbones, "bart", "large", seed=0)
    g = torch.Generator().manual_seed(3)
    sd = {f"model.encoder.layers.0.attn_adapter_multihead_down.{h}.weight": torch.randn(R // 2, D, generator=g)
          for h in (1, 0)}  # order of the keys does not matter, the head index does
    report = load_official(model, sd)
    w = attn_pet(model).delta.down.weight
    assert w[:R // 2].equal(sd["model.encoder.layers.0.attn_adapter_multihead_down.0.weight"])
    assert w[R // 2:].equal(sd["model.encoder.layers.0.attn_adapter_multihead_down.1.weight"])
    assert report.unexpected == []


# -- errors ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bart_export(tiny_backbones):
    a = make_model(tiny_backbones, "bart", "large", seed=1)
    randomise(a, trainable_only=True)
    return export_official(a)


@pytest.mark.parametrize("key", ["lm_head.weight", "model.encoder.visual_embedding.obj_order_embedding.weight",
                                 "model.decoder.embed_tokens.weight"])
def test_disagreeing_alias_copies_raise(tiny_backbones, bart_export, key):
    sd = dict(bart_export)
    sd[key] = sd[key].clone()
    sd[key][5, 3] += 1.0
    model = make_model(tiny_backbones, "bart", "large", seed=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        load_official(model, sd, source="ckpt")
    after = model.state_dict()
    assert all(before[k].equal(after[k]) for k in before)  # nothing was written


def test_disagreeing_vpa_task_copies_raise(tiny_backbones, bart_export, tmp_path):
    key = "model.decoder.layers.1.encoder_attn.attn_value_parallel_adapter.adapters.gqa.down_sampler.weight"
    sd = dict(bart_export)
    sd[key] = sd[key] + 0.5
    path = save(sd, tmp_path / "official.pth")
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        import_official(path, tiny_backbones["bart"], tiny_method("bart", "large"))


def test_shape_mismatch_names_key_and_shapes(tiny_backbones, bart_export, tmp_path):
    sd = dict(bart_export)
    sd["model.encoder.layers.0.fc1.weight"] = torch.zeros(33, D)
    model = make_model(tiny_backbones, "bart", "large", seed=2)
    with pytest.raises(CheckpointError, match=r"model\.encoder\.layers\.0\.fc1\.weight.*\(33, 16\).*\(32, 16\)"):
        load_official(model, sd)
    sd = dict(bart_export)
    del sd["model.encoder.layers.1.ff_adapter_multihead_down.2.weight"]
    with pytest.raises(CheckpointError, match=r"ff_adapter_multihead_down\.2\.weight"):
        load_official(model, sd)


def test_unexpected_and_missing_keys_are_reported_or_raised(tiny_backbones, bart_export, tmp_path):
    sd = dict(bart_export)
    sd["model.encoder.layers.0.attn_adapter.adapters.vqa.down_sampler.weight"] = torch.zeros(3)
    del sd["model.encoder.layers.1.encoder_ff_adapter_gating_large_x_up.bias"]
    path = save(sd, tmp_path / "official.pth")
    _, report = import_official(path, tiny_backbones["bart"], tiny_method("bart", "large"))
    assert report.unexpected == ["model.encoder.layers.0.attn_adapter.adapters.vqa.down_sampler.weight"]
    assert report.missing == ["backbone.model.encoder.layers.1.fc2.pet.gate.up.bias"]
    assert "unexpected" in report.summary()
    with pytest.raises(CheckpointError) as exc:
        import_official(path, tiny_backbones["bart"], tiny_method("bart", "large"), strict=True)
    assert "attn_adapter.adapters.vqa.down_sampler.weight" in str(exc.value)
    assert "layers.1.fc2.pet.gate.up.bias" in str(exc.value)


_SIDE_EFFECT = []


def _mark(value):
    _SIDE_EFFECT.append(value)
    return value


class _Evil:
    def __reduce__(self):
        return (_mark, ("unpickled",))


def test_arbitrary_pickles_are_refused_by_weights_only_loading(tiny_backbones, tmp_path):
    path = save({"model.shared.weight": torch.zeros(2), "x": _Evil()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="evil.pth"):
        import_official(path, tiny_backbones["bart"], "vl-pet-large")
    assert _SIDE_EFFECT == []  # the object was never constructed


@pytest.mark.parametrize("content,match", [([1, 2, 3], "not a state dict"), ({"a.weight": 1}, "'a.weight'"),
                                           (None, "not a state dict"), ("garbage", "unreadable as a torch checkpoint")])
def test_files_that_are_not_state_dicts_are_refused(tiny_backbones, tmp_path, content, match):
    path = tmp_path / "bad.pth"
    if content == "garbage":
        path.write_bytes(b"this is not a torch file")
    else:
        torch.save(content, path)
    with pytest.raises(CheckpointError, match=match) as exc:
        import_official(path, tiny_backbones["bart"], "vl-pet-large")
    assert "bad.pth" in str(exc.value)
    with pytest.raises(CheckpointError, match="no such"):
        import_official(tmp_path / "absent.pth", tiny_backbones["bart"], "vl-pet-large")


def test_export_refuses_tensors_without_an_official_name(tiny_backbones):
    model = VLModel.build(tiny_backbones["bart"], "prompt", feat_dim=FEAT, load_tok=False)
    with pytest.raises(ConfigError, match="prompt"):
        export_official(model)


def test_granularity_is_detected_from_the_gate_names_and_checked(tiny_backbones, tmp_path):
    a = VLModel.build(tiny_backbones["bart"], "vl-pet-middley", feat_dim=FEAT, load_tok=False, seed=1)
    randomise(a, trainable_only=True)
    official = export_official(a)
    assert detect_granularity(official) == "middley"
    path = save(official, tmp_path / "official.pth")
    b, report = import_official(path, tiny_backbones["bart"], None)  # the preset the gates reveal
    assert b.method.name == "vl-pet-middley" and report.ok and logits(b).equal(logits(a))
    with pytest.raises(CheckpointError, match="G_middley"):
        import_official(path, tiny_backbones["bart"], "vl-pet-large")
    assert detect_granularity({"model.encoder.layers.0.fc1.weight": torch.zeros(1)}) is None
