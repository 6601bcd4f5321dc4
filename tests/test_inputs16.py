"""Issue 16 point 4: bad inputs end in one line naming the file / option, with nothing written.

A features folder with one image of another width, `vlpet features` on a missing path, an empty folder
or two images with one stem (x.png + x.jpg), `import-official` on a file that is no checkpoint, and a
refused resume file (no advice to set weights_only=False)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_tiny_bart

from vlpet.cli import main


def _one_line_error(capsys, rc, *words):
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert "\n" not in err and "Traceback" not in err, err
    for w in words:
        assert w in err, err
    return err


def test_features_of_another_width_stop_before_training(tmp_path, capsys):
    from vlpet.data import build_dataset, make_image_text_fixture
    from vlpet.data.features import write_h5_features

    data = make_image_text_fixture(tmp_path / "data", n_per_split=2, feat_dim=16).root
    backbone, tok = make_tiny_bart(tmp_path / "bart", d_model=32)
    # The last image of the VQA train questions: the first-example probe alone would not see it.
    source, img_id = build_dataset("vqa", "train", data, tok, feat_dim=None).image_ids()[-1]
    odd = data / source / "clip_features" / "data_clip_RN101_att" / f"{img_id}.h5"
    assert odd.is_file()
    write_h5_features(odd, img_id, np.ones((49, 12), np.float32))
    out = tmp_path / "run"
    rc = main(["train", "--backbone", str(backbone), "--method", "vl-pet-small", "--data-root", str(data),
               "--tasks", "vqa", "--output", str(out), "--max-steps", "1", "--batch-size", "4", "--device", "cpu",
               "--no-progress"])
    _one_line_error(capsys, rc, str(odd), "[49, 12]", "feature dim 16")
    assert not out.exists()  # nothing half-written


def test_feature_width_is_checked_on_every_read(tmp_path):
    from vlpet.data import DataError
    from vlpet.data.features import FeatureDir, write_h5_features

    write_h5_features(tmp_path / "a.h5", "a", np.zeros((49, 16), np.float32))
    write_h5_features(tmp_path / "b.h5", "b", np.zeros((49, 12), np.float32))
    fd = FeatureDir(tmp_path)
    fd.check_shape("a", 16)
    with pytest.raises(DataError, match=r"b\.h5.*feature dim 16.*\[49, 12\]"):
        fd.check_shape("b", 16)



def test_startup_width_check_reads_one_header_per_file_size(tmp_path, monkeypatch):
    """The startup check stats every file and opens one HDF5 header per distinct size: six files of one width
    cost one header; a later file of another width (another size) is still named, with its shape."""
    from vlpet.data import DataError
    from vlpet.data.features import FeatureDir, write_h5_features

    ids = [f"img{k}" for k in range(6)]
    for i in ids:
        write_h5_features(tmp_path / f"{i}.h5", i, np.zeros((49, 16), np.float32))
    fd = FeatureDir(tmp_path)
    opened = []
    shape = FeatureDir.feature_shape
    monkeypatch.setattr(FeatureDir, "feature_shape", lambda self, i: opened.append(i) or shape(self, i))
    fd.check_widths(ids, 16)
    assert opened == ["img0"]
    write_h5_features(tmp_path / "img4.h5", "img4", np.ones((49, 12), np.float32))
    opened.clear()
    with pytest.raises(DataError, match=r"img4\.h5.*feature dim 16.*got shape \[49, 12\]"):
        fd.check_widths(ids, 16)
    assert opened == ["img0", "img4"]
    with pytest.raises(DataError, match=r"nope\.h5.*no such file"):
        fd.check_widths(["nope"] + ids, 16)

def test_features_missing_images(tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["features", "--images", str(tmp_path / "nope"), "--output", str(out), "--encoder",
               "efficientnet-lite0"])
    _one_line_error(capsys, rc, "--images", str(tmp_path / "nope"), "no such folder")
    assert not out.exists()


def test_features_empty_folder(tmp_path, capsys):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    rc = main(["features", "--images", str(tmp_path / "imgs"), "--output", str(out), "--encoder",
               "efficientnet-lite0"])
    _one_line_error(capsys, rc, "--images", "no image files", ".jpg")
    assert not out.exists()


def test_features_two_images_one_stem(tmp_path, capsys):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for name in ("x.png", "x.jpg", "y.jpg"):
        (imgs / name).write_bytes(b"")  # ids are checked before any image is read
    out = tmp_path / "out"
    rc = main(["features", "--images", str(imgs), "--output", str(out), "--encoder", "efficientnet-lite0"])
    _one_line_error(capsys, rc, "duplicate image id 'x'", "x.png", "x.jpg")
    assert not out.exists()


def test_features_errors_are_vlpet_errors():
    from vlpet.errors import ConfigError, VLPetError
    from vlpet.features import ImageIdError, ImageReadError, ImageSourceError, UnknownEncoderError

    for cls in (ImageIdError, ImageReadError, ImageSourceError, UnknownEncoderError):
        assert issubclass(cls, VLPetError)
    assert issubclass(ImageIdError, ValueError) and issubclass(ImageSourceError, FileNotFoundError)
    assert issubclass(UnknownEncoderError, ConfigError)


def test_import_official_on_a_text_file(tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("some notes\n")
    out = tmp_path / "adapter"
    rc = main(["import-official", str(notes), "--output", str(out), "--backbone", "bart-base"])
    _one_line_error(capsys, rc, str(notes), "unreadable as a torch checkpoint")
    assert not out.exists()


class _Opaque:
    pass


@pytest.mark.parametrize("content", ["garbage", "object"])
def test_refused_torch_file_never_suggests_weights_only_false(tmp_path, content):
    import torch

    from vlpet.checkpoint import torch_load_weights_only
    from vlpet.errors import CheckpointError

    path = tmp_path / "state.pt"
    if content == "garbage":
        path.write_bytes(bytes(range(256)) * 3)
    else:
        torch.save({"x": _Opaque()}, path)
    with pytest.raises(CheckpointError) as ei:
        torch_load_weights_only(path, hint="; replace it")
    msg = str(ei.value)
    assert "\n" not in msg and str(path) in msg and msg.endswith("; replace it")
    assert "weights_only" not in msg and "Re-running" not in msg and "arbitrary code" not in msg


@pytest.mark.parametrize("reader", ["json", "jsonl"])
def test_invalid_json_message_reads_once(tmp_path, reader):
    # json's own message can end in "at" ("Unterminated string starting at"): no "at at" after it.
    from vlpet.data import DataError
    from vlpet.data.records import load_json
    from vlpet.data.video import read_jsonl

    path = tmp_path / f"bad.{reader}"
    path.write_text('{"question": "what colo')
    with pytest.raises(DataError) as ei:
        (load_json if reader == "json" else read_jsonl)(path)
    msg = str(ei.value)
    assert "Unterminated string starting at: " in msg and "at at" not in msg and "column 14" in msg
