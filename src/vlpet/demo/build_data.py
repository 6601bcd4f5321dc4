"""Build the offline demo data set from easy-VQA, in the VL-Adapter on-disk layout (spec §7.2).

``build_demo_data(root)`` writes three tasks over the same real easy-VQA images (64x64 PNGs of one
coloured shape), and returns ``{img_id: absolute image path}`` for the feature extractor. Nothing
is copied or linked: the images stay inside the installed ``easy_vqa`` package.

Files written under ``root`` (the ``datasets/`` folder of spec §7.1)::

    vqa/karpathy_train.json  vqa/karpathy_val.json  vqa/karpathy_test.json
    vqa/v2_mscoco_train2014_annotations.json  vqa/v2_mscoco_val2014_annotations.json
    vqa/trainval_ans2label.json  vqa/trainval_label2ans.json
    nlvr/train.json  nlvr/valid.json  nlvr/test.json
    COCO/dataset_coco.json
    images.json           {img_id: image path}, every image any task uses
    facts.json            {img_id: {shape, color, hpos, vpos, size, bbox, shape_source, color_source}}
    demo_data_info.json   parameters, counts and fact statistics

Every rule (all deterministic: same arguments and same easy-VQA package -> byte-identical files)
-------------------------------------------------------------------------------------------------

Image ids and pools
  * easy-VQA train image ``k`` is ``img_id = "easyvqa_train_%06d" % k``, test image ``k`` is
    ``"easyvqa_test_%06d" % k``. The same ids are used by every task (VQA, NLVR, COCO), so one
    feature file per image serves all of them (the NLVR loader reads ``img0``/``img1`` ids from
    its own feature folder: extract the NLVR images there too, or link the folder).
  * train/val pools: the sorted easy-VQA *train* image ids are shuffled with
    ``random.Random(f"{seed}-pool-train")``; the first ``n_train_images`` form the train pool, the
    next ``n_val_images`` the val pool (the held-out slice of train images). The test pool is the
    first ``n_test_images`` of the sorted easy-VQA *test* ids shuffled with
    ``random.Random(f"{seed}-pool-test")``. Pools are then kept in sorted id order.
  * ``n_vqa_train_images`` (default: the train pool) > ``n_train_images`` gives VQA alone a larger
    train pool: the first ``n_vqa_train_images`` of the same shuffled order (so it contains the
    train pool); the val pool then starts after them. NLVR and captions keep the train pool.
  * Default sizes 1000 / 100 / 400 (1,500 images), set by the demo's 10-minute, 2-core budget:
    EfficientNet-Lite0 grid features (``vlpet.features.extract_features``) ran at 60 images/s on
    2 pinned cores of an Intel Xeon but at 14 images/s on the shared 2-core development machine,
    so 1,500 images cost 25 s to ~2 min; the PLM pretraining takes ~2.7 min; the rest goes to
    PET training and evaluation, whose cost grows with the pools (with the demo's settings:
    3,919 test VQA questions — every question of the 400 test images; 1,595 with 4 per image —
    1,600 NLVR test statements and 400 test captions to generate). Training draws a fixed number
    of steps, so more training images mostly add variety: easy-VQA has only 3 shapes x 8 colours
    x 9 positions x 2 sizes, and 1,000 images cover every combination several times.

Facts per image (:mod:`vlpet.demo.facts`)
  * shape and colour come from the image's own easy-VQA questions: an answer that is a shape or
    colour name; a yes/no question naming one (present iff ``(answer == "yes")`` equals "the
    question is affirmative", i.e. has no "not" and does not start with "is no"); or, when exactly
    one value is not ruled out by negative facts, that value. Only when the questions leave it open
    (~10% of images) is the pixel estimate used (nearest palette colour of the median shape pixel;
    shape by bounding-box fill ratio, thresholds set in the gaps between the classes). On all
    5,000 easy-VQA images, wherever the questions decide, the pixel estimate agrees with them
    (4,533/4,533 shapes, 4,451/4,451 colours). ``facts.json`` records the source of each.
  * position and size come from the pixels: background = most frequent border colour; shape mask
    = pixels > 96 (L1 over RGB) away from it; bounding-box centre in the left/middle/right third
    gives hpos left/center/right, top/middle/bottom third gives vpos; size "large" iff
    max(bbox width, height) >= 23 px (51% of the images), else "small".

VQA (``vqa/``)
  * ``karpathy_train`` = train pool, ``karpathy_val`` = val pool, ``karpathy_test`` = test pool.
    For each image (sorted) its easy-VQA questions are taken in their original order; with
    ``max_questions_per_image = m`` an image with more than m questions keeps m of them, chosen
    by ``random.Random(f"{seed}-questions-{img_id}").sample`` and kept in original order.
  * ``question_id`` (int) = 100000 + the question's index in easy-VQA's train question list, or
    200000 + its index in the test question list (traceable and unique).
  * ``label`` = ``{answer: 1.0}``; ``answer_type`` = "yes/no" for yes/no answers, else "other";
    ``question_type`` = the longest matching template prefix of :data:`QUESTION_TYPES` (e.g.
    "what color is the", "is there not a"), else the first two words.
  * ``balance_vqa_train`` (default off): the train split's yes/no questions are cut to as many
    "yes" as "no" per question template (:func:`balance_yes_no`); val and test are never cut.
  * ``v2_mscoco_train2014_annotations.json`` holds the train + val questions,
    ``v2_mscoco_val2014_annotations.json`` the test questions (the official loader merges both):
    official structure ``{info, license, data_type, data_subtype, annotations: [{question_id,
    image_id (the easy-VQA int id), question_type, answer_type, multiple_choice_answer, answers:
    [10 x {answer, answer_confidence: "yes", answer_id: 1..10}]}]}``. All 10 answers are the
    easy-VQA answer, so VQA accuracy min(#matches/3, 1) is exact match.
  * ``trainval_ans2label.json`` / ``trainval_label2ans.json``: easy-VQA's 13 answers in
    ``easy_vqa.get_answers()`` order.

NLVR (``nlvr/``), a two-image true/false task
  * Per split (train/valid/test from the train/val/test pools; identifier tags "train", "dev",
    "test1" as in NLVR2) there are ``round(nlvr_sets_per_image * pool size)`` sets (at least 1).
    Set ``s`` uses ``random.Random(f"{seed}-nlvr-{split}-{s}")``:
      1. pick a statement family uniformly from :data:`vlpet.demo.facts.STATEMENT_FAMILIES`
         (22 families: "both images contain a circle", "the left image has a red shape",
         "the two shapes have the same color", "exactly one image contains a triangle", "the shape
         in the right image is near the top", ...), then its parameter uniformly;
      2. draw random ordered pairs of distinct pool images until 2 pairs where the statement is
         true and 2 where it is false are found (if 20,000 draws do not suffice, go back to 1.;
         after 200 such failures the pool is too small or uniform: ``ValueError``);
         shuffle the 4 pairs; ``img0`` is the left image, ``img1`` the right one;
      3. add a second statement: the first (family, parameter), in a seeded shuffle of all of
         them, that differs from the first and is true for exactly 2 of the 4 pairs (if none, the
         set has one statement).
  * Records: for statement ``j`` and pair ``p``: ``identifier = f"{tag}-{s}-{p}-{j}"``,
    ``img0``, ``img1``, ``label`` (1 true / 0 false), ``sent``, ``uid = f"nlvr2_{tag}_{n}"``.
    Blanking the pair field groups one statement over its 4 pairs (2 true, 2 false) — the NLVR2
    consistency group; the two statements of a pair share the ``{tag}-{s}-{p}`` prefix. Every
    statement is true on exactly half of its pairs, so labels are exactly 50/50 in every split.

COCO captions (``COCO/dataset_coco.json``)
  * ``{"dataset": "coco", "images": [...]}``, one entry per pool image: ``filename =
    f"{img_id}.png"`` (so ``img_id`` = filename without extension), ``filepath`` ("easyvqa_train"
    / "easyvqa_test"), ``imgid``/``cocoid`` (running index), ``sentids``, ``split`` and
    ``sentences: [{raw, tokens, imgid, sentid}]``.
  * split: train pool -> "train", except every 10th train image (sorted position 9, 19, ...) ->
    "restval" (merged into train by the loaders, as in Karpathy's split); val pool -> "val";
    test pool -> "test".
  * 5 references per image from :data:`vlpet.demo.facts.CAPTION_TEMPLATES`, all naming colour and
    shape, e.g. "a large red circle in the top left corner", "a red circle in the top left corner",
    "there is a large red circle in the top left corner", "a large circle colored red",
    "the image shows a red circle in the top left corner".
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from .facts import (
    CAPTION_TEMPLATES,
    ImageFacts,
    all_statements,
    captions_for,
    image_facts,
    STATEMENT_FAMILIES,
)

__all__ = [
    "build_demo_data",
    "DEFAULT_N_TRAIN_IMAGES",
    "DEFAULT_N_VAL_IMAGES",
    "DEFAULT_N_TEST_IMAGES",
    "DEFAULT_MAX_QUESTIONS_PER_IMAGE",
    "QUESTION_TYPES",
    "img_id_for",
]

EASY_VQA_TRAIN_IMAGES = 4000  # easy-VQA 1.0: 4,000 train and 1,000 test images
DEFAULT_N_TRAIN_IMAGES = 1000
DEFAULT_N_VAL_IMAGES = 100
DEFAULT_N_TEST_IMAGES = 400
#: easy-VQA has 4-17 questions per image (~9.6 on average); 4 keeps evaluation cheap
DEFAULT_MAX_QUESTIONS_PER_IMAGE = 4
DEFAULT_NLVR_SETS_PER_IMAGE = 0.5

TRAIN_QID_OFFSET = 100_000
TEST_QID_OFFSET = 200_000
NLVR_TAGS = {"train": "train", "valid": "dev", "test": "test1"}
_MAX_PAIR_DRAWS = 20_000
_MAX_STATEMENT_TRIES = 200
MIN_POOL_IMAGES = 4

#: VQA question types: the easy-VQA template prefixes (longest match wins)
QUESTION_TYPES: tuple[str, ...] = (
    "what color is the",
    "what is the color of the",
    "what shape does the image contain",
    "what shape is",
    "what is the",
    "is there not a",
    "is there a",
    "does the image not contain a",
    "does the image contain a",
    "is no",
    "is a",
)


def img_id_for(split: str, k: int) -> str:
    """``"easyvqa_train_000123"`` / ``"easyvqa_test_000045"`` for easy-VQA image ``k``."""
    if split not in ("train", "test"):
        raise ValueError(f"easy-VQA split must be 'train' or 'test', got {split!r}")
    return f"easyvqa_{split}_{int(k):06d}"


def question_type(question: str) -> str:
    q = " ".join(question.strip().lower().rstrip("?").split())
    best = ""
    for t in QUESTION_TYPES:
        if (q == t or q.startswith(t + " ")) and len(t) > len(best):
            best = t
    return best or " ".join(q.split()[:2])


def _answer_type(answer: str) -> str:
    return "yes/no" if answer in ("yes", "no") else "other"


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, ensure_ascii=False)
    os.replace(tmp, path)


def _check_count(name: str, n: int, lo: int, hi: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or not lo <= n <= hi:
        raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {n!r}")
    return n


def _load_easy_vqa() -> dict[str, Any]:
    try:
        import easy_vqa
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the demo data needs the 'easy-vqa' package: pip install 'vlpet[demo]'") from e
    out = {}
    for split in ("train", "test"):
        texts, answers, image_ids = getattr(easy_vqa, f"get_{split}_questions")()
        by_image: dict[int, list[int]] = defaultdict(list)
        for k, i in enumerate(image_ids):
            by_image[int(i)].append(k)
        paths = {int(k): str(Path(v).resolve()) for k, v in getattr(easy_vqa, f"get_{split}_image_paths")().items()}
        out[split] = {"texts": texts, "answers": answers, "by_image": by_image, "paths": paths}
    out["answers"] = list(easy_vqa.get_answers())
    return out


# ------------------------------------------------------------------------------------------------
# the tasks
# ------------------------------------------------------------------------------------------------
def _vqa_split(ev: dict, source: str, pool: list[int], max_q: int | None, seed: int) -> tuple[list[dict], list[dict]]:
    d = ev[source]
    offset = TRAIN_QID_OFFSET if source == "train" else TEST_QID_OFFSET
    records, annotations = [], []
    for k in pool:
        img_id = img_id_for(source, k)
        qidx = d["by_image"].get(k, [])
        if max_q is not None and len(qidx) > max_q:
            keep = set(random.Random(f"{seed}-questions-{img_id}").sample(range(len(qidx)), max_q))
            qidx = [q for j, q in enumerate(qidx) if j in keep]
        for q in qidx:
            sent, ans = d["texts"][q], d["answers"][q]
            qid = offset + q
            qtype, atype = question_type(sent), _answer_type(ans)
            records.append(
                {"img_id": img_id, "sent": sent, "question_id": qid, "label": {ans: 1.0},
                 "answer_type": atype, "question_type": qtype}
            )
            annotations.append(
                {"question_id": qid, "image_id": k, "question_type": qtype, "answer_type": atype,
                 "multiple_choice_answer": ans,
                 "answers": [{"answer": ans, "answer_confidence": "yes", "answer_id": j} for j in range(1, 11)]}
            )
    return records, annotations


def balance_yes_no(records: list[dict], seed: int) -> list[dict]:
    """Keep as many "yes" as "no" questions of every question template (colour and shape words blanked).

    easy-VQA's yes/no answers follow the template: "is there a <color> shape?" is "no" for 88% of the
    questions (the named colour is one of eight), "is there not a <color> shape?" "yes" for 88%, shape
    templates 2:1; 82% of them can be answered without the image. VQAv2 and GQA, the paper's VQA data,
    were balanced so that such language priors do not pay (Goyal et al. 2017; Hudson & Manning 2019);
    this does the same for the training questions: per template, the larger answer group is cut to the
    size of the smaller one, keeping a ``random.Random(f"{seed}-balance-{template}")`` sample; other
    questions are all kept, every record keeps its place in the original order.
    """
    from .facts import question_template

    groups: dict[tuple[str, str], list[int]] = {}
    for i, r in enumerate(records):
        (answer,) = r["label"]
        if answer in ("yes", "no"):
            groups.setdefault((question_template(r["sent"]), answer), []).append(i)
    drop: set[int] = set()
    for template in sorted({t for t, _ in groups}):
        yes, no = groups.get((template, "yes"), []), groups.get((template, "no"), [])
        n = min(len(yes), len(no))
        rng = random.Random(f"{seed}-balance-{template}")
        for idx in (yes, no):
            drop.update(set(idx) - set(rng.sample(idx, n)))
    return [r for i, r in enumerate(records) if i not in drop]


def _annotation_file(subtype: str, annotations: list[dict]) -> dict:
    return {
        "info": {"description": "easy-VQA questions in the VQA v2 annotation format (vlpet demo); "
                                "10 identical answers per question", "version": "easy-vqa-1.0"},
        "license": {"name": "MIT (easy-VQA)", "url": "https://github.com/vzhou842/easy-VQA"},
        "data_type": "easyvqa",
        "data_subtype": subtype,
        "annotations": annotations,
    }


def _find_pairs(rng: random.Random, pool: list[str], facts: dict[str, ImageFacts], fam, param: str):
    true_pairs, false_pairs, seen = [], [], set()
    for _ in range(_MAX_PAIR_DRAWS):
        a, b = rng.sample(pool, 2)
        if (a, b) in seen:
            continue
        seen.add((a, b))
        bucket = true_pairs if fam.truth(facts[a], facts[b], param) else false_pairs
        if len(bucket) < 2:
            bucket.append((a, b))
        if len(true_pairs) == 2 and len(false_pairs) == 2:
            pairs = true_pairs + false_pairs
            rng.shuffle(pairs)
            return pairs
    return None


def _nlvr_split(split: str, pool_ids: list[str], facts: dict[str, ImageFacts], sets_per_image: float, seed: int) -> list[dict]:
    tag = NLVR_TAGS[split]
    n_sets = max(1, int(round(sets_per_image * len(pool_ids))))
    candidates = all_statements()
    records: list[dict] = []
    for s in range(n_sets):
        rng = random.Random(f"{seed}-nlvr-{split}-{s}")
        pairs = None
        for _attempt in range(_MAX_STATEMENT_TRIES):
            fam = rng.choice(STATEMENT_FAMILIES)
            param = rng.choice(fam.params)
            pairs = _find_pairs(rng, pool_ids, facts, fam, param)
            if pairs is not None:
                break
        if pairs is None:
            raise ValueError(f"could not build NLVR set {s} of the {split} split: the pool of "
                             f"{len(pool_ids)} images is too small or too uniform")
        statements = [(fam, param)]
        order = list(range(len(candidates)))
        rng.shuffle(order)
        first_text = fam.render(param)
        for i in order:
            f2, p2 = candidates[i]
            if f2.render(p2) == first_text:
                continue
            if sum(bool(f2.truth(facts[a], facts[b], p2)) for a, b in pairs) == 2:
                statements.append((f2, p2))
                break
        for p, (a, b) in enumerate(pairs):
            for j, (f, prm) in enumerate(statements):
                records.append(
                    {"identifier": f"{tag}-{s}-{p}-{j}", "img0": a, "img1": b,
                     "label": int(bool(f.truth(facts[a], facts[b], prm))), "sent": f.render(prm),
                     "uid": f"nlvr2_{tag}_{len(records)}"}
                )
    return records


def _coco(pools: dict[str, list[str]], facts: dict[str, ImageFacts]) -> dict:
    images, sentid = [], 0
    for pool_name, ksplit in (("train", "train"), ("val", "val"), ("test", "test")):
        for pos, img_id in enumerate(pools[pool_name]):
            split = "restval" if (ksplit == "train" and pos % 10 == 9) else ksplit
            f = facts[img_id]
            imgid = len(images)
            sents = []
            for raw in captions_for(f.shape, f.color, f.hpos, f.vpos, f.size):
                sents.append({"tokens": raw.split(), "raw": raw, "imgid": imgid, "sentid": sentid})
                sentid += 1
            images.append(
                {"filepath": "easyvqa_test" if img_id.startswith("easyvqa_test_") else "easyvqa_train",
                 "filename": f"{img_id}.png", "imgid": imgid, "cocoid": imgid, "split": split,
                 "sentids": [x["sentid"] for x in sents], "sentences": sents}
            )
    return {"dataset": "coco", "images": images}


def build_demo_data(
    root: str | os.PathLike,
    n_train_images: int | None = None,
    n_test_images: int | None = None,
    seed: int = 0,
    *,
    n_val_images: int | None = None,
    max_questions_per_image: int | None = DEFAULT_MAX_QUESTIONS_PER_IMAGE,
    nlvr_sets_per_image: float = DEFAULT_NLVR_SETS_PER_IMAGE,
    n_vqa_train_images: int | None = None,
    balance_vqa_train: bool = False,
) -> dict[str, str]:
    """Write the demo data set (VQA, NLVR, COCO captions over easy-VQA images) under ``root``.

    Args:
        root: the ``datasets`` folder to write (created if missing; files are overwritten).
        n_train_images: images of the train pool (default 1000; the train pool plus the val pool
            come from easy-VQA's 4,000 train images). Every pool needs >= 4 images.
        n_test_images: images of the test pool, from easy-VQA's 1,000 test images (default 400).
        seed: every random choice derives from it (see the module docstring).
        n_val_images: images of the val pool, held out from easy-VQA train (default 100).
        max_questions_per_image: VQA questions kept per image (default 4; ``None`` keeps all).
        nlvr_sets_per_image: NLVR sets (4 image pairs x up to 2 statements each) per pool image.
        n_vqa_train_images: images whose questions form the VQA train split (default: the train
            pool). A larger number extends the train pool for VQA alone (the next images of the same
            shuffled order; the val pool follows them); NLVR and captions keep the train pool.
        balance_vqa_train: balance the yes/no answers of the VQA train split within each question
            template (see :func:`balance_yes_no`); val and test keep every question.

    Returns ``{img_id: absolute image path}`` for every image used (also written to
    ``root/images.json``), sorted by img_id.
    """
    n_train = DEFAULT_N_TRAIN_IMAGES if n_train_images is None else n_train_images
    n_val = DEFAULT_N_VAL_IMAGES if n_val_images is None else n_val_images
    n_test = DEFAULT_N_TEST_IMAGES if n_test_images is None else n_test_images
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if max_questions_per_image is not None:
        _check_count("max_questions_per_image", max_questions_per_image, 1, 10**6)
    if not (isinstance(nlvr_sets_per_image, (int, float)) and nlvr_sets_per_image > 0):
        raise ValueError(f"nlvr_sets_per_image must be > 0, got {nlvr_sets_per_image!r}")

    ev = _load_easy_vqa()
    n_ev_train, n_ev_test = len(ev["train"]["paths"]), len(ev["test"]["paths"])
    m = MIN_POOL_IMAGES
    _check_count("n_train_images", n_train, m, n_ev_train - m)
    n_vqa = n_train if n_vqa_train_images is None else n_vqa_train_images
    _check_count("n_vqa_train_images", n_vqa, n_train, n_ev_train - m)
    _check_count("n_val_images", n_val, m, n_ev_train - n_vqa)
    _check_count("n_test_images", n_test, m, n_ev_test)

    order = sorted(ev["train"]["paths"])
    random.Random(f"{seed}-pool-train").shuffle(order)
    pool_k = {"train": sorted(order[:n_train]), "val": sorted(order[n_vqa:n_vqa + n_val])}
    vqa_train_k = sorted(order[:n_vqa])  # == pool_k["train"] unless n_vqa_train_images extends it
    vqa_extra_k = sorted(order[n_train:n_vqa])  # images only the VQA task uses
    order = sorted(ev["test"]["paths"])
    random.Random(f"{seed}-pool-test").shuffle(order)
    pool_k["test"] = sorted(order[:n_test])
    source = {"train": "train", "val": "train", "test": "test"}
    pools = {p: [img_id_for(source[p], k) for k in ks] for p, ks in pool_k.items()}

    # ---- facts
    facts: dict[str, ImageFacts] = {}
    images: dict[str, str] = {}
    agree = Counter()
    for p, ks in (*pool_k.items(), ("train", vqa_extra_k)):
        d = ev[source[p]]
        for k in ks:
            img_id = img_id_for(source[p], k)
            qa = [(d["texts"][q], d["answers"][q]) for q in d["by_image"].get(k, [])]
            f, px = image_facts(d["paths"][k], qa)
            facts[img_id], images[img_id] = f, d["paths"][k]
            if f.shape_source != "pixels":
                agree["shape_checked"] += 1
                agree["shape_agree"] += int(px.shape == f.shape)
            if f.color_source != "pixels":
                agree["color_checked"] += 1
                agree["color_agree"] += int(px.color == f.color)

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)

    # ---- VQA
    ann_train: list[dict] = []
    counts: dict[str, Any] = {"images": {p: len(v) for p, v in pools.items()}}
    if vqa_extra_k:
        counts["images"]["vqa_train"] = len(vqa_train_k)
    for p, fname in (("train", "karpathy_train"), ("val", "karpathy_val"), ("test", "karpathy_test")):
        pool = vqa_train_k if p == "train" else pool_k[p]
        recs, anns = _vqa_split(ev, source[p], pool, max_questions_per_image, seed)
        if p == "train" and balance_vqa_train:
            counts["vqa_train_before_balancing"] = len(recs)
            recs = balance_yes_no(recs, seed)
            kept = {r["question_id"] for r in recs}
            anns = [a for a in anns if a["question_id"] in kept]
        _write_json(root / "vqa" / f"{fname}.json", recs)
        counts[f"vqa_{p}"] = len(recs)
        if p == "test":
            _write_json(root / "vqa" / "v2_mscoco_val2014_annotations.json", _annotation_file("val2014", anns))
        else:
            ann_train.extend(anns)
    _write_json(root / "vqa" / "v2_mscoco_train2014_annotations.json", _annotation_file("train2014", ann_train))
    answers = ev["answers"]
    _write_json(root / "vqa" / "trainval_ans2label.json", {a: i for i, a in enumerate(answers)})
    _write_json(root / "vqa" / "trainval_label2ans.json", answers)

    # ---- NLVR
    for split, p in (("train", "train"), ("valid", "val"), ("test", "test")):
        recs = _nlvr_split(split, pools[p], facts, nlvr_sets_per_image, seed)
        _write_json(root / "nlvr" / f"{split}.json", recs)
        counts[f"nlvr_{split}"] = len(recs)
        counts[f"nlvr_{split}_true"] = sum(r["label"] for r in recs)

    # ---- COCO
    coco = _coco(pools, facts)
    _write_json(root / "COCO" / "dataset_coco.json", coco)
    counts["coco_images"] = dict(Counter(im["split"] for im in coco["images"]))
    counts["coco_captions_per_image"] = len(CAPTION_TEMPLATES)

    # ---- images, facts, info
    images = dict(sorted(images.items()))
    _write_json(root / "images.json", images)
    _write_json(root / "facts.json", {k: facts[k].to_json() for k in sorted(facts)})
    info = {
        "generator": "vlpet.demo.build_data.build_demo_data",
        "source": "easy-VQA 1.0 (MIT), https://github.com/vzhou842/easy-VQA; images are not copied",
        "params": {"n_train_images": n_train, "n_val_images": n_val, "n_test_images": n_test, "seed": seed,
                   "max_questions_per_image": max_questions_per_image,
                   "nlvr_sets_per_image": nlvr_sets_per_image, "n_vqa_train_images": n_vqa,
                   "balance_vqa_train": balance_vqa_train},
        "counts": counts,
        "fact_sources": {
            "shape": dict(Counter(f.shape_source for f in facts.values())),
            "color": dict(Counter(f.color_source for f in facts.values())),
        },
        "pixel_agreement": dict(agree),
        "attributes": {a: dict(Counter(getattr(f, a) for f in facts.values()))
                       for a in ("shape", "color", "hpos", "vpos", "size")},
    }
    _write_json(root / "demo_data_info.json", info)
    return images


def main(argv: list[str] | None = None) -> None:
    """``python -m vlpet.demo.build_data ROOT [--n-train-images N] [--n-test-images N] ...``"""
    import argparse

    ap = argparse.ArgumentParser(description="Write the easy-VQA demo data set in the VL-Adapter layout.")
    ap.add_argument("root")
    ap.add_argument("--n-train-images", type=int, default=None)
    ap.add_argument("--n-val-images", type=int, default=None)
    ap.add_argument("--n-test-images", type=int, default=None)
    ap.add_argument("--max-questions-per-image", type=int, default=DEFAULT_MAX_QUESTIONS_PER_IMAGE)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    images = build_demo_data(a.root, a.n_train_images, a.n_test_images, a.seed, n_val_images=a.n_val_images,
                             max_questions_per_image=a.max_questions_per_image)
    with open(Path(a.root) / "demo_data_info.json", encoding="utf-8") as fh:
        print(json.dumps(json.load(fh)["counts"], indent=1))
    print(f"{len(images)} images listed in {Path(a.root) / 'images.json'}")


if __name__ == "__main__":
    main()
