"""User errors are one-line VLPetError subclasses that name the bad value and list what is allowed."""

from __future__ import annotations

import pytest
import torch
from conftest import FEAT_DIM, make_batch

from vlpet import ConfigError, MethodConfig, ModuleSpec, ShapeError, VLModel, VLPetError, get_preset
from vlpet.backbones.arch import arch_for
from vlpet.granularity import GateOptions


def _check(excinfo, *words, cls=VLPetError):
    err = excinfo.value
    msg = str(err)
    assert isinstance(err, cls), type(err)
    assert "\n" not in msg, msg
    for w in words:
        assert w in msg, (w, msg)
    return msg


def test_unknown_preset(backbone_dirs):
    with pytest.raises(ConfigError) as ei:
        VLModel.build(str(backbone_dirs["bart"]), "vl-pet-huge", load_tok=False)
    _check(ei, "'vl-pet-huge'", "vl-pet-small", "vl-pet-middlex", "vl-pet-middley", "vl-pet-large", "lora",
           "full", "compacter-g-large-lw")
    with pytest.raises(ConfigError) as ei:
        get_preset("adapterz", "t5")
    _check(ei, "'adapterz'", "vl-adapter", "hyperformer")


def test_unknown_backbone():
    with pytest.raises(ConfigError) as ei:
        VLModel.build("no-such-backbone-xyz", "vl-pet-small", meta=True)
    _check(ei, "'no-such-backbone-xyz'", "bart-base", "t5-base")
    with pytest.raises(ConfigError) as ei:
        VLModel.build("./no/such/folder", "vl-pet-small", meta=True)
    _check(ei, "'./no/such/folder'", "bart-base", "t5-base")


def test_unknown_architecture():
    with pytest.raises(ConfigError) as ei:
        arch_for("gpt2")
    _check(ei, "'gpt2'", "bart", "t5")


@pytest.mark.parametrize("make,words", [
    (lambda: GateOptions(kind="medium"), ["'medium'", "small", "middlex", "middley", "large"]),
    (lambda: ModuleSpec(placements=("encoder.ffn",), modification="lora-ish"),
     ["'lora-ish'", "adapter", "phm_adapter"]),
    (lambda: ModuleSpec(placements=("encoder.cross_attn",)), ["'encoder.cross_attn'", "encoder.self_attn",
                                                             "decoder.cross_attn.v"]),
    (lambda: ModuleSpec(placements=("encoder.ffn",), mode="sideways"), ["'sideways'", "sequential", "parallel"]),
    (lambda: ModuleSpec(placements=("encoder.ffn",), zero_init=("down",)), ["'down'", "up", "gate"]),
    (lambda: MethodConfig(name="x", trainable=("everything",)), ["'everything'", "visual_embedding",
                                                                 "encoder_layer_norms"]),
    (lambda: MethodConfig.from_dict({"name": "x", "modulez": []}), ["modulez", "modules", "trainable"]),
    (lambda: ModuleSpec(placements=("encoder.ffn",), r=10, n_heads=4), ["r=10", "n_heads=4"]),
    (lambda: ModuleSpec(placements=("decoder.ffn",), gate=GateOptions(kind="small")), ["'decoder.ffn'", "encoder"]),
])
def test_unknown_or_invalid_option(make, words):
    with pytest.raises(ConfigError) as ei:
        make()
    _check(ei, *words)


def test_wrong_feature_shape(build):
    model = build("bart", "vl-pet-small")
    batch = make_batch("bart")
    bad = dict(batch, vis_feats=torch.randn(2, 49, FEAT_DIM + 1))
    with pytest.raises(ShapeError) as ei:
        model(**bad, decoder_input_ids=torch.zeros(2, 1, dtype=torch.long))
    _check(ei, "(2, 49, 17)", str(FEAT_DIM))
    for shape in ((2, 49), (2, 1, 1, 49, FEAT_DIM)):
        with pytest.raises(ShapeError) as ei:
            model.generate(**dict(batch, vis_feats=torch.randn(*shape)), max_new_tokens=2)
        _check(ei, str(tuple(shape)), f"[B, V, {FEAT_DIM}]")
    with pytest.raises(ShapeError) as ei:  # NLVR2 takes two images at most
        model.encode(**dict(batch, vis_feats=torch.randn(2, 3, 49, FEAT_DIM)))
    _check(ei, "3 images", "2")
    with pytest.raises(ShapeError) as ei:  # batch size differs from the text's
        model.encode(**dict(batch, vis_feats=torch.randn(3, 49, FEAT_DIM)))
    _check(ei, "(3, 49, 16)", "batch size 2")
    with pytest.raises(ShapeError) as ei:
        model.encode(input_ids=torch.tensor([3, 4, 5]), vis_feats=batch["vis_feats"][:1])
    _check(ei, "(3,)", "[B, L]")


def test_hyperformer_unknown_task(build):
    model = build("t5", "hyperformer")
    with pytest.raises(ConfigError) as ei:
        model(**make_batch("t5"), decoder_input_ids=torch.zeros(2, 1, dtype=torch.long), task="retrieval")
    _check(ei, "'retrieval'", "vqa", "gqa", "nlvr", "caption")
    with pytest.raises(ConfigError) as ei:
        model(**make_batch("t5"), decoder_input_ids=torch.zeros(2, 1, dtype=torch.long))
    _check(ei, "task")


def test_errors_are_value_errors_too():
    """Callers that catch ValueError keep working."""
    assert issubclass(ConfigError, ValueError) and issubclass(ShapeError, ValueError)
