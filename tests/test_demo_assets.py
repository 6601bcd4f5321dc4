"""The demo's data builder (easy-VQA in the VL-Adapter layout) and the locally pretrained PLM."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

easy_vqa = pytest.importorskip("easy_vqa")

from vlpet.demo.build_data import build_demo_data, question_type  # noqa: E402
from vlpet.demo.facts import (  # noqa: E402
    COLORS,
    SHAPES,
    STATEMENT_FAMILIES,
    facts_from_questions,
    measure_pixels,
    question_polarity,
)

CAPS = dict(n_train_images=40, n_test_images=20, n_val_images=12, seed=0)
FILES = [
    "vqa/karpathy_train.json", "vqa/karpathy_val.json", "vqa/karpathy_test.json",
    "vqa/v2_mscoco_train2014_annotations.json", "vqa/v2_mscoco_val2014_annotations.json",
    "vqa/trainval_ans2label.json", "vqa/trainval_label2ans.json",
    "nlvr/train.json", "nlvr/valid.json", "nlvr/test.json",
    "COCO/dataset_coco.json", "images.json", "facts.json", "demo_data_info.json",
]


def _load(root: Path, rel: str):
    with open(root / rel, encoding="utf-8") as fh:
        return json.load(fh)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    a = tmp_path_factory.mktemp("demo_a")
    b = tmp_path_factory.mktemp("demo_b")
    images_a = build_demo_data(a, **CAPS)
    images_b = build_demo_data(b, **CAPS)
    return a, b, images_a, images_b


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------
def test_every_file_written_and_deterministic(built):
    a, b, images_a, images_b = built
    for rel in FILES:
        assert (a / rel).is_file(), rel
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), f"{rel} differs between two builds"
    assert images_a == images_b
    assert images_a == _load(a, "images.json")
    assert len(images_a) == 40 + 12 + 20
    for img_id, path in images_a.items():
        assert Path(path).is_file()
        assert img_id.startswith(("easyvqa_train_", "easyvqa_test_"))
        assert Path(path).stem == str(int(img_id.rsplit("_", 1)[1]))


def test_seed_changes_the_sample(tmp_path, built):
    a = built[0]
    images = build_demo_data(tmp_path, **{**CAPS, "seed": 1})
    assert set(images) != set(built[2])
    assert (tmp_path / "nlvr/train.json").read_bytes() != (a / "nlvr/train.json").read_bytes()


def test_rejects_pools_too_small(tmp_path):
    with pytest.raises(ValueError, match="n_train_images"):
        build_demo_data(tmp_path, n_train_images=3)
    with pytest.raises(ValueError, match="n_test_images"):
        build_demo_data(tmp_path, n_test_images=1001)


def test_vqa_structure(built):
    root, images = built[0], built[2]
    answers = _load(root, "vqa/trainval_label2ans.json")
    assert answers == list(easy_vqa.get_answers())
    assert _load(root, "vqa/trainval_ans2label.json") == {a: i for i, a in enumerate(answers)}
    qids = set()
    split_images = {}
    for split in ("train", "val", "test"):
        recs = _load(root, f"vqa/karpathy_{split}.json")
        assert isinstance(recs, list) and recs
        for r in recs:
            assert set(r) == {"img_id", "sent", "question_id", "label", "answer_type", "question_type"}
            assert isinstance(r["img_id"], str) and r["img_id"] in images
            assert isinstance(r["sent"], str) and r["sent"].endswith("?")
            assert _is_int(r["question_id"]) and r["question_id"] not in qids
            qids.add(r["question_id"])
            assert isinstance(r["label"], dict) and len(r["label"]) == 1
            (ans, score), = r["label"].items()
            assert ans in answers and score == 1.0 and isinstance(score, float)
            assert r["answer_type"] == ("yes/no" if ans in ("yes", "no") else "other")
            assert isinstance(r["question_type"], str) and r["sent"].startswith(r["question_type"])
        split_images[split] = {r["img_id"] for r in recs}
        per_image = Counter(r["img_id"] for r in recs)
        assert max(per_image.values()) <= 4  # default max_questions_per_image
    assert all(i.startswith("easyvqa_train_") for i in split_images["train"] | split_images["val"])
    assert all(i.startswith("easyvqa_test_") for i in split_images["test"])
    assert not split_images["train"] & split_images["val"]

    # the official annotation files: 10 identical answers per question, every question covered
    ann_qids = set()
    for which, splits in (("train", ("train", "val")), ("val", ("test",))):
        data = _load(root, f"vqa/v2_mscoco_{which}2014_annotations.json")
        assert {"info", "license", "data_type", "data_subtype", "annotations"} <= set(data)
        want = {r["question_id"]: r for s in splits for r in _load(root, f"vqa/karpathy_{s}.json")}
        got = {a["question_id"]: a for a in data["annotations"]}
        assert set(got) == set(want)
        for qid, a in got.items():
            (ans,) = want[qid]["label"]
            assert _is_int(a["image_id"]) and isinstance(a["question_type"], str)
            assert a["answer_type"] == want[qid]["answer_type"] and a["multiple_choice_answer"] == ans
            assert len(a["answers"]) == 10
            assert [x["answer_id"] for x in a["answers"]] == list(range(1, 11))
            assert all(x["answer"] == ans and x["answer_confidence"] == "yes" for x in a["answers"])
        ann_qids |= set(got)
    assert ann_qids == qids


def test_vqa_questions_are_easy_vqa_questions(built):
    root = built[0]
    texts, answers, ids = easy_vqa.get_train_questions()
    for r in _load(root, "vqa/karpathy_train.json")[:50]:
        k = r["question_id"] - 100_000
        assert texts[k] == r["sent"] and r["label"] == {answers[k]: 1.0}
        assert r["img_id"] == f"easyvqa_train_{ids[k]:06d}"


def test_larger_vqa_train_pool_leaves_the_other_tasks_alone(tmp_path, built):
    a = built[0]
    images = build_demo_data(tmp_path, **CAPS, n_vqa_train_images=60)
    assert len(images) == 60 + 12 + 20
    base_train = {r["img_id"] for r in _load(a, "vqa/karpathy_train.json")}
    train = _load(tmp_path, "vqa/karpathy_train.json")
    vqa_imgs = {r["img_id"] for r in train}
    assert len(vqa_imgs) == 60 and base_train < vqa_imgs  # the train pool, extended by the next 20 images
    # NLVR and captions keep the 40-image train pool (and the test pool); val moves past the VQA images
    for rel in ("nlvr/train.json", "nlvr/test.json"):
        assert (tmp_path / rel).read_bytes() == (a / rel).read_bytes()

    def coco(root):
        return [(im["filename"], im["split"], [x["raw"] for x in im["sentences"]])
                for im in _load(root, "COCO/dataset_coco.json")["images"] if im["split"] != "val"]
    assert coco(tmp_path) == coco(a)
    val = {r["img_id"] for r in _load(tmp_path, "vqa/karpathy_val.json")}
    assert len(val) == 12 and not val & vqa_imgs
    counts = _load(tmp_path, "demo_data_info.json")["counts"]
    assert counts["images"]["vqa_train"] == 60 and counts["vqa_train"] == len(train)
    with pytest.raises(ValueError, match="n_vqa_train_images"):
        build_demo_data(tmp_path / "x", **CAPS, n_vqa_train_images=39)  # fewer than the train pool


def test_balanced_vqa_train_has_as_many_yes_as_no_per_template(tmp_path, built):
    from vlpet.demo.build_data import balance_yes_no
    from vlpet.demo.facts import question_template

    full = _load(built[0], "vqa/karpathy_train.json")
    build_demo_data(tmp_path, **CAPS, max_questions_per_image=None, balance_vqa_train=True)
    build_demo_data(tmp_path / "u", **CAPS, max_questions_per_image=None)
    unbalanced = _load(tmp_path / "u", "vqa/karpathy_train.json")
    train = _load(tmp_path, "vqa/karpathy_train.json")
    per = defaultdict(Counter)
    for r in unbalanced:
        (ans,) = r["label"]
        if ans in ("yes", "no"):
            per[question_template(r["sent"])][ans] += 1
    got = defaultdict(Counter)
    for r in train:
        (ans,) = r["label"]
        if ans in ("yes", "no"):
            got[question_template(r["sent"])][ans] += 1
    assert any(c["yes"] != c["no"] for c in per.values())  # easy-VQA is not balanced
    for t, c in per.items():  # each template: min(yes, no) of each answer, taken from the full split
        n = min(c["yes"], c["no"])
        assert got.get(t, Counter())["yes"] == n and got.get(t, Counter())["no"] == n, t
    # the other questions all stay, the kept ones in their original order, with their annotations
    other = [r for r in unbalanced if next(iter(r["label"])) not in ("yes", "no")]
    assert [r for r in train if next(iter(r["label"])) not in ("yes", "no")] == other
    pos = {r["question_id"]: i for i, r in enumerate(unbalanced)}
    assert [pos[r["question_id"]] for r in train] == sorted(pos[r["question_id"]] for r in train)
    ann = _load(tmp_path, "vqa/v2_mscoco_train2014_annotations.json")["annotations"]
    val = _load(tmp_path, "vqa/karpathy_val.json")
    assert {a["question_id"] for a in ann} == {r["question_id"] for r in train + val}
    # val and test keep every question; deterministic per seed
    assert (tmp_path / "vqa/karpathy_test.json").read_bytes() == (tmp_path / "u/vqa/karpathy_test.json").read_bytes()
    assert balance_yes_no(unbalanced, 0) == train
    assert balance_yes_no(unbalanced, 1) != train
    assert len(full) < len(unbalanced)  # (the fixture keeps 4 questions per image)


def test_nlvr_structure_balance_and_consistency_groups(built):
    root, images = built[0], built[2]
    facts = _load(root, "facts.json")
    vqa_imgs = {s: {r["img_id"] for r in _load(root, f"vqa/karpathy_{s}.json")} for s in ("train", "val", "test")}
    for split, tag, pool in (("train", "train", "train"), ("valid", "dev", "val"), ("test", "test1", "test")):
        recs = _load(root, f"nlvr/{split}.json")
        assert recs
        uids = set()
        groups = defaultdict(list)
        prefixes = defaultdict(set)
        for r in recs:
            assert set(r) == {"identifier", "img0", "img1", "label", "sent", "uid"}
            assert all(isinstance(r[k], str) for k in ("identifier", "img0", "img1", "sent", "uid"))
            assert _is_int(r["label"]) and r["label"] in (0, 1)
            parts = r["identifier"].split("-")
            assert len(parts) == 4 and parts[0] == tag and all(p.isdigit() for p in parts[1:])
            assert r["uid"].startswith(f"nlvr2_{tag}_") and r["uid"] not in uids
            uids.add(r["uid"])
            assert r["img0"] != r["img1"] and r["img0"] in images and r["img1"] in images
            assert {r["img0"], r["img1"]} <= set(facts)
            groups["-".join([parts[0], parts[1], "", parts[3]])].append(r)
            prefixes["-".join(parts[:3])].add(r["sent"])
        # exactly balanced, per split and per consistency group
        assert sum(r["label"] for r in recs) * 2 == len(recs)
        for key, g in groups.items():
            assert len(g) == 4 and sum(r["label"] for r in g) == 2, key
            assert len({r["sent"] for r in g}) == 1
        # several statements per image pair share the identifier prefix
        assert max(len(v) for v in prefixes.values()) >= 2
        # the labels follow from the image facts
        fams = {f.name: f for f in STATEMENT_FAMILIES}
        for r in recs:
            from vlpet.demo.facts import ImageFacts

            l = ImageFacts(**{**facts[r["img0"]], "bbox": tuple(facts[r["img0"]]["bbox"])})
            rr = ImageFacts(**{**facts[r["img1"]], "bbox": tuple(facts[r["img1"]]["bbox"])})
            truths = {fam.truth(l, rr, p) for fam in fams.values() for p in fam.params if fam.render(p) == r["sent"]}
            assert truths == {bool(r["label"])}, r
        # images come from the split's own pool
        used = {r["img0"] for r in recs} | {r["img1"] for r in recs}
        prefix = "easyvqa_test_" if pool == "test" else "easyvqa_train_"
        assert all(i.startswith(prefix) for i in used)
        if pool != "test":
            other = vqa_imgs["val" if pool == "train" else "train"]
            assert not used & other


def test_coco_structure_and_captions(built):
    root, images = built[0], built[2]
    coco = _load(root, "COCO/dataset_coco.json")
    facts = _load(root, "facts.json")
    assert isinstance(coco["images"], list)
    splits = Counter()
    sentids = set()
    for im in coco["images"]:
        assert isinstance(im["filename"], str) and im["filename"].endswith(".png")
        img_id = im["filename"][:-4]
        assert img_id in images
        assert im["split"] in ("train", "restval", "val", "test")
        splits[im["split"]] += 1
        assert len(im["sentences"]) >= 3
        for s in im["sentences"]:
            assert isinstance(s["raw"], str) and s["raw"].strip()
            assert s["sentid"] not in sentids
            sentids.add(s["sentid"])
        f = facts[img_id]
        for s in im["sentences"]:
            assert f["color"] in s["raw"].split() and f["shape"] in s["raw"].split()
        if img_id.startswith("easyvqa_test_"):
            assert im["split"] == "test"
    assert splits == {"train": 36, "restval": 4, "val": 12, "test": 20}


def test_captions_match_the_questions_for_some_images(built):
    """Colour and shape in the captions agree with easy-VQA's own answers about the image."""
    root = built[0]
    coco = {im["filename"][:-4]: [s["raw"] for s in im["sentences"]] for im in _load(root, "COCO/dataset_coco.json")["images"]}
    texts, answers, ids = easy_vqa.get_train_questions()
    checked = Counter()
    for t, a, i in zip(texts, answers, ids):
        img_id = f"easyvqa_train_{i:06d}"
        if img_id not in coco:
            continue
        if a in COLORS or a in SHAPES:
            assert all(a in c.split() for c in coco[img_id]), (t, a, coco[img_id])
            checked["color" if a in COLORS else "shape"] += 1
    assert checked["color"] >= 2 and checked["shape"] >= 2


def test_facts_rules():
    assert question_polarity("is there a red shape?") and question_polarity("does the image contain a circle?")
    assert not question_polarity("is there not a red shape in the image?")
    assert not question_polarity("is no circle present?")
    assert not question_polarity("does the image not contain a gray shape?")
    k = facts_from_questions([
        ("is there not a circle?", "yes"), ("is no rectangle present?", "yes"),
        ("what color is the shape?", "teal"), ("is there a red shape?", "no"),
    ])
    assert k["shape"] == {"pos": set(), "neg": {"circle", "rectangle"}}
    assert k["color"] == {"pos": {"teal"}, "neg": {"red"}}
    assert question_type("what color is the triangle?") == "what color is the"
    assert question_type("is there not a blue shape in the image?") == "is there not a"
    assert question_type("what shape does the image contain?") == "what shape does the image contain"

    # a synthetic image: a red 20x10 rectangle in the top left on a tinted background
    img = np.full((64, 64, 3), (240, 235, 230), dtype=np.uint8)
    img[2:12, 3:23] = (255, 0, 0)
    px = measure_pixels(img)
    assert (px.shape, px.color, px.hpos, px.vpos, px.size) == ("rectangle", "red", "left", "top", "small")
    assert px.bbox == (3, 2, 22, 11)


def test_readers_accept_the_files(built):
    """Cross-check with the project's own validated readers (a plain import: our own module must not
    turn an ImportError into a skip)."""
    from vlpet.data import records
    root = built[0]
    for s in ("train", "val", "test"):
        assert records.read_vqa(root / f"vqa/karpathy_{s}.json")
    for s in ("train", "valid", "test"):
        assert records.read_nlvr2(root / f"nlvr/{s}.json")
    assert len(records.read_coco_karpathy(root / "COCO/dataset_coco.json", "train")) == 40
    assert records.read_vqa_annotations(root / "vqa/v2_mscoco_train2014_annotations.json")
    assert records.read_label2ans(root / "vqa/trainval_label2ans.json")


# ------------------------------------------------------------------------------------------------
# tokenizer and pretraining
# ------------------------------------------------------------------------------------------------
TINY_MODEL = dict(d_model=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                  decoder_attention_heads=2, encoder_ffn_dim=128, decoder_ffn_dim=128,
                  max_position_embeddings=64, dropout=0.0)
TINY_TRAIN = dict(vocab_size=700, english_max_chars=40_000, seq_len=40, batch_size=8, warmup_steps=5,
                  lr=3e-3, n_eval_examples=32, copy_warmup_max_steps=10, copy_warmup_len=8)


def test_bpe_tokenizer_round_trip(tmp_path):
    transformers = pytest.importorskip("transformers")
    from vlpet.demo.corpus import demo_sentences
    from vlpet.demo.pretrain import SPECIAL_TOKENS, train_bpe_tokenizer

    sents = demo_sentences()
    train_bpe_tokenizer(sents * 3 + ["The quick brown fox jumps over the lazy dog."] * 3, 500, tmp_path)
    assert (tmp_path / "vocab.json").is_file() and (tmp_path / "merges.txt").is_file()
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    assert [vocab[t] for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    # from the two BPE files alone, and through AutoTokenizer
    only_bpe = tmp_path / "bpe_only"
    only_bpe.mkdir()
    for f in ("vocab.json", "merges.txt"):
        (only_bpe / f).write_bytes((tmp_path / f).read_bytes())
    for folder, cls in ((tmp_path, transformers.BartTokenizerFast), (only_bpe, transformers.BartTokenizerFast),
                        (tmp_path, transformers.AutoTokenizer)):
        tok = cls.from_pretrained(str(folder))
        assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, tok.unk_token_id, tok.mask_token_id) == (0, 1, 2, 3, 4)
        for text in ("what color is the triangle?", "a large red circle in the top left corner",
                     "Zebras jump 42 times, naïvely!"):
            ids = tok(text)["input_ids"]
            assert ids[0] == 0 and ids[-1] == 2
            assert tok.decode(ids, skip_special_tokens=True).strip() == text
        if folder == tmp_path:  # the saved config adds the prefix space (the two BPE files alone do not)
            assert len(tok("what color is the shape?")["input_ids"]) <= 9  # demo words are whole tokens
            # a bare word (a VQA answer, an NLVR class word) gets the token it has inside a sentence
            for word in ("circle", "red", "shape"):
                bare = tok(word, add_special_tokens=False)["input_ids"]
                assert bare == tok(" " + word, add_special_tokens=False)["input_ids"] and len(bare) == 1, word
    tok = transformers.BartTokenizerFast.from_pretrained(str(tmp_path))
    assert tok.convert_ids_to_tokens(tok("the <mask> is red")["input_ids"])[1:3] == ["Ġthe", "<mask>"]


def test_denoise_masks_30_percent_of_words_in_spans():
    from vlpet.demo.pretrain import BOS, EOS, MASK, denoise

    word_start = np.zeros(200, dtype=bool)
    word_start[100:] = True  # ids >= 100 start a word
    sent = [100 + i for i in range(40)]
    rng = np.random.default_rng(0)
    kept = []
    for _ in range(200):
        src, tgt = denoise([(sent, sent)], rng, word_start, 0.3, 3.0, permute=False, max_len=64)
        assert tgt == [BOS] + sent + [EOS]
        assert src[0] == BOS and src[-1] == EOS and MASK in src
        body = [t for t in src[1:-1] if t != MASK]
        assert body == [t for t in sent if t in body]  # order kept, only deletions
        kept.append(len(body))
        assert all(not (a == MASK and b == MASK) for a, b in zip(src, src[1:]))
    assert set(kept) == {28}  # exactly round(0.3 * 40) = 12 words masked
    # sentence permutation keeps the target in the original order
    s1, s2 = [101, 102], [103, 104, 105]
    src, tgt = denoise([(s1, s1), (s2, s2)], np.random.default_rng(3), word_start, 0.0, 3.0, True, 64)
    assert tgt == [BOS, 101, 102, 103, 104, 105, EOS] and sorted(src) == sorted(tgt)


def test_pretrain_tiny_run_saves_a_loadable_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    from vlpet.demo.pretrain import PLM_NOTE, pretrain_demo_plm

    # one thread: the tests may share the CPU with other jobs, where 2 threads crawl
    folder = pretrain_demo_plm(tmp_path, budget_s=4, seed=0, progress=False, num_threads=1,
                               model_config=TINY_MODEL, train_config=TINY_TRAIN)
    assert folder.parent == tmp_path and folder.name.startswith("demo-plm-")
    log = json.loads((folder / "pretrain_log.json").read_text())
    assert log["steps"] >= 5 and log["eval_loss_after"] < log["eval_loss_before"]
    assert 1 <= log["copy_warmup"]["steps"] <= 10
    assert {c[3] for c in log["loss_curve"]} == {"copy", "denoise"}
    assert log["loss_curve"][-1][1] < log["loss_curve"][0][1]
    assert log["tokens_seen"]["total"] > 0 and log["corpus"]["english"]["chars"] >= 40_000
    assert log["note"] == PLM_NOTE and "NOT facebook/bart-base" in (folder / "README.md").read_text()
    model = transformers.BartForConditionalGeneration.from_pretrained(str(folder))
    tok = transformers.BartTokenizerFast.from_pretrained(str(folder))
    assert model.config.vocab_size == len(tok) and model.config.d_model == 64
    assert model.config.decoder_start_token_id == 2 and model.config.pad_token_id == 1
    out = model.generate(**tok("what <mask> is the shape?", return_tensors="pt"), max_new_tokens=5)
    assert out.shape[0] == 1
    # cached: a second call returns the same folder without training
    mtime = (folder / "pretrain_log.json").stat().st_mtime_ns
    assert pretrain_demo_plm(tmp_path, budget_s=4, seed=0, progress=False, num_threads=1,
                             model_config=TINY_MODEL, train_config=TINY_TRAIN) == folder
    assert (folder / "pretrain_log.json").stat().st_mtime_ns == mtime


def test_pretrain_fixed_steps_is_deterministic(tmp_path, monkeypatch):
    import torch
    from safetensors.torch import load_file

    from vlpet.demo.pretrain import pretrain_demo_plm

    monkeypatch.setenv("VLPET_CACHE", str(tmp_path / "env_cache"))
    # every step count fixed in advance (the demo's setting): 3 copy warm-up + 4 denoising steps
    kw = dict(seed=3, progress=False, max_steps=4, num_threads=1, model_config=TINY_MODEL,
              train_config={**TINY_TRAIN, "copy_warmup_steps": 3})
    a = pretrain_demo_plm(None, **kw)
    log = json.loads((a / "pretrain_log.json").read_text())
    assert (log["copy_warmup"]["steps"], log["steps"]) == (3, 4)
    assert a.parent == tmp_path / "env_cache"
    b = pretrain_demo_plm(tmp_path / "other", **kw)
    assert a.name == b.name
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (a / "vocab.json").read_bytes() == (b / "vocab.json").read_bytes()


# ------------------------------------------------------------------------------------------------
# text-only scenes with questions and answers (an optional part of the PLM's text, off in the demo)
# ------------------------------------------------------------------------------------------------
def test_answer_for_reproduces_every_easy_vqa_answer(built):
    from vlpet.demo.corpus import answer_for

    root = built[0]
    facts = _load(root, "facts.json")
    n = 0
    for split in ("train", "val", "test"):
        for r in _load(root, f"vqa/karpathy_{split}.json"):
            f = facts[r["img_id"]]
            (ans,) = r["label"]
            assert answer_for(r["sent"], f["shape"], f["color"]) == ans, r
            n += 1
    assert n > 200
    # the rule itself, by hand
    assert answer_for("is there a red shape?", "circle", "red") == "yes"
    assert answer_for("is there not a red shape?", "circle", "red") == "no"
    assert answer_for("is no circle present?", "triangle", "blue") == "yes"
    assert answer_for("what is the color of the circle?", "circle", "teal") == "teal"
    assert answer_for("what is the blue shape?", "rectangle", "blue") == "rectangle"


def test_scene_documents_are_consistent_and_deterministic():
    from vlpet.demo.corpus import answer_for, scene_documents
    from vlpet.demo.facts import all_fact_combinations, captions_for

    docs = scene_documents(seed=0, per_scene=2, questions_per_doc=3)
    combos = list(all_fact_combinations())
    assert len(docs) == 2 * len(combos) == 864
    assert docs == scene_documents(seed=0, per_scene=2, questions_per_doc=3)
    assert docs != scene_documents(seed=1, per_scene=2, questions_per_doc=3)
    answers = Counter()
    for i, doc in enumerate(docs):
        f = combos[i // 2]
        assert doc[0] in captions_for(**f) and len(doc) == 4
        qs = [s.rsplit(" ", 1) for s in doc[1:]]
        assert len({q for q, _ in qs}) == 3  # distinct questions
        for q, a in qs:
            assert q.endswith("?") and a.endswith(".")
            assert a[:-1] == answer_for(q, f["shape"], f["color"])
            answers[a[:-1]] += 1
            if q.startswith("what"):  # never asks about a colour or shape the scene does not have
                named = [w for w in q[:-1].split() if w in COLORS or w in SHAPES]
                assert all(w in (f["color"], f["shape"]) for w in named), q
    assert answers["yes"] and answers["no"] and set(answers) <= {"yes", "no", *COLORS, *SHAPES}


def test_scene_fraction_zero_keeps_the_plm_and_nonzero_pretrains_on_scenes(tmp_path):
    from vlpet.demo.pretrain import pretrain_demo_plm

    kw = dict(seed=0, progress=False, max_steps=2, num_threads=1, model_config=TINY_MODEL)
    base = {**TINY_TRAIN, "copy_warmup_steps": 1}
    a = pretrain_demo_plm(tmp_path, train_config=base, **kw)
    assert pretrain_demo_plm(tmp_path, train_config={**base, "scene_fraction": 0.0}, **kw) == a  # same cache key
    b = pretrain_demo_plm(tmp_path, train_config={**base, "scene_fraction": 0.5, "demo_fraction": 0.25}, **kw)
    assert b != a
    import transformers

    # the scene answers are tokenizer training text: "yes" becomes one token ("no" already was)
    tok_a = transformers.BartTokenizerFast.from_pretrained(str(a))
    tok_b = transformers.BartTokenizerFast.from_pretrained(str(b))
    assert len(tok_b.tokenize("yes")) == 1 and len(tok_a.tokenize("yes")) > 1


def test_sampler_draws_scene_documents_in_their_share():
    import numpy as np

    from vlpet.demo import pretrain as P

    class WordTok:  # a word-level stand-in for the BPE tokenizer: all the sampler needs
        def __init__(self):
            self.vocab = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]

        def __len__(self):
            return len(self.vocab)

        def convert_ids_to_tokens(self, ids):
            return [self.vocab[i] for i in ids]

        def id(self, word):
            if "Ġ" + word not in self.vocab:
                self.vocab.append("Ġ" + word)
            return self.vocab.index("Ġ" + word)

        def __call__(self, texts, **kw):
            return {"input_ids": [[self.id(w) for w in t.split()] for t in texts]}

    tok = WordTok()
    corpus = {"demo": ["what color is the thing?"], "english": [["The cat sat.", "It slept well."]] * 4,
              "scene": [["a green circle", "is there a circle? yes."]]}
    tok([*corpus["demo"], *(x for d in corpus["english"] + corpus["scene"] for x in d)])  # fix the vocabulary
    marks = {"scene": tok.id("circle"), "demo": tok.id("thing?"), "english": tok.id("cat")}
    for share in (0.0, 0.3):
        cfg = {**P.DEFAULT_TRAIN_CONFIG, "seq_len": 32, "scene_fraction": share, "demo_fraction": 0.3,
               "heldout_fraction": 0.0}
        sampler = P._Sampler(tok, corpus, cfg, 0)
        rng = np.random.default_rng(0)
        kinds = Counter()
        for _ in range(2000):
            _src, target = sampler.example(rng)
            (kind,) = [k for k, m in marks.items() if m in target]
            kinds[kind] += 1
        if share == 0.0:  # switched off means never, not rarely
            assert kinds["scene"] == 0, kinds
        else:
            assert abs(kinds["scene"] / 2000 - share) < 0.04, kinds
        assert abs(kinds["demo"] / 2000 - 0.3) < 0.04, kinds
