"""Paths of the VL-Adapter data layout (spec §7) under a configurable ``data_root``.

The official loaders hard-code ``<repo>/../datasets``; here the root is always passed in (or read
from the ``VLPET_DATA_ROOT`` environment variable by :func:`resolve_data_root`)::

    data_root/
      vqa/karpathy_{train,val,test}.json
      vqa/v2_mscoco_{train,val}2014_annotations.json
      vqa/trainval_{ans2label,label2ans}.json
      GQA/{train,valid,testdev}.json, GQA/trainval_{ans2label,label2ans}.json
      nlvr/{train,valid,test}.json
      COCO/dataset_coco.json
      COCO/clip_features/<feature_dirname>/{img_id}.h5   VQA + COCO captions
      VG/clip_features/<feature_dirname>/{img_id}.h5     GQA train / valid
      GQA/clip_features/<feature_dirname>/{img_id}.h5    GQA testdev
      nlvr/clip_features/<feature_dirname>/{img_id}.h5   NLVR2 (img0 / img1 ids)
      video/ann/..., video/vis_features/{tv,how2,yc2}/clip-vit/{vid_name}.npz

``feature_dirname`` defaults to ``data_clip_RN101_att`` (CLIP RN101 grid features, [49, 2048]);
other encoders (e.g. EfficientNet-Lite0, [49, 1280]) use the same tree with another folder name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import DataError

__all__ = ["VLAdapterLayout", "resolve_data_root", "DEFAULT_FEATURE_DIRNAME", "FEATURE_SOURCES"]

DEFAULT_FEATURE_DIRNAME = "data_clip_RN101_att"
#: feature source name -> top-level folder that holds ``clip_features/<feature_dirname>``
FEATURE_SOURCES = {"COCO": "COCO", "VG": "VG", "GQA": "GQA", "nlvr": "nlvr"}

_VQA_SPLITS = ("karpathy_train", "karpathy_val", "karpathy_test", "test_4")
_GQA_SPLITS = ("train", "valid", "testdev", "submit")
_NLVR_SPLITS = ("train", "valid", "test")


def resolve_data_root(data_root: str | os.PathLike | None = None) -> Path:
    """``data_root`` if given, else ``$VLPET_DATA_ROOT``; never a path relative to the repository."""
    if data_root is None:
        env = os.environ.get("VLPET_DATA_ROOT")
        if not env:
            raise DataError(
                "<data_root>", "a data root (pass data_root=... or set VLPET_DATA_ROOT)", got="neither"
            )
        data_root = env
    return Path(data_root)


def _pick(path_for: str, split: str, allowed: tuple[str, ...], root: Path) -> str:
    if split not in allowed:
        raise DataError(root / path_for, f"a split in {list(allowed)}", got=repr(split))
    return split


@dataclass(frozen=True)
class VLAdapterLayout:
    """File locations of the VL-Adapter layout. Raises :class:`DataError` if ``data_root`` is
    not an existing directory (unless ``must_exist=False``)."""

    data_root: Path
    feature_dirname: str = DEFAULT_FEATURE_DIRNAME
    feature_parent: str = "clip_features"
    must_exist: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_root", Path(self.data_root))
        if self.must_exist and not self.data_root.is_dir():
            got = "a file" if self.data_root.exists() else "no such directory"
            raise DataError(self.data_root, "an existing data root directory (VL-Adapter layout)", got=got)

    # ---- VQA -------------------------------------------------------------------------------
    @property
    def vqa_dir(self) -> Path:
        return self.data_root / "vqa"

    def vqa_split(self, split: str) -> Path:
        """``split`` in karpathy_train / karpathy_val / karpathy_test (or train / val / test)."""
        if split in ("train", "val", "test"):
            split = f"karpathy_{split}"
        _pick("vqa", split, _VQA_SPLITS, self.data_root)
        return self.vqa_dir / f"{split}.json"

    def vqa_annotations(self, which: str) -> Path:
        """Official VQA v2 annotations, ``which`` in train / val (the 2014 image split)."""
        which = which.replace("2014", "")
        _pick("vqa", which, ("train", "val"), self.data_root)
        return self.vqa_dir / f"v2_mscoco_{which}2014_annotations.json"

    @property
    def vqa_ans2label(self) -> Path:
        return self.vqa_dir / "trainval_ans2label.json"

    @property
    def vqa_label2ans(self) -> Path:
        return self.vqa_dir / "trainval_label2ans.json"

    # ---- GQA -------------------------------------------------------------------------------
    @property
    def gqa_dir(self) -> Path:
        return self.data_root / "GQA"

    def gqa_split(self, split: str) -> Path:
        _pick("GQA", split, _GQA_SPLITS, self.data_root)
        return self.gqa_dir / f"{split}.json"

    @property
    def gqa_ans2label(self) -> Path:
        return self.gqa_dir / "trainval_ans2label.json"

    @property
    def gqa_label2ans(self) -> Path:
        return self.gqa_dir / "trainval_label2ans.json"

    # ---- NLVR2 -----------------------------------------------------------------------------
    @property
    def nlvr_dir(self) -> Path:
        return self.data_root / "nlvr"

    def nlvr_split(self, split: str) -> Path:
        _pick("nlvr", split, _NLVR_SPLITS, self.data_root)
        return self.nlvr_dir / f"{split}.json"

    # ---- COCO captions ---------------------------------------------------------------------
    @property
    def coco_dir(self) -> Path:
        return self.data_root / "COCO"

    @property
    def coco_karpathy(self) -> Path:
        return self.coco_dir / "dataset_coco.json"

    # ---- image features --------------------------------------------------------------------
    def feature_dir(self, source: str) -> Path:
        """``source`` in COCO (VQA, captions), VG (GQA train/valid), GQA (GQA testdev), nlvr."""
        if source not in FEATURE_SOURCES:
            raise DataError(self.data_root, f"a feature source in {list(FEATURE_SOURCES)}", got=repr(source))
        return self.data_root / FEATURE_SOURCES[source] / self.feature_parent / self.feature_dirname

    def feature_source(self, task: str, split: str) -> str:
        """Which feature folder a task's split reads (spec §7.3)."""
        if task in ("vqa", "caption"):
            return "COCO"
        if task == "gqa":
            return "GQA" if split in ("testdev", "submit") else "VG"
        if task == "nlvr":
            return "nlvr"
        raise DataError(self.data_root, "a task in vqa / gqa / nlvr / caption", got=repr(task))

    def feature_path(self, source: str, img_id: str) -> Path:
        return self.feature_dir(source) / f"{img_id}.h5"

    # ---- video (spec §7.4) -----------------------------------------------------------------
    @property
    def video_dir(self) -> Path:
        return self.data_root / "video"

    @property
    def video_ann_dir(self) -> Path:
        return self.video_dir / "ann"

    def video_feature_path(self, source: str, vid_name: str) -> Path:
        """``source`` in tv, how2, yc2."""
        _pick("video/vis_features", source, ("tv", "how2", "yc2"), self.data_root)
        return self.video_dir / "vis_features" / source / "clip-vit" / f"{vid_name}.npz"
