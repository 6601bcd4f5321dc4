"""Tests of vlpet.metrics (fast; the Java-dependent ones skip without `java`)."""

from __future__ import annotations

import copy
import os
import json
import shutil
import sys
import warnings
from pathlib import Path

import pytest

from vlpet.errors import MetricError, MetricKeyError, MissingDependencyError, VLPetError

try:
    import vlpet.metrics  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from vlpet.metrics import (
    AnnotationFormatError,
    caption_scores,
    gqa_accuracy,
    group_references,
    load_vqa_annotations,
    markdown_header,
    nlvr2_group_id,
    nlvr2_scores,
    normalize_vqa_answer,
    parse_choice,
    simple_tokenize,
    summarize_row,
    video_caption_scores,
    video_qa_accuracy,
    vqa_accuracy,
    vqa_question_accuracy,
    vqa_topk_score,
)
from vlpet.metrics import captions as captions_mod

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="needs Java (PTB tokenizer)")


# ----------------------------------------------------------------------------------------------
# VQA normalisation


@pytest.mark.parametrize(
    "raw, expected",
    [
        # contractions (after lowercasing, word by word)
        ("dont", "don't"),
        ("Isnt", "isn't"),
        ("whats that", "what's that"),
        ("don't", "don't"),  # apostrophes are not punctuation
        # articles removed
        ("A dog", "dog"),
        ("the red one", "red 1"),
        ("an apple", "apple"),
        # number words -> digits
        ("two", "2"),
        ("Ten", "10"),
        ("none", "0"),
        # periods: removed unless followed by a digit
        ("Yes.", "yes"),
        ("2.5", "2.5"),
        ("st. louis", "st louis"),
        # a comma between digits: all listed punctuation is deleted, not replaced by a space
        ("1,000", "1000"),
        ("1,000 (approx)", "1000 approx"),
        # punctuation touching a space is deleted, otherwise it becomes a space
        ("yes !", "yes"),
        ("black/white", "black white"),
        ("t-shirt", "t shirt"),
        ("What color?", "what color"),
        # whitespace
        ("  two\tdogs\n", "2 dogs"),
    ],
)
def test_normalize_vqa_answer(raw, expected):
    assert normalize_vqa_answer(raw) == expected


# ----------------------------------------------------------------------------------------------
# VQA accuracy


def _gts(n_match: int, answer: str = "2", other: str = "3") -> list[str]:
    return [answer] * n_match + [other] * (10 - n_match)


@pytest.mark.parametrize(
    "n_match, expected",
    [
        # n of 10 GTs equal the prediction. Leaving out a matching GT leaves n-1 matches, leaving
        # out another GT leaves n: acc = (n*min(1,(n-1)/3) + (10-n)*min(1,n/3)) / 10.
        (0, 0.0),
        (1, 0.3),  # (1*0 + 9*(1/3)) / 10 = 3/10
        (2, 0.6),  # (2*(1/3) + 8*(2/3)) / 10 = (2/3 + 16/3) / 10 = 6/10
        (3, 0.9),  # (3*(2/3) + 7*1) / 10 = (2 + 7) / 10
        (4, 1.0),  # (4*1 + 6*1) / 10
        (10, 1.0),
    ],
)
def test_vqa_leave_one_out(n_match, expected):
    assert vqa_question_accuracy("2", _gts(n_match)) == pytest.approx(expected)


def test_vqa_accuracy_overall_and_types():
    preds = {1: "two", 2: "Yes.", 3: "dont know", 4: "a cat", "5": "blue"}
    ann = {
        1: _gts(2),                          # "two" -> "2": 2 matches -> 0.6
        2: ["yes"] * 3 + ["no"] * 7,         # "Yes." -> "yes": 3 matches -> 0.9
        3: ["don't know"] * 4 + ["no"] * 6,  # contraction: 4 matches -> 1.0
        4: ["cat"] * 10,                     # article removed, unanimous GTs: 1.0
        5: ["red"] * 10,                     # str qid "5" finds int 5; wrong -> 0.0
    }
    atypes = {1: "number", 2: "yes/no", 3: "other", 4: "other", 5: "other"}
    out = vqa_accuracy(preds, ann, answer_types=atypes)
    # (0.6 + 0.9 + 1.0 + 1.0 + 0.0) / 5 = 3.5 / 5 = 0.7
    assert out["overall"] == pytest.approx(70.0)
    assert out["n"] == 5
    assert out["per_answer_type"] == pytest.approx({"number": 60.0, "yes/no": 90.0, "other": 200.0 / 3})
    assert out["per_question"][1] == pytest.approx(60.0)


def test_vqa_gt_processing_modes():
    # Official: the GTs disagree, so they get the punctuation step only: "yes!" -> "yes " (the "!"
    # becomes a space and nothing strips it), which does not equal the prediction "yes".
    # 2 matching GTs -> 0.6. With full GT normalisation all 10 match -> 1.0.
    gts = ["yes"] * 2 + ["yes!"] * 8
    assert vqa_question_accuracy("yes", gts) == pytest.approx(0.6)
    assert vqa_question_accuracy("yes", gts, gt_processing="full") == pytest.approx(1.0)
    # Unanimous GTs are left as they are in official mode: "Two" never equals a prediction.
    assert vqa_question_accuracy("two", ["Two"] * 10) == 0.0
    assert vqa_question_accuracy("two", ["Two"] * 10, gt_processing="full") == 1.0


def test_vqa_does_not_mutate_inputs():
    preds = {1: " Yes! ", 2: "two"}
    ann = {1: ["yes!", "yes", "Yes.", "no"] + ["yes"] * 6, 2: ["2"] * 3 + ["two"] * 7}
    preds0, ann0 = copy.deepcopy(preds), copy.deepcopy(ann)
    first = vqa_accuracy(preds, ann)
    second = vqa_accuracy(preds, ann)
    assert preds == preds0 and ann == ann0
    assert first["overall"] == second["overall"]


def test_vqa_missing_annotation_raises():
    with pytest.raises(MetricKeyError, match="^no VQA annotations for predicted question id 7$"):  # one line, no quotes
        vqa_accuracy({7: "yes"}, {1: ["yes"] * 10})


def test_vqa_topk_score():
    labels = {1: {"yes": 1.0, "no": 0.3}, 2: {"2": 0.9}}
    preds = {1: "no", 2: "3"}
    assert vqa_topk_score(preds, labels, average=False) == pytest.approx(0.3)
    assert vqa_topk_score(preds, labels) == pytest.approx(15.0)  # 100 * 0.3 / 2


def _official_layout():
    return {
        "info": {},
        "annotations": [
            {
                "question_id": 458752000,
                "image_id": 458752,
                "answer_type": "other",
                "question_type": "what is",
                "multiple_choice_answer": "net",
                "answers": [{"answer": "net", "answer_confidence": "yes", "answer_id": i + 1} for i in range(10)],
            },
            {
                "question_id": 458752001,
                "answer_type": "yes/no",
                "question_type": "is this",
                "answers": [{"answer": "yes" if i < 3 else "no", "answer_id": i + 1} for i in range(10)],
            },
        ],
    }


def test_load_vqa_annotations(tmp_path):
    path = tmp_path / "v2_mscoco_val2014_annotations.json"
    path.write_text(json.dumps(_official_layout()))
    ann = load_vqa_annotations(path)
    assert ann.answers[458752000] == ["net"] * 10
    assert ann.answer_types == {458752000: "other", 458752001: "yes/no"}
    assert ann.question_types[458752001] == "is this"
    out = vqa_accuracy({458752000: "net", 458752001: "yes"}, ann.answers, answer_types=ann.answer_types)
    assert out["overall"] == pytest.approx((100.0 + 90.0) / 2)


def test_load_vqa_annotations_wrong_structure(tmp_path):
    bad_top = tmp_path / "questions_not_annotations.json"
    bad_top.write_text(json.dumps({"questions": []}))
    with pytest.raises(AnnotationFormatError, match="questions_not_annotations.json"):
        load_vqa_annotations(bad_top)

    layout = _official_layout()
    del layout["annotations"][1]["answers"]
    bad_rec = tmp_path / "broken_record.json"
    bad_rec.write_text(json.dumps(layout))
    with pytest.raises(AnnotationFormatError, match=r"broken_record\.json.*record #1 \(question_id=458752001\)"):
        load_vqa_annotations(bad_rec)

    not_json = tmp_path / "garbage.json"
    not_json.write_text("{not json")
    with pytest.raises(AnnotationFormatError, match="garbage.json"):
        load_vqa_annotations(not_json)


# ----------------------------------------------------------------------------------------------
# GQA, NLVR2, video QA


def test_gqa_accuracy():
    labels = {"q1": {"yes": 1.0}, "q2": {"dog": 1.0}, "q3": {"left": 1.0}}
    assert gqa_accuracy({"q1": "yes", "q2": "cat", "q3": "left"}, labels) == pytest.approx(200.0 / 3)
    assert gqa_accuracy({"q1": "Yes"}, labels) == 0.0  # exact match, no normalisation


def test_nlvr2_group_id():
    assert nlvr2_group_id("train-10171-0-0") == "train-10171--0"
    with pytest.raises(MetricError, match="train-10171-0"):
        nlvr2_group_id("train-10171-0")


def test_nlvr2_accuracy_and_consistency():
    labels = {"test1-0-0-0": 1, "test1-0-1-0": 0, "test1-1-0-1": 1, "test1-1-1-1": 1, "test1-2-0-2": 0}
    preds = {"test1-0-0-0": 1, "test1-0-1-0": False, "test1-1-0-1": 0, "test1-1-1-1": True, "test1-2-0-2": 0}
    out = nlvr2_scores(preds, labels)
    # correct: 4 of 5 -> 80. Groups: "test1-0--0" (both right), "test1-1--1" (one wrong),
    # "test1-2--2" (right) -> 2 of 3 consistent.
    assert out["accuracy"] == pytest.approx(80.0)
    assert out["consistency"] == pytest.approx(200.0 / 3)
    assert out["n_groups"] == 3

    # keyed by uid, with the identifier supplied separately
    uids = {f"nlvr2_test_{i}": ident for i, ident in enumerate(labels)}
    out2 = nlvr2_scores(
        {u: preds[i] for u, i in uids.items()}, {u: labels[i] for u, i in uids.items()}, group_of=uids
    )
    assert out2 == out


@pytest.mark.parametrize(
    "text, expected",
    [("a3", 3), (" A0 ", 0), ("a 4", 4), ("a2.", 2), ("a12", 12),
     ("3", None), ("", None), ("answer 3", None), ("a3 a4", None), ("ab", None), (None, None)],
)
def test_parse_choice(text, expected):
    assert parse_choice(text) == expected


def test_video_qa_accuracy_unparsable_is_wrong():
    preds = {1: "a3", 2: "a0", 3: "three", 4: "", 5: "a7"}
    labels = {1: 3, 2: 1, 3: 0, 4: 0, 5: "a7"}
    out = video_qa_accuracy(preds, labels, num_choices=5)
    # 1 right; 2 wrong; 3 and 4 unparsable (the official fallback to 0 would have scored them);
    # 5 is out of range for 5 choices.
    assert out["accuracy"] == pytest.approx(20.0)
    assert out["unparsable"] == [3, 4, 5]
    assert video_qa_accuracy(preds, labels)["unparsable"] == [3, 4]  # no range check


# ----------------------------------------------------------------------------------------------
# Captions

PREDS = {
    "img1": "A man riding a wave on top of a surfboard.",
    "img2": "Two dogs playing in the grass.",
    "img3": "A plate of food with broccoli and rice",
}
REFS = {
    "img1": ["A man riding a wave on top of a surfboard.", "A surfer rides a large wave.", "a person surfing in the ocean"],
    "img2": ["Two dogs are playing in the grass.", "Dogs run across a green lawn!", "two puppies playing outside"],
    "img3": ["A plate with rice, broccoli and chicken.", "A dish of food on a table.", "some food on a white plate"],
}


def test_cider_matches_pycocoevalcap_simple_tokens():
    from pycocoevalcap.cider.cider import Cider

    gts = {k: [simple_tokenize(r) for r in v] for k, v in REFS.items()}
    res = {k: [simple_tokenize(v)] for k, v in PREDS.items()}
    expected = 100.0 * Cider().compute_score(gts, res)[0]
    got = caption_scores(PREDS, REFS, metrics=("CIDEr",), tokenizer="simple")
    assert got == {"CIDEr": pytest.approx(expected)}


@needs_java
def test_cider_matches_pycocoevalcap_ptb():
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tok = PTBTokenizer()  # tokenised separately, as pycocoevalcap's eval.py does
    gts = tok.tokenize({k: [{"caption": r} for r in v] for k, v in REFS.items()})
    res = tok.tokenize({k: [{"caption": v}] for k, v in PREDS.items()})
    expected = 100.0 * Cider().compute_score(gts, res)[0]
    got = caption_scores(PREDS, REFS, metrics=("CIDEr", "BLEU-4", "ROUGE-L"), tokenizer="ptb")
    assert got["CIDEr"] == pytest.approx(expected)
    assert list(got) == ["CIDEr", "BLEU-4", "ROUGE-L"]


@needs_java
def test_simple_tokenizer_agrees_with_ptb_on_plain_captions():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    caps = [c for v in REFS.values() for c in v] + ["A man's dog doesn't bark.", "A t-shirt for 3.50 dollars"]
    ptb = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(caps)})
    assert [simple_tokenize(c) for c in caps] == [ptb[i][0] for i in range(len(caps))]


def test_bleu4_sanity():
    same = caption_scores({"a": REFS["img1"][0]}, {"a": REFS["img1"]}, metrics=("BLEU-4",), tokenizer="simple")
    assert same["BLEU-4"] == pytest.approx(100.0, abs=1e-6)
    disjoint = caption_scores({"a": "zebra zebra zebra zebra"}, {"a": REFS["img1"]}, metrics=("BLEU-4",), tokenizer="simple")
    assert disjoint["BLEU-4"] < 1e-3
    mixed = caption_scores(PREDS, REFS, metrics=("BLEU-1", "BLEU-4"), tokenizer="simple")
    assert 0.0 < mixed["BLEU-4"] < mixed["BLEU-1"] <= 100.0


def test_no_java_fallback_skips_java_metrics(monkeypatch):
    monkeypatch.setattr(captions_mod, "java_available", lambda: False)
    with pytest.warns(RuntimeWarning) as rec:
        got = caption_scores(PREDS, REFS, metrics=("CIDEr", "METEOR", "SPICE"))
    msgs = " ".join(str(w.message) for w in rec)
    assert "fallback" in msgs and "METEOR skipped" in msgs and "SPICE skipped" in msgs
    assert list(got) == ["CIDEr"]
    with pytest.raises(MissingDependencyError, match="Java"):
        caption_scores(PREDS, REFS, metrics=("CIDEr",), tokenizer="ptb")


def test_failing_optional_metric_warns(monkeypatch):
    monkeypatch.setattr(captions_mod, "java_available", lambda: True)

    def boom(gts, res):
        raise OSError("no network")

    monkeypatch.setattr(captions_mod, "_run_spice", boom)
    with pytest.warns(RuntimeWarning, match="SPICE skipped: OSError: no network"):
        got = caption_scores(PREDS, REFS, metrics=("CIDEr", "SPICE"), tokenizer="simple")
    assert list(got) == ["CIDEr"]


def test_caption_argument_errors(monkeypatch):
    with pytest.raises(MetricError, match="unknown caption metric"):
        caption_scores(PREDS, REFS, metrics=("CIDEr-D",))
    with pytest.raises(MetricKeyError, match="img9"):
        caption_scores({"img9": "a cat"}, REFS, metrics=("CIDEr",), tokenizer="simple")
    monkeypatch.setitem(sys.modules, "pycocoevalcap.cider.cider", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'vlpet\[demo\]'"):
        caption_scores(PREDS, REFS, metrics=("CIDEr",), tokenizer="simple")


def test_group_references_and_video_caption_scores():
    records = [
        {"clip": "c1", "id": "c1#0", "desc": "a man walks into the kitchen"},
        {"clip": "c2", "id": "c2#0", "desc": "a woman opens the door"},
        {"clip": "c1", "id": "c1#1", "desc": "a person enters a kitchen"},
        {"clip": "c2", "id": "c2#1", "desc": "she opens a door and leaves"},
    ]
    grouped = group_references(records, key_fn=lambda r: r["clip"], text_fn=lambda r: r["desc"])
    assert grouped == {
        "c1": ["a man walks into the kitchen", "a person enters a kitchen"],
        "c2": ["a woman opens the door", "she opens a door and leaves"],
    }
    assert group_references([{"k": 1, "descs": ["x", "y"]}], lambda r: r["k"], lambda r: r["descs"]) == {1: ["x", "y"]}

    preds = {"c1#0": "a man walks into a kitchen", "c1#1": "a man walks into a kitchen",
             "c2#0": "a woman opens a door", "c2#1": "a woman opens a door"}
    out = video_caption_scores(
        preds, records, example_id_fn=lambda r: r["id"], clip_id_fn=lambda r: r["clip"],
        text_fn=lambda r: r["desc"], metrics=("CIDEr", "BLEU-1"), tokenizer="simple",
    )
    single = caption_scores(preds, {r["id"]: [r["desc"]] for r in records}, ("CIDEr", "BLEU-1"), tokenizer="simple")
    multi = caption_scores({"c1": preds["c1#0"], "c2": preds["c2#0"]}, grouped, ("CIDEr", "BLEU-1"), tokenizer="simple")
    assert out["single_ref"] == pytest.approx(single)
    assert out["multi_ref"] == pytest.approx(multi)


# ----------------------------------------------------------------------------------------------
# Summary rows


def test_summarize_row_table2_avg():
    scores = {"VQA": 66.17, "GQA": 55.11, "NLVR2": 73.43, "COCO": 122.03}
    avg, row = summarize_row(scores, label="VL-PET-large")
    # (66.17 + 55.11 + 73.43 + 122.03) / 4 = 316.74 / 4 = 79.185 -> 79.19 (spec §5)
    assert avg == pytest.approx(79.185)
    assert row == "| VL-PET-large | 66.17 | 55.11 | 73.43 | 122.03 | 79.19 |"
    avg2, row2 = summarize_row(scores, tasks=["GQA", "VQA"])
    assert avg2 == pytest.approx((55.11 + 66.17) / 2) and row2 == "| 55.11 | 66.17 | 60.64 |"
    assert markdown_header(["VQA", "GQA"]).splitlines() == ["| Method | VQA | GQA | Avg |", "|---|---|---|---|"]
    with pytest.raises(MetricKeyError, match="TVQA"):
        summarize_row(scores, tasks=["VQA", "TVQA"])


def test_no_stray_warnings_on_plain_metrics():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vqa_accuracy({1: "yes"}, {1: ["yes"] * 10})
        caption_scores(PREDS, REFS, metrics=("CIDEr", "ROUGE-L"), tokenizer="simple")


@needs_java
@pytest.mark.skipif(not os.environ.get("VLPET_TEST_METEOR"), reason="METEOR takes ~50 s (two JVM starts); set VLPET_TEST_METEOR=1")
def test_meteor_matches_pycocoevalcap():
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": r} for r in v] for k, v in REFS.items()})
    res = tok.tokenize({k: [{"caption": v}] for k, v in PREDS.items()})
    expected = 100.0 * Meteor().compute_score(gts, res)[0]
    assert caption_scores(PREDS, REFS, metrics=("METEOR",), tokenizer="ptb")["METEOR"] == pytest.approx(expected)


def test_metric_errors_are_vlpet_errors():
    """The CLI prints a VLPetError as one line; a scorer's bad input is one, and keeps its old builtin base."""
    assert issubclass(MetricError, (VLPetError, ValueError)) and issubclass(MetricKeyError, KeyError)
    assert issubclass(AnnotationFormatError, MetricError)
    assert issubclass(MissingDependencyError, (VLPetError, ImportError, RuntimeError))


def test_a_non_str_prediction_is_a_metric_error_and_a_type_error():
    from vlpet.metrics.captions import tokenize_captions
    from vlpet.metrics.vqa import vqa_accuracy

    for call in (lambda: vqa_accuracy({1: 3}, {1: {"answers": [{"answer": "3"}] * 10}}),
                 lambda: tokenize_captions({1: 3}, {1: ["a cat"]}, tokenizer="simple")):
        with pytest.raises(TypeError, match="must be a str") as err:  # TypeError, as before MetricError existed
            call()
        assert isinstance(err.value, MetricError)
