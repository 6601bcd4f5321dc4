"""benchmarks/decoder_only_easyvqa.py --quick: the whole pipeline (data, LM + vision tower pretraining, every
preset tuned and scored) runs on a tiny budget and its table has every row with sane values. A smoke test of
the script, not a measurement (its numbers mean nothing at this budget)."""

from __future__ import annotations

import json

import pytest
from conftest import import_benchmark

pytest.importorskip("easy_vqa")


def _load():
    return import_benchmark("decoder_only_easyvqa")


def test_quick_run_has_every_row_and_sane_values(tmp_path):
    mod = _load()
    res = mod.main(["--quick", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out")])
    names = [mod.ZERO_SHOT, mod.TEXT_PRIOR] + [name for name, _, _ in mod.ROWS]
    summary = {r["row"]: r for r in res["summary"]}
    assert list(summary) == names
    for name in names:
        assert name in res["table"]
    rows = res["rows"]
    for r in rows:
        assert 0.0 <= r["vqa"]["overall"] <= 100.0 and r["vqa"]["n"] == mod.QUICK.n_eval
        assert r["steps"] == (0 if r["row"] in (mod.ZERO_SHOT, mod.TEXT_PRIOR) else mod.QUICK.steps)
    # Params %: nothing trained for the floor, every PET row a small share, full the largest
    pct = {n: summary[n]["params_pct"] for n in names}
    assert pct[mod.ZERO_SHOT] == pct[mod.TEXT_PRIOR] == 0.0
    assert all(0.0 < pct[n] < pct["full"] for n in names[2:-1])
    # the value adapter's positions change where it acts, not its size
    assert pct["vl-pet-large"] == pct["vl-pet-large (value: all)"]
    # the two value-position rows ran on every seed, the others on the main one only
    assert summary["vl-pet-large"]["seeds"] == [mod.QUICK.seed, *mod.QUICK.extra_seeds]
    assert summary["vl-pet-large (value: all)"]["seeds"] == [mod.QUICK.seed, *mod.QUICK.extra_seeds]
    assert summary["lora"]["seeds"] == [mod.QUICK.seed]
    # the pretraining stages ran and were logged; the JSON on disk is what main returned
    log = res["vlm_build"]
    assert log["image_tokens"] == (mod.QUICK.image_size // mod.QUICK.patch) ** 2
    (path,) = (tmp_path / "out").glob("decoder_only_easyvqa-cpu-*-quick.json")
    assert json.loads(path.read_text())["table"] == res["table"]


def test_text_prior_is_the_majority_answer_of_each_template():
    mod = _load()

    def rec(qid, q, a):
        return {"qid": qid, "q": q, "a": a, "atype": "yes/no" if a in ("yes", "no") else "other"}

    train = [rec(1, "is there a red shape?", "no"), rec(2, "is there a blue shape?", "no"),
             rec(3, "is there a green shape?", "yes"), rec(4, "what color is the circle?", "red"),
             rec(5, "what color is the square?", "red"), rec(6, "what color is the circle?", "blue")]
    # "is there a <color> shape ?" -> no (2 of 3), "what color is the <shape> ?" -> red (2 of 3)
    test = [rec(11, "is there a gray shape?", "no"), rec(12, "is there a red shape?", "yes"),
            rec(13, "what color is the triangle?", "red"), rec(14, "what color is the circle?", "green")]
    res = mod.text_prior({"train": train, "test": test})
    assert res == {"overall": 50.0, "yes/no": 50.0, "other": 50.0, "n": 4}
