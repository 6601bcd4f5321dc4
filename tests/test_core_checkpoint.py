"""Adapter folders: save -> load gives the same model; a folder for another architecture or another
method is refused with a CheckpointError that names the mismatch."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_batch, perturb

from vlpet import CheckpointError, VLModel, VLPetError
from vlpet.checkpoint import CONFIG_NAME, WEIGHTS_NAME, load_tensors, load_trainable
from vlpet.presets import get_preset

ROUND_TRIP = [("bart", "vl-pet-large"), ("bart", "lora"), ("bart", "prompt"), ("bart", "hyperformer"),
              ("bart", "full"), ("bart", "compacter-g-small-lw"), ("t5", "vl-pet-middley"), ("t5", "vl-pet-large"),
              ("t5", "bitfit"), ("t5", "lora"), ("t5", "hyperformer"), ("t5", "full")]


def _logits(model, arch):
    batch = make_batch(arch, pads=(0, 2), seed=11)
    with torch.no_grad():
        return model(**batch, decoder_input_ids=torch.tensor([[0, 5, 6], [0, 7, 8]]), task="caption").logits


@pytest.mark.parametrize("arch,preset", ROUND_TRIP)
def test_save_load_round_trip(build, tmp_path, arch, preset):
    model = build(arch, preset, seed=3)
    perturb(model, scale=0.1, seed=7)  # the loaded model must get these values from the folder, not from its init
    before = _logits(model, arch)
    folder = model.save_pretrained(tmp_path / "adapter")
    assert (folder / CONFIG_NAME).is_file() and (folder / WEIGHTS_NAME).is_file()
    saved = load_tensors(folder / WEIGHTS_NAME)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable <= set(saved)
    assert set(saved) - trainable <= {"__vlpet__.added_vocab_rows"}  # adapter-only: nothing frozen besides
    loaded = VLModel.from_pretrained(folder).eval()
    assert loaded.method == model.method
    assert torch.equal(_logits(loaded, arch), before)
    # the whole state agrees, frozen tensors included (same base + same added vocabulary rows)
    sd_a, sd_b = model.state_dict(), loaded.state_dict()
    assert sd_a.keys() == sd_b.keys()
    for k in sd_a:
        assert torch.equal(sd_a[k], sd_b[k]), k


def test_added_vocab_rows_travel_with_the_adapter(build, tmp_path):
    """The object-order rows are frozen but random (spec §3.2): a different build seed draws other rows,
    and the folder restores the saved ones."""
    model = build("bart", "vl-pet-small", seed=1)
    folder = model.save_pretrained(tmp_path / "a")
    other = build("bart", "vl-pet-small", seed=2)
    rows = slice(model.original_vocab_rows, None)
    emb = model.backbone.get_input_embeddings().weight
    assert not torch.equal(other.backbone.get_input_embeddings().weight[rows], emb[rows])
    load_trainable(other, load_tensors(folder / WEIGHTS_NAME), source="test")
    assert torch.equal(other.backbone.get_input_embeddings().weight[rows], emb[rows])


def _expect_checkpoint_error(excinfo, *words):
    msg = str(excinfo.value)
    assert isinstance(excinfo.value, VLPetError)
    assert "\n" not in msg
    for w in words:
        assert w in msg, (w, msg)


def test_refuses_another_model_type(build, backbone_dirs, tmp_path):
    folder = build("bart", "vl-pet-small").save_pretrained(tmp_path / "bart_adapter")
    with pytest.raises(CheckpointError) as ei:
        VLModel.from_pretrained(folder, backbone=str(backbone_dirs["t5"]))
    _expect_checkpoint_error(ei, "model_type", "'bart'", "'t5'")


@pytest.mark.parametrize("change,key", [({"d_model": 48}, "d_model"), ({"layers": 3}, "encoder_layers"),
                                        ({"decoder_layers": 3}, "decoder_layers")])
def test_refuses_another_shape(build, backbone_factory, tmp_path, change, key):
    folder = build("bart", "vl-pet-large").save_pretrained(tmp_path / "adapter")
    other = backbone_factory("bart", **change)
    with pytest.raises(CheckpointError) as ei:
        VLModel.from_pretrained(folder, backbone=str(other))
    _expect_checkpoint_error(ei, key)


def test_refuses_another_method(build, tmp_path):
    model = build("bart", "vl-pet-large")
    folder = model.save_pretrained(tmp_path / "large")
    tensors = load_tensors(folder / WEIGHTS_NAME)
    for preset in ("vl-pet-small", "lora", "vl-adapter"):
        other = build("bart", preset)
        with pytest.raises(CheckpointError) as ei:
            load_trainable(other, tensors, source=str(folder))
        _expect_checkpoint_error(ei, preset, "missing", "unexpected")
    # the same through from_pretrained: a folder whose config names another method than its tensors
    cfg = json.loads((folder / CONFIG_NAME).read_text())
    cfg["method"] = get_preset("vl-pet-middlex", "bart").to_dict()
    (folder / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as ei:
        VLModel.from_pretrained(folder)
    _expect_checkpoint_error(ei, "vl-pet-middlex")


def test_refuses_same_method_with_other_sizes(build, tmp_path):
    """Same tensor names, other shapes (r = 96 vs r = 16): named in the error."""
    from conftest import shrink

    folder = build("bart", "vl-pet-small").save_pretrained(tmp_path / "r96")
    small_r = build("bart", shrink(get_preset("vl-pet-small", "bart"), r=16))
    with pytest.raises(CheckpointError) as ei:
        load_trainable(small_r, load_tensors(folder / WEIGHTS_NAME), source="r96")
    _expect_checkpoint_error(ei, "shape")


def test_not_an_adapter_folder(tmp_path):
    with pytest.raises(CheckpointError) as ei:
        VLModel.from_pretrained(tmp_path)
    _expect_checkpoint_error(ei, CONFIG_NAME)
