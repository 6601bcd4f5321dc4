"""`vlpet train` -> `vlpet evaluate` -> `vlpet predict` on the image-text fixture in the exact VL-Adapter layout:
all four tasks, two epochs, through the CLI; the loss falls and every output file has its format."""

from __future__ import annotations

import json

import pytest
from conftest import make_tiny_bart

from vlpet.cli import main


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from vlpet.data import make_image_text_fixture

    root = tmp_path_factory.mktemp("train_cli")
    data = make_image_text_fixture(root / "datasets", n_per_split=6, feat_dim=32).root
    backbone, _ = make_tiny_bart(root / "bart", d_model=32)
    out = root / "run"
    rc = main(["train", "--backbone", str(backbone), "--method", "vl-pet-large", "--data-root", str(data),
               "--output", str(out), "--epochs", "2", "--batch-size", "6", "--lr", "5e-3", "--seed", "1",
               "--caption-metrics", "BLEU-4,CIDEr", "--device", "cpu", "--no-progress"])
    assert rc == 0
    return data, out


def test_train_writes_the_run_and_the_loss_falls(run):
    _, out = run
    for name in ("run_config.json", "results.json", "results.md", "log.jsonl", "adapter-last/vlpet_config.json",
                 "adapter-best/adapter_model.safetensors", "checkpoint/trainer_state.pt",
                 "plots/learning_curves.png", "plots/gate_heatmap.png"):
        assert (out / name).exists(), name
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    losses = [v for r in log for k, v in r.items() if k.startswith("loss/")]
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < first, (first, last)
    assert [r["epoch"] for r in log if "val/avg" in r] == [0, 1]  # validation every epoch
    results = json.loads((out / "results.json").read_text())
    assert set(results["test"]) == {"last", "best"}
    assert set(results["test"]["last"]) == {"vqa", "gqa", "nlvr", "caption"}
    assert round(results["params"]["percent"], 6) == round(100 * results["params"]["trainable"]
                                                           / results["params"]["total"], 6)
    assert len(results["gates"]) == 2 * 2  # 2 encoder layers x (attention, FFN)


def test_evaluate_prints_a_table2_row(run, capsys):
    data, out = run
    assert main(["evaluate", "--checkpoint", str(out), "--data-root", str(data), "--device", "cpu",
                 "--caption-metrics", "BLEU-4,CIDEr"]) == 0
    printed = capsys.readouterr().out
    assert "| Method | Params % | VQA | GQA | NLVR2 | COCO CIDEr | Avg |" in printed
    row = next(line for line in printed.splitlines() if line.startswith("| vl-pet-large (last)"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    values = [float(c) for c in cells[2:]]
    assert values[-1] == pytest.approx(sum(values[:-1]) / 4, abs=0.01)  # Avg = plain mean of the four
    saved = json.loads((out / "eval-test.json").read_text())
    assert set(saved["results"]) == {"last", "best"}


def _split_ids(data, task):
    """The test split's ids, read from the fixture's files (not through vlpet)."""
    if task == "vqa":
        return [r["question_id"] for r in json.loads((data / "vqa/karpathy_test.json").read_text())]
    if task == "gqa":
        return [r["question_id"] for r in json.loads((data / "GQA/testdev.json").read_text())]
    if task == "nlvr":
        return [r["identifier"] for r in json.loads((data / "nlvr/test.json").read_text())]
    images = json.loads((data / "COCO/dataset_coco.json").read_text())["images"]
    return [im["filename"].rsplit(".", 1)[0] for im in images if im["split"] == "test"]


def _score(data, task, preds):
    """The run's test score recomputed from the submission file with the tasks' plain formulas (x100)."""
    if task == "nlvr":
        gold = {r["identifier"]: r["label"] for r in json.loads((data / "nlvr/test.json").read_text())}
        return 100 * sum((p["prediction"] == "True") == bool(gold[p["identifier"]]) for p in preds) / len(preds)
    name, key, answer = {"vqa": ("vqa/karpathy_test.json", "question_id", "answer"),
                         "gqa": ("GQA/testdev.json", "questionId", "prediction")}[task]
    labels = {r["question_id"]: r["label"] for r in json.loads((data / name).read_text())}
    return 100 * sum(labels[p[key]].get(p[answer], 0.0) for p in preds) / len(preds)


@pytest.mark.parametrize("task,id_key,value_key", [("vqa", "question_id", "answer"), ("gqa", "questionId", "prediction"),
                                                   ("nlvr", "identifier", "prediction"), ("caption", "image_id", "caption")])
def test_predict_writes_submission_formats(run, tmp_path, task, id_key, value_key):
    """Every test example once, under the id its data file gives, with a value of the submission's type; the
    accuracy recomputed from the file is the one the run reported for adapter-last (which `predict` reads)."""
    data, out = run
    target = tmp_path / f"{task}.json"
    assert main(["predict", "--checkpoint", str(out), "--data-root", str(data), "--task", task,
                 "--output", str(target), "--device", "cpu"]) == 0
    preds = json.loads(target.read_text())
    assert all(set(p) == {id_key, value_key} for p in preds)
    ids = [p[id_key] for p in preds]
    assert sorted(ids) == sorted(_split_ids(data, task)) and len(set(ids)) == len(ids)
    values = [p[value_key] for p in preds]
    if task == "nlvr":
        assert set(values) <= {"True", "False"}
    else:
        assert all(isinstance(v, str) and v == v.strip() for v in values)
    if task != "caption":
        reported = json.loads((out / "results.json").read_text())["test"]["last"][task]["accuracy"]
        assert _score(data, task, preds) == pytest.approx(reported, abs=1e-6)


def test_every_train_flag_reaches_train_config():
    """Each `vlpet train` option's destination is a TrainConfig field that cmd_train passes on (no flag parsed and
    then dropped), and a field without a flag (clip_norm, ...) is simply never set from the command line."""
    import dataclasses

    from vlpet.cli import build_parser, train_keys
    from vlpet.train.loop import TrainConfig

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["train"]
    dests = {a.dest for a in sub._actions if a.dest not in ("help", "config")}
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert dests <= set(train_keys()) <= fields, dests - set(train_keys())
    assert "debug" not in train_keys()
