"""Torch datasets for VQA, GQA, NLVR2 and COCO captions, and the collate function (spec §7.5).

``build_dataset(task, split, data_root, tokenizer)`` reads and validates the annotation file(s)
of a split and returns a map-style dataset. Items are tokenised and their features read lazily
in ``__getitem__`` (one HDF5 file per image), so DataLoader worker processes work.

Split semantics (``split`` is ``"train"``, ``"val"``, ``"test"`` or file-level names such as
``"karpathy_test"`` or ``"train,valid"``):

=========  ==========================  ==================  ==================
task       train                       val                 test
=========  ==========================  ==================  ==================
vqa        karpathy_train              karpathy_val        karpathy_test
gqa        train + valid               testdev             testdev
nlvr       train                       valid               test
caption    Karpathy train + restval    val                 test
=========  ==========================  ==================  ==================

``mode`` (default: ``"train"`` for ``split="train"``, otherwise ``"eval"``) controls the examples:

* VQA / GQA, train: the target answer is *sampled* from the soft-label dict with probability
  proportional to its score (spec §3.6); an empty label (sum 0) gives an empty target with score
  0. Eval: the highest-scored answer is the target (deterministic validation loss), and
  ``label_dicts`` / ``targets`` carry every answer for scoring.
* Caption, train: one example per (image, caption); eval: one example per image, the first
  reference as target and all references in ``targets``.

Randomness. The answer sampled for example ``i`` in epoch ``e`` is drawn from a
``random.Random`` seeded by ``(seed, task, e, i)``, so it does not depend on worker processes or
on which examples were drawn before; a resumed run draws the same answers. An explicit
``random.Random`` or ``torch.Generator`` can be passed to :meth:`ImageTextDataset.get_example`.
"""

from __future__ import annotations

import hashlib
import os
import random
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .errors import DataError
from .features import GRID_TOKENS, FeatureDir
from .layout import DEFAULT_FEATURE_DIRNAME, VLAdapterLayout, resolve_data_root
from .records import (
    CocoImage,
    GQARecord,
    NLVR2Record,
    VQARecord,
    read_coco_karpathy,
    read_gqa,
    read_nlvr2,
    read_vqa,
)
from .tasks import TaskSpec, canonical_task, get_task_spec

__all__ = [
    "ImageTextDataset",
    "QADataset",
    "NLVR2Dataset",
    "CaptionDataset",
    "build_dataset",
    "collate",
    "sample_answer",
    "best_answer",
    "example_seed",
    "BATCH_KEYS",
]

#: keys of every collated batch; task-specific extras: ``label_dicts`` (vqa, gqa),
#: ``labels`` and ``identifiers`` (nlvr), ``vis_attention_mask`` (video tasks: [B, 64], 1 = real frame)
BATCH_KEYS = (
    "task", "input_ids", "attention_mask", "vis_feats", "boxes", "target_ids", "question_ids",
    "scores", "targets", "target_texts", "img_ids", "sents",
)


def example_seed(seed: int, task: str, epoch: int, index: int) -> int:
    """A stable 64-bit seed for one example's randomness (independent of PYTHONHASHSEED)."""
    h = hashlib.blake2b(f"{seed}|{task}|{epoch}|{index}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little")


def sample_answer(label: Mapping[str, float], rng: random.Random | torch.Generator) -> tuple[str, float]:
    """Draw one answer with probability proportional to its soft score (spec §3.6).

    Returns ``(answer, score)``; ``("", 0.0)`` when the label is empty or sums to 0.
    """
    answers = list(label)
    weights = [float(label[a]) for a in answers]
    if not answers or sum(weights) <= 0:
        return "", 0.0
    if isinstance(rng, torch.Generator):
        k = int(torch.multinomial(torch.tensor(weights, dtype=torch.float64), 1, generator=rng))
    else:
        k = rng.choices(range(len(answers)), weights=weights, k=1)[0]
    return answers[k], weights[k]


def best_answer(label: Mapping[str, float]) -> tuple[str, float]:
    """The highest-scored answer (first one on ties); ``("", 0.0)`` for an empty label."""
    best, score = "", 0.0
    for a, s in label.items():
        if s > score:
            best, score = a, float(s)
    return best, score


def _encode(tokenizer, text: str, max_len: int | None) -> list[int]:
    kw = {"truncation": True, "max_length": max_len} if max_len else {}
    return [int(t) for t in tokenizer(text, **kw)["input_ids"]]


class ImageTextDataset(Dataset):
    """Base class. Subclasses fill ``self.items`` and implement ``_example``."""

    def __init__(
        self,
        spec: TaskSpec,
        items: list,
        tokenizer,
        feature_dirs: Mapping[str, FeatureDir],
        *,
        mode: str,
        seed: int = 0,
        split: str = "",
    ) -> None:
        if mode not in ("train", "eval"):
            raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
        self.spec = spec
        self.task = spec.name
        self.items = items
        self.tokenizer = tokenizer
        self.feature_dirs = dict(feature_dirs)
        self.mode = mode
        self.seed = int(seed)
        self.split = split
        self.epoch = 0
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            raise ValueError("the tokenizer has no pad token (pad_token_id is None)")
        self.pad_id = int(pad)

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        """Epoch used by ``__getitem__`` for the per-example randomness."""
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.get_example(index, epoch=self.epoch)

    def get_example(
        self,
        index: int,
        epoch: int | None = None,
        rng: random.Random | torch.Generator | None = None,
    ) -> dict[str, Any]:
        """Example ``index``; its random choices come from ``rng`` if given, else from a
        ``random.Random(example_seed(seed, task, epoch, index))``."""
        if not 0 <= index < len(self.items):
            raise IndexError(f"{self.task} dataset index {index} out of range [0, {len(self.items)})")
        if rng is None:
            e = self.epoch if epoch is None else int(epoch)
            rng = random.Random(example_seed(self.seed, self.task, e, index))
        return self._example(index, rng)

    def _example(self, index: int, rng) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def image_ids(self) -> list[tuple[str, str]]:
        """(feature source, img_id) of every image the dataset reads."""
        raise NotImplementedError

    def check_features(self) -> None:
        """Raise DataError for the first missing feature file (and say how many are missing)."""
        missing = [(s, i) for s, i in dict.fromkeys(self.image_ids()) if not self.feature_dirs[s].path(i).is_file()]
        if missing:
            s, i = missing[0]
            raise DataError(
                self.feature_dirs[s].path(i),
                f"a feature file for every image of {self.task} {self.split}",
                got=f"{len(missing)} missing, this one first",
            )

    def check_feature_dim(self, feat_dim: int) -> None:
        """Every image's feature width is `feat_dim`: read from the file headers now (a mixed folder would
        otherwise stop a run mid-way), and checked again on every later read."""
        for fd in self.feature_dirs.values():
            fd.expected_dim = feat_dim
        for s, i in dict.fromkeys(self.image_ids()):
            fd = self.feature_dirs[s]
            if hasattr(fd, "check_shape"):  # HDF5 headers; video .npz files are checked when read
                fd.check_shape(i, feat_dim)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(task={self.task!r}, split={self.split!r}, mode={self.mode!r}, n={len(self)})"


class QADataset(ImageTextDataset):
    """VQA and GQA. ``items``: list of (record, feature source)."""

    items: list[tuple[VQARecord | GQARecord, str]]

    def _example(self, index, rng):
        rec, source = self.items[index]
        if self.mode == "train":
            answer, score = sample_answer(rec.label, rng)
        else:
            answer, score = best_answer(rec.label)
        return {
            "task": self.task,
            "input_ids": _encode(self.tokenizer, self.spec.input_text(rec.sent), self.spec.max_text_len),
            "target_ids": _encode(self.tokenizer, answer, self.spec.max_target_len),
            "vis_feats": self.feature_dirs[source].load(rec.img_id),
            "question_id": rec.question_id,
            "score": score,
            "target_text": answer,
            "targets": sorted(rec.label, key=lambda a: -rec.label[a]),
            "label_dict": dict(rec.label),
            "img_id": rec.img_id,
            "sent": rec.sent,
        }

    def image_ids(self):
        return [(s, r.img_id) for r, s in self.items]


class NLVR2Dataset(ImageTextDataset):
    """NLVR2: two images per example, ``vis_feats`` [2, 49, F]; target "true"/"false"."""

    items: list[tuple[NLVR2Record, str]]

    def _example(self, index, rng):
        rec, source = self.items[index]
        fd = self.feature_dirs[source]
        text = self.spec.classes[rec.label]
        return {
            "task": self.task,
            "input_ids": _encode(self.tokenizer, self.spec.input_text(rec.sent), self.spec.max_text_len),
            "target_ids": _encode(self.tokenizer, text, self.spec.max_target_len),
            "vis_feats": np.stack([fd.load(rec.img0), fd.load(rec.img1)]),
            "question_id": rec.uid,
            "score": 1.0,
            "target_text": text,
            "targets": [text],
            "label": rec.label,
            "identifier": rec.identifier,
            "img_id": (rec.img0, rec.img1),
            "sent": rec.sent,
        }

    def image_ids(self):
        return [(s, i) for r, s in self.items for i in (r.img0, r.img1)]


class CaptionDataset(ImageTextDataset):
    """COCO captions. ``items``: (image, caption index) in train mode, (image, None) in eval."""

    items: list[tuple[CocoImage, int | None]]

    def _example(self, index, rng):
        img, k = self.items[index]
        target = img.refs[0 if k is None else k]
        return {
            "task": self.task,
            "input_ids": _encode(self.tokenizer, self.spec.input_text(), self.spec.max_text_len),
            "target_ids": _encode(self.tokenizer, target, self.spec.max_target_len),
            "vis_feats": self.feature_dirs["COCO"].load(img.img_id),
            "question_id": img.img_id,
            "score": 1.0,
            "target_text": target,
            "targets": list(img.refs),
            "img_id": img.img_id,
            "sent": "",
        }

    def image_ids(self):
        return [("COCO", img.img_id) for img, _ in self.items]


def build_dataset(
    task: str,
    split: str,
    data_root: str | os.PathLike | None,
    tokenizer,
    *,
    mode: str | None = None,
    feat_dim: int | None | str = "auto",
    feature_dirname: str = DEFAULT_FEATURE_DIRNAME,
    n_tokens: int | None = GRID_TOKENS,
    layout: VLAdapterLayout | None = None,
    spec: TaskSpec | None = None,
    use_prompts: bool = True,
    official_gqa_typo: bool = False,
    seed: int = 0,
    limit: int | None = None,
    check_features: bool = False,
    mask_padded_frames: bool = True,
) -> ImageTextDataset:
    """Build the dataset of one task and split (see the module docstring for split semantics).

    ``data_root`` may be None to use ``$VLPET_DATA_ROOT``; ``layout`` overrides both.

    ``feat_dim`` is checked on every feature read (None: accept any; "auto": 2048, or 512 for video);
    ``limit`` keeps the first ``limit`` examples; ``check_features`` stats every feature file up front.

    Video tasks (tvqa, how2qa, tvc, yc2c) are built by :func:`vlpet.data.video.build_video_dataset`
    (VALUE layout under ``data_root/video``); ``mask_padded_frames`` applies to them only.
    """
    task = canonical_task(task)
    from .tasks import VIDEO_TASKS

    if task in VIDEO_TASKS:
        from .video import VIDEO_FEAT_DIM, build_video_dataset

        return build_video_dataset(task, split, data_root, tokenizer, mode=mode,
                                   feat_dim=VIDEO_FEAT_DIM if feat_dim == "auto" else feat_dim, layout=layout,
                                   spec=spec, use_prompts=use_prompts, seed=seed, limit=limit,
                                   check_features=check_features, mask_padded_frames=mask_padded_frames)
    if feat_dim == "auto":
        feat_dim = 2048
    if layout is None:
        layout = VLAdapterLayout(resolve_data_root(data_root), feature_dirname=feature_dirname)
    if spec is None:
        spec = get_task_spec(task, use_prompts=use_prompts, official_gqa_typo=official_gqa_typo)
    elif spec.name != task:
        raise ValueError(f"spec is for task {spec.name!r}, not {task!r}")
    file_splits = spec.resolve_split(split)
    if mode is None:
        mode = "train" if split == "train" else "eval"

    def fdir(source: str) -> FeatureDir:
        return FeatureDir(layout.feature_dir(source), feat_dim, n_tokens)

    items: list
    if task == "vqa":
        items = [(r, "COCO") for fs in file_splits for r in read_vqa(layout.vqa_split(fs))]
        dirs, cls = {"COCO": fdir("COCO")}, QADataset
    elif task == "gqa":
        items = []
        for fs in file_splits:
            src = layout.feature_source("gqa", fs)
            items += [(r, src) for r in read_gqa(layout.gqa_split(fs))]
        dirs, cls = {s: fdir(s) for s in {s for _, s in items}}, QADataset
    elif task == "nlvr":
        items = [(r, "nlvr") for fs in file_splits for r in read_nlvr2(layout.nlvr_split(fs))]
        dirs, cls = {"nlvr": fdir("nlvr")}, NLVR2Dataset
    else:
        images = read_coco_karpathy(layout.coco_karpathy, file_splits)
        if mode == "train":
            items = [(img, k) for img in images for k in range(len(img.refs))]
        else:
            items = [(img, None) for img in images]
        dirs, cls = {"COCO": fdir("COCO")}, CaptionDataset
    if limit is not None:
        items = items[: int(limit)]
    ds = cls(spec, items, tokenizer, dirs, mode=mode, seed=seed, split=split)
    if check_features:
        ds.check_features()
    return ds


def _pad(seqs: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    n = max((len(s) for s in seqs), default=0)
    out = torch.full((len(seqs), n), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            out[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out


def collate(batch: Sequence[Mapping[str, Any]], pad_id: int) -> dict[str, Any]:
    """Stack examples of one task into the batch dict of spec §7.5.

    ``input_ids`` [B, L] padded with ``pad_id``, ``attention_mask`` [B, L], ``vis_feats``
    [B, 49, F] (NLVR2 [B, 2, 49, F]), ``boxes`` zeros [..., 4], ``target_ids`` [B, T] padded with
    -100, ``scores`` float [B], plus the lists ``question_ids``, ``targets``, ``target_texts``,
    ``img_ids``, ``sents`` and the task-specific ``label_dicts`` (vqa, gqa) or ``labels`` (long [B])
    and ``identifiers`` (nlvr). Video batches: ``vis_feats`` [B, 64, 512], ``vis_attention_mask``
    long [B, 64] and ``img_ids`` = the ``vid_name`` s.
    """
    if not batch:
        raise ValueError("collate() got an empty batch")
    task = batch[0]["task"]
    if any(x["task"] != task for x in batch):
        raise ValueError(f"a batch must hold one task, got {sorted({x['task'] for x in batch})}")
    input_ids = _pad([x["input_ids"] for x in batch], pad_id)
    lengths = torch.tensor([len(x["input_ids"]) for x in batch])
    attention_mask = (torch.arange(input_ids.shape[1])[None, :] < lengths[:, None]).long()
    shapes = {tuple(np.shape(x["vis_feats"])) for x in batch}
    if len(shapes) != 1:
        raise ValueError(f"{task} batch mixes visual feature shapes {sorted(shapes)}")
    vis = torch.from_numpy(np.stack([np.asarray(x["vis_feats"], dtype=np.float32) for x in batch]))
    out: dict[str, Any] = {
        "task": task,
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "vis_feats": vis,
        "boxes": torch.zeros(*vis.shape[:-1], 4),
        "target_ids": _pad([x["target_ids"] for x in batch], -100),
        "question_ids": [x["question_id"] for x in batch],
        "scores": torch.tensor([float(x["score"]) for x in batch], dtype=torch.float32),
        "targets": [list(x["targets"]) for x in batch],
        "target_texts": [x["target_text"] for x in batch],
        "img_ids": [x["img_id"] for x in batch],
        "sents": [x["sent"] for x in batch],
    }
    if "label_dict" in batch[0]:
        out["label_dicts"] = [x["label_dict"] for x in batch]
    if "label" in batch[0]:
        out["labels"] = torch.tensor([int(x["label"]) for x in batch], dtype=torch.long)
        out["identifiers"] = [x["identifier"] for x in batch]
    if "vis_mask" in batch[0]:  # video: 1 = real frame, 0 = zero padding (spec §3.9)
        out["vis_attention_mask"] = torch.from_numpy(np.stack([np.asarray(x["vis_mask"], dtype=np.int64)
                                                               for x in batch]))
    return out
