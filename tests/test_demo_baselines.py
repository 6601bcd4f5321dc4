"""The demo's text-only baselines (vlpet.demo.run): majority answer and question-template prior."""

from __future__ import annotations

import json

import pytest

from vlpet.demo.run import vqa_majority_baseline, vqa_template_prior


def _rec(q, a):
    return {"img_id": "x", "sent": q, "question_id": 0, "label": {a: 1.0}}


@pytest.fixture
def data_root(tmp_path):
    train = [_rec("is there a red shape?", "no"), _rec("is there a blue shape?", "no"),
             _rec("is there a green shape?", "yes"),
             _rec("is there not a circle?", "yes"), _rec("is there not a triangle?", "yes"),
             _rec("what color is the shape?", "red"), _rec("what color is the shape?", "red"),
             _rec("what color is the shape?", "blue")]
    test = [_rec("is there a gray shape?", "no"), _rec("is there a teal shape?", "yes"),  # template prior: no
            _rec("is there not a rectangle?", "no"),  # prior: yes -> wrong
            _rec("what color is the shape?", "red"), _rec("what color is the shape?", "green"),  # prior: red
            _rec("what shape is present?", "circle")]  # template never seen in training -> wrong
    (tmp_path / "vqa").mkdir()
    (tmp_path / "vqa" / "karpathy_train.json").write_text(json.dumps(train))
    (tmp_path / "vqa" / "karpathy_test.json").write_text(json.dumps(test))
    return tmp_path


def test_template_prior_answers_each_template_with_its_most_frequent_training_answer(data_root):
    p = vqa_template_prior(data_root)
    # right: gray->no, red; wrong: teal (yes), rectangle (no), green, the unseen template
    assert p["n_questions"] == 6 and p["n_yes_no"] == 3
    assert p["accuracy"] == pytest.approx(100 * 2 / 6)
    assert p["accuracy_yes_no"] == pytest.approx(100 * 1 / 3)


def test_majority_baseline(data_root):
    m = vqa_majority_baseline(data_root)
    assert m["answer"] == "no" and m["accuracy"] == pytest.approx(100 * 2 / 6)
