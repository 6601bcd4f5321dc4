"""A tiny, exact VL-Adapter data tree for tests and smoke runs.

``make_image_text_fixture(root)`` writes every file the image-text loaders read (spec §7.2-§7.3),
with the official field names and file names, and an HDF5 feature file for every image referenced.

The content is learnable: each image has a hidden *concept* (a colour for COCO / NLVR2 images, a
shape for GQA images) and its [49, F] features carry a strong pattern in the concept's block of
feature channels. VQA questions ask for the colour (or whether it is a given colour), GQA questions
for the shape, captions name the colour, and NLVR2 statements are true or false depending on the
two images' colours. A tiny model can therefore lower its loss on every task.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .features import GRID_TOKENS, write_h5_features
from .layout import DEFAULT_FEATURE_DIRNAME, VLAdapterLayout

__all__ = ["make_image_text_fixture", "ImageTextFixture", "concept_features", "COLORS", "SHAPES", "vqa_soft_score"]

COLORS = ("red", "blue", "green", "yellow")
SHAPES = ("circle", "square", "triangle", "star")

_CAPTIONS = (
    "a {c} object on a plain background.",
    "a photo of something {c}.",
    "there is a {c} thing in the picture.",
    "a simple {c} shape.",
    "an image showing a {c} object.",
)


@dataclass
class ImageTextFixture:
    root: Path
    layout: VLAdapterLayout
    feat_dim: int
    n_per_split: int
    seed: int
    #: (feature source, img_id) -> concept word of that image
    concepts: dict[tuple[str, str], str] = field(default_factory=dict)
    #: file split -> number of records, per task ("vqa", "gqa", "nlvr", "caption")
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    #: False: annotation files only (the raw-image fixture writes PNG files instead of features)
    write_features: bool = True


def vqa_soft_score(n_matches: int) -> float:
    """The VQA soft score of an answer given by ``n_matches`` of 10 annotators (0.3 per match,
    capped at 1.0 from 4 matches), as used for the Karpathy-split labels."""
    return {0: 0.0, 1: 0.3, 2: 0.6, 3: 0.9}.get(n_matches, 1.0)


def concept_features(concept: int, n_concepts: int, feat_dim: int, rng: np.random.Generator,
                     n_tokens: int = GRID_TOKENS) -> np.ndarray:
    """[n_tokens, feat_dim] non-negative features: small noise everywhere plus a strong
    activation on the channel block of ``concept`` (channels ``concept::n_concepts``)."""
    x = rng.random((n_tokens, feat_dim), dtype=np.float32) * 0.1
    x[:, concept::n_concepts] += 1.0 + 0.2 * rng.random((n_tokens, len(range(concept, feat_dim, n_concepts))),
                                                        dtype=np.float32)
    return x


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh)
    os.replace(tmp, path)


def _balanced(rng: np.random.Generator, n: int, k: int) -> list[int]:
    vals = [i % k for i in range(n)]
    rng.shuffle(vals)
    return [int(v) for v in vals]


def make_image_text_fixture(
    root: str | os.PathLike,
    n_per_split: int = 6,
    feat_dim: int = 2048,
    seed: int = 0,
    *,
    feature_dirname: str = DEFAULT_FEATURE_DIRNAME,
    include_empty_label: bool = True,
    write_features: bool = True,
) -> ImageTextFixture:
    """Write a tiny VL-Adapter layout under ``root`` (created if needed) and return its summary.

    Per split, ``n_per_split`` VQA questions (karpathy_train/val/test), GQA questions
    (train/valid/testdev), NLVR2 statements (train/valid/test; identifiers pair up into
    consistency groups of 2) and COCO images (train/restval/val/test, 5 references each).
    ``write_features=False`` writes the annotation files only (the same ones, for the same seed).
    With ``include_empty_label`` the first karpathy_train question has only out-of-vocabulary
    answers, hence an empty soft label (exercises the empty-target / zero-weight path).
    """
    if n_per_split < 1:
        raise ValueError("n_per_split must be >= 1")
    if feat_dim < len(COLORS):
        raise ValueError(f"feat_dim must be >= {len(COLORS)}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    fx = ImageTextFixture(root, VLAdapterLayout(root, feature_dirname=feature_dirname), feat_dim, n_per_split, seed,
                          write_features=write_features)
    # One generator through the tasks in this order: the files stay those of the single-function version.
    rng = np.random.default_rng(seed)
    coco_images = _write_coco(fx, rng)
    _write_vqa(fx, rng, coco_images, include_empty_label)
    _write_gqa(fx, rng)
    _write_nlvr(fx, rng)
    return fx


def _image(fx: ImageTextFixture, rng: np.random.Generator, source: str, img_id: str, concept: int, words) -> None:
    """The feature file of one image, whose hidden concept is ``words[concept]``."""
    feats = concept_features(concept, len(words), fx.feat_dim, rng)  # drawn either way: same annotations
    if fx.write_features:
        write_h5_features(fx.layout.feature_path(source, img_id), img_id, feats)
    fx.concepts[(source, img_id)] = words[concept]


def _write_coco(fx: ImageTextFixture, rng: np.random.Generator) -> dict[str, list[tuple[str, int, int]]]:
    """COCO images + Karpathy captions; returns split -> [(img_id, cocoid, concept)] (VQA asks about them)."""
    layout, n_per_split = fx.layout, fx.n_per_split
    coco_images: dict[str, list[tuple[str, int, int]]] = {}  # split -> [(img_id, cocoid, concept)]
    images_json = []
    cocoid, sentid = 100000, 0
    for split in ("train", "restval", "val", "test"):
        folder = "train2014" if split == "train" else "val2014"
        concepts = _balanced(rng, n_per_split, len(COLORS))
        coco_images[split] = []
        for c in concepts:
            cocoid += 7
            img_id = f"COCO_{folder}_{cocoid:012d}"
            _image(fx, rng, "COCO", img_id, c, COLORS)
            coco_images[split].append((img_id, cocoid, c))
            sents = []
            for t in _CAPTIONS:
                raw = t.format(c=COLORS[c])
                sents.append({"tokens": raw.rstrip(".").split(), "raw": raw, "imgid": len(images_json),
                              "sentid": sentid})
                sentid += 1
            images_json.append({
                "filepath": folder, "sentids": [s["sentid"] for s in sents], "filename": f"{img_id}.jpg",
                "imgid": len(images_json), "split": split, "sentences": sents, "cocoid": cocoid,
            })
    _write_json(layout.coco_karpathy, {"images": images_json, "dataset": "coco"})
    fx.counts["caption"] = {s: len(v) for s, v in coco_images.items()}
    return coco_images


def _write_vqa(fx: ImageTextFixture, rng: np.random.Generator, coco_images, include_empty_label: bool) -> None:
    """VQA Karpathy splits on the COCO images, the official annotation files and the answer vocabulary."""
    layout, n_per_split = fx.layout, fx.n_per_split
    vqa_answers = list(COLORS) + ["yes", "no"]
    anns = {"train": [], "val": []}
    qid = 1000
    vqa_pools = {
        "karpathy_train": coco_images["train"] + coco_images["restval"],
        "karpathy_val": coco_images["val"],
        "karpathy_test": coco_images["test"],
    }
    fx.counts["vqa"] = {}
    for split, pool in vqa_pools.items():
        records = []
        for i in range(n_per_split):
            img_id, cid, c = pool[i % len(pool)]
            qid += 1
            color = COLORS[c]
            if i % 3 == 2:  # yes/no question
                asked = COLORS[int(rng.integers(len(COLORS)))]
                sent = f"is the object {asked}?"
                main = "yes" if asked == color else "no"
                other = "no" if main == "yes" else "yes"
                qtype, atype = "is the", "yes/no"
            else:
                sent = ("what color is the object?", "what is the color of the shape?")[i % 2]
                main = color
                other = COLORS[(c + 1 + int(rng.integers(len(COLORS) - 1))) % len(COLORS)]
                qtype, atype = "what color is the", "other"
            n_main = int(rng.choice([10, 9, 8]))
            answers = [main] * n_main + [other] * (10 - n_main)
            if include_empty_label and split == "karpathy_train" and i == 0:
                answers = ["purple-ish"] * 10  # not in the answer vocabulary
            counts: dict[str, int] = {}
            for a in answers:
                counts[a] = counts.get(a, 0) + 1
            label = {a: vqa_soft_score(k) for a, k in counts.items() if a in vqa_answers}
            records.append({
                "answer_type": atype, "img_id": img_id, "label": label, "question_id": qid,
                "question_type": qtype, "sent": sent, "is_topk_optimal": True,
            })
            which = "train" if "_train2014_" in img_id else "val"
            anns[which].append({
                "question_type": qtype, "multiple_choice_answer": max(counts, key=counts.get),
                "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1}
                            for k, a in enumerate(answers)],
                "image_id": cid, "answer_type": atype, "question_id": qid,
            })
        _write_json(layout.vqa_split(split), records)
        fx.counts["vqa"][split] = len(records)
    for which in ("train", "val"):
        _write_json(layout.vqa_annotations(which), {
            "info": {"description": "vlpet fixture"}, "license": {}, "data_subtype": f"{which}2014",
            "annotations": anns[which], "data_type": "mscoco",
        })
    _write_json(layout.vqa_ans2label, {a: i for i, a in enumerate(vqa_answers)})
    _write_json(layout.vqa_label2ans, vqa_answers)


def _write_gqa(fx: ImageTextFixture, rng: np.random.Generator) -> None:
    """GQA train/valid/testdev on their own images (VG or GQA features) and the answer vocabulary."""
    layout, n_per_split = fx.layout, fx.n_per_split
    gqa_answers = list(SHAPES)
    fx.counts["gqa"] = {}
    gqa_qid, vg_id, gqa_img = 2000000, 2300000, 100000
    for split in ("train", "valid", "testdev"):
        source = layout.feature_source("gqa", split)
        records = []
        for c in _balanced(rng, n_per_split, len(SHAPES)):
            if source == "VG":
                vg_id += 3
                img_id = str(vg_id)
            else:
                gqa_img += 3
                img_id = f"n{gqa_img}"
            _image(fx, rng, source, img_id, c, SHAPES)
            gqa_qid += 11
            sent = ("what shape is in the picture?", "which shape is shown?")[gqa_qid % 2]
            records.append({"img_id": img_id, "label": {SHAPES[c]: 1.0},
                            "question_id": f"{gqa_qid:08d}", "sent": sent})
        _write_json(layout.gqa_split(split), records)
        fx.counts["gqa"][split] = len(records)
    _write_json(layout.gqa_ans2label, {a: i for i, a in enumerate(gqa_answers)})
    _write_json(layout.gqa_label2ans, gqa_answers)


def _write_nlvr(fx: ImageTextFixture, rng: np.random.Generator) -> None:
    """NLVR2 train/valid/test: statement pairs (one true, one false) over two images each."""
    layout, n_per_split = fx.layout, fx.n_per_split
    fx.counts["nlvr"] = {}
    prefixes = {"train": "train", "valid": "dev", "test": "test1"}
    for split, prefix in prefixes.items():
        records = []
        for i in range(n_per_split):
            set_id, pair, sent_id = 100 + i // 2, i % 2, 0
            if pair == 0:
                kind = int(rng.integers(2))
                color = COLORS[int(rng.integers(len(COLORS)))]
                want = [bool(v) for v in rng.permutation([0, 1])]  # one true, one false per group
            target = want[pair]
            if kind == 0:
                sent = f"the left image shows something {color}."
                c0 = COLORS.index(color) if target else (COLORS.index(color) + 1 + int(rng.integers(3))) % 4
                c1 = int(rng.integers(len(COLORS)))
            else:
                sent = "both images show the same color."
                c0 = int(rng.integers(len(COLORS)))
                c1 = c0 if target else (c0 + 1 + int(rng.integers(3))) % 4
            ident = f"{prefix}-{set_id}-{pair}-{sent_id}"
            imgs = []
            for k, c in enumerate((c0, c1)):
                img_id = f"{prefix}-{set_id}-{pair}-img{k}"
                _image(fx, rng, "nlvr", img_id, c, COLORS)
                imgs.append(img_id)
            records.append({"identifier": ident, "img0": imgs[0], "img1": imgs[1], "label": int(target),
                            "sent": sent, "uid": f"nlvr2_{split}_{i}"})
        _write_json(layout.nlvr_split(split), records)
        fx.counts["nlvr"][split] = len(records)
