"""VQA v2 accuracy (spec §5), written from the documented rules of the official VQA evaluation.

Answer normalisation, in the official order:

1. newlines and tabs become spaces, then outer whitespace is stripped;
2. punctuation (:func:`process_punctuation`): each character of :data:`PUNCTUATION` is deleted
   when the text contains a comma between two digits ("1,000") or when that character touches a
   space somewhere in the text ("yes !"); otherwise it is replaced by a space ("black/white" ->
   "black white"). Then every period that is *not followed by a digit* is deleted ("2.5" keeps
   its period, "yes." does not). The official pattern, ``(?!<=\\d)(\\.)(?!\\d)``, was meant to
   also keep a period *preceded* by a digit, but its first group is a look-ahead for the literal
   "<=" and never fires, so "not followed by a digit" is the rule that the published numbers
   follow; this module reproduces that effective rule;
3. digits and articles (:func:`process_digit_article`): lowercase, split on whitespace, number
   words "none"/"zero".."ten" become digits, the articles "a", "an", "the" are dropped, and each
   word found in :data:`CONTRACTIONS` is replaced ("dont" -> "don't"); words are joined by one
   space.

Scoring of one question (``evaluate_raw`` semantics): the prediction goes through 1-3. For each
of the (usually 10) ground-truth answers, the score is ``min(1, m / 3)`` where ``m`` is the number
of the *other* ground-truth answers equal to the prediction; the question's accuracy is the mean
of these leave-one-out scores. With ``n`` of 10 GTs equal to the prediction this gives
``(n * min(1, (n-1)/3) + (10-n) * min(1, n/3)) / 10``, e.g. 2 -> 0.6, 3 -> 0.9, 4 -> 1.0.

Ground-truth processing (``gt_processing``):

* ``"official"`` (default): as the official toolkit and the VL-T5/VL-PET ``evaluate_raw``, the GT
  answers go through step 2 (punctuation) only, and only when the GT answers of that question are
  not all identical. (VQA v2 GT answers are already normalised by the dataset's own pipeline, so
  this rarely matters.)
* ``"full"``: every GT answer goes through steps 1-3, like the prediction.

Unlike the official code, nothing here mutates its inputs (spec §8.2): the official evaluator
overwrites the GT strings each time it runs.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from ..errors import MetricError, MetricKeyError, MetricTypeError

__all__ = [
    "ARTICLES",
    "CONTRACTIONS",
    "NUMBER_WORDS",
    "PUNCTUATION",
    "AnnotationFormatError",
    "VQAAnnotations",
    "load_vqa_annotations",
    "normalize_vqa_answer",
    "parse_vqa_annotations",
    "process_digit_article",
    "process_punctuation",
    "vqa_accuracy",
    "vqa_question_accuracy",
    "vqa_topk_score",
]

#: Characters handled by the punctuation step. The period is handled separately; the apostrophe,
#: colon and others are deliberately absent (they are kept), as in the official list.
PUNCTUATION: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
    ",", "?", "!",
)

#: Number words mapped to digits (word-level, after lowercasing).
NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}

ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})


def _build_contractions() -> dict[str, str]:
    # canonical form -> the spellings (apostrophes dropped somewhere) that the standard VQA list
    # maps to it. Built as a table of variants so that the list is easy to audit.
    variants: dict[str, tuple[str, ...]] = {
        "ain't": ("aint",),
        "aren't": ("arent",),
        "can't": ("cant",),
        "could've": ("couldve",),
        "couldn't": ("couldnt",),
        "couldn't've": ("couldn'tve", "couldnt've"),
        "didn't": ("didnt",),
        "doesn't": ("doesnt",),
        "don't": ("dont",),
        "hadn't": ("hadnt",),
        "hadn't've": ("hadnt've", "hadn'tve"),
        "hasn't": ("hasnt",),
        "haven't": ("havent",),
        "he'd": ("hed",),
        "he'd've": ("hed've", "he'dve"),
        "he's": ("hes",),
        "how'd": ("howd",),
        "how'll": ("howll",),
        "how's": ("hows",),
        "isn't": ("isnt",),
        "it'd": ("itd",),
        "it'd've": ("itd've", "it'dve"),
        "it'll": ("itll",),
        "let's": ("let's",),
        "ma'am": ("maam",),
        "mightn't": ("mightnt",),
        "mightn't've": ("mightnt've", "mightn'tve"),
        "might've": ("mightve",),
        "mustn't": ("mustnt",),
        "must've": ("mustve",),
        "needn't": ("neednt",),
        "not've": ("notve",),
        "o'clock": ("oclock",),
        "oughtn't": ("oughtnt",),
        "'ow's'at": ("ow's'at", "'ows'at", "'ow'sat"),
        "shan't": ("shant",),
        "she'd've": ("shed've", "she'dve"),
        "she's": ("she's",),
        "should've": ("shouldve",),
        "shouldn't": ("shouldnt",),
        "shouldn't've": ("shouldnt've", "shouldn'tve"),
        "somebody'd've": ("somebodyd've", "somebody'dve"),
        "somebody'll": ("somebodyll",),
        "somebody's": ("somebodys",),
        "someone'd": ("someoned",),
        "someone'd've": ("someoned've", "someone'dve"),
        "someone'll": ("someonell",),
        "someone's": ("someones",),
        "something'd": ("somethingd",),
        "something'd've": ("somethingd've", "something'dve"),
        "something'll": ("somethingll",),
        "that's": ("thats",),
        "there'd": ("thered",),
        "there'd've": ("thered've", "there'dve"),
        "there're": ("therere",),
        "there's": ("theres",),
        "they'd": ("theyd",),
        "they'd've": ("theyd've", "they'dve"),
        "they'll": ("theyll",),
        "they're": ("theyre",),
        "they've": ("theyve",),
        "'twas": ("twas",),
        "wasn't": ("wasnt",),
        "we'd've": ("wed've", "we'dve"),
        "we've": ("weve",),
        "weren't": ("werent",),
        "what'll": ("whatll",),
        "what're": ("whatre",),
        "what's": ("whats",),
        "what've": ("whatve",),
        "when's": ("whens",),
        "where'd": ("whered",),
        "where's": ("wheres",),
        "where've": ("whereve",),
        "who'd": ("whod",),
        "who'd've": ("whod've", "who'dve"),
        "who'll": ("wholl",),
        "who's": ("whos",),
        "who've": ("whove",),
        "why'll": ("whyll",),
        "why're": ("whyre",),
        "why's": ("whys",),
        "won't": ("wont",),
        "would've": ("wouldve",),
        "wouldn't": ("wouldnt",),
        "wouldn't've": ("wouldnt've", "wouldn'tve"),
        "y'all": ("yall",),
        "y'all'll": ("yall'll", "y'allll"),
        "y'all'd've": ("yall'd've", "y'alld've", "y'all'dve"),
        "you'd": ("youd",),
        "you'd've": ("youd've", "you'dve"),
        "you'll": ("youll",),
        "you're": ("youre",),
        "you've": ("youve",),
    }
    table = {v: canon for canon, vs in variants.items() for v in vs}
    # Two quirks of the standard list, kept so that scores match the official evaluator:
    # it maps "somebody'd" the wrong way round (to "somebodyd"), and its entries "Id've", "I'dve",
    # "Im", "Ive" are capitalised, so after lowercasing they never match; they are left out here.
    table["somebody'd"] = "somebodyd"
    return table


#: The standard VQA contraction table (lowercase keys, applied word by word).
CONTRACTIONS: dict[str, str] = _build_contractions()

_COMMA_BETWEEN_DIGITS = re.compile(r"\d,\d")
# A period not followed by a digit (the effective official rule; see the module docstring).
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")


def process_punctuation(text: str) -> str:
    """Punctuation step of the official normalisation (see the module docstring)."""
    strip_all = _COMMA_BETWEEN_DIGITS.search(text) is not None
    out = text
    for p in PUNCTUATION:
        # The "touches a space" test reads the *input* text, the replacement acts on the output.
        if strip_all or (p + " " in text) or (" " + p in text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out)


def process_digit_article(text: str) -> str:
    """Lowercase; number words -> digits; drop articles; expand contractions; single spaces."""
    words = []
    for w in text.lower().split():
        w = NUMBER_WORDS.get(w, w)
        if w not in ARTICLES:
            words.append(w)
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def _clean_whitespace(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_vqa_answer(text: str) -> str:
    """Full official normalisation of an answer (whitespace, punctuation, digits/articles)."""
    return process_digit_article(process_punctuation(_clean_whitespace(text)))


_GT_MODES = ("official", "full")


def _process_gts(gts: Sequence[str], gt_processing: str) -> list[str]:
    if gt_processing == "full":
        return [normalize_vqa_answer(a) for a in gts]
    # "official": punctuation only, and only when the GT answers disagree.
    if len(set(gts)) > 1:
        return [process_punctuation(a) for a in gts]
    return list(gts)


def vqa_question_accuracy(
    prediction: str, gt_answers: Sequence[str], *, gt_processing: str = "official"
) -> float:
    """Accuracy in [0, 1] of one prediction against its GT answers (leave-one-out average)."""
    if gt_processing not in _GT_MODES:
        raise MetricError(f"gt_processing must be one of {_GT_MODES}, got {gt_processing!r}")
    if isinstance(gt_answers, str) or len(gt_answers) == 0:
        raise MetricError("gt_answers must be a non-empty sequence of answer strings")
    pred = normalize_vqa_answer(prediction)
    gts = _process_gts(gt_answers, gt_processing)
    matches = [g == pred for g in gts]
    total = sum(matches)
    # Leaving GT i out, the matching others number total - matches[i].
    return sum(min(1.0, (total - m) / 3.0) for m in matches) / len(gts)


def _lookup(mapping: Mapping[Any, Any], key: Any) -> Any:
    """mapping[key], also trying the int / str spelling of a question id."""
    if key in mapping:
        return mapping[key]
    alt: Any = None
    if isinstance(key, str) and key.strip().lstrip("-").isdigit():
        alt = int(key)
    elif isinstance(key, int):
        alt = str(key)
    if alt is not None and alt in mapping:
        return mapping[alt]
    raise KeyError(key)  # internal: the callers turn it into a MetricKeyError that names the id


def vqa_accuracy(
    predictions: Mapping[Any, str],
    annotations: Mapping[Any, Sequence[str]],
    *,
    answer_types: Mapping[Any, str] | None = None,
    question_types: Mapping[Any, str] | None = None,
    gt_processing: str = "official",
) -> dict[str, Any]:
    """Official VQA accuracy of ``predictions`` (question id -> answer string).

    ``annotations`` maps question id -> the GT answer strings (10 in VQA v2). Question ids may be
    int or str; "123" and 123 are treated as the same id. Every prediction must have annotations;
    annotated questions without a prediction are ignored (as in the official evaluator).

    Returns ``{"overall": percent, "n": number scored, "per_question": {qid: percent}}`` plus
    ``"per_answer_type"`` / ``"per_question_type"`` (type -> percent) when the types are given.
    Values are not rounded (the official code rounds to 2 decimals). Inputs are not modified.
    """
    if gt_processing not in _GT_MODES:
        raise MetricError(f"gt_processing must be one of {_GT_MODES}, got {gt_processing!r}")
    per_q: dict[Any, float] = {}
    by_atype: dict[str, list[float]] = {}
    by_qtype: dict[str, list[float]] = {}
    for qid, pred in predictions.items():
        try:
            gts = _lookup(annotations, qid)
        except KeyError:
            raise MetricKeyError(f"no VQA annotations for predicted question id {qid!r}") from None
        if not isinstance(pred, str):
            raise MetricTypeError(f"prediction for question {qid!r} must be a str, got {type(pred).__name__}")
        acc = vqa_question_accuracy(pred, gts, gt_processing=gt_processing)
        per_q[qid] = 100.0 * acc
        if answer_types is not None:
            by_atype.setdefault(_lookup(answer_types, qid), []).append(acc)
        if question_types is not None:
            by_qtype.setdefault(_lookup(question_types, qid), []).append(acc)

    n = len(per_q)
    result: dict[str, Any] = {
        "overall": (sum(per_q.values()) / n) if n else 0.0,
        "n": n,
        "per_question": per_q,
    }
    if answer_types is not None:
        result["per_answer_type"] = {t: 100.0 * sum(v) / len(v) for t, v in by_atype.items()}
    if question_types is not None:
        result["per_question_type"] = {t: 100.0 * sum(v) / len(v) for t, v in by_qtype.items()}
    return result


def vqa_topk_score(
    predictions: Mapping[Any, str],
    labels: Mapping[Any, Mapping[str, float]],
    *,
    average: bool = True,
) -> float:
    """The "topk" validation score: sum over questions of ``label.get(pred, 0)``.

    ``labels`` maps question id -> the soft-score dict of the VL-T5 annotation files
    (``{"answer": score}``). No normalisation: the prediction must equal a label key. With
    ``average=True`` (default) the sum is divided by the number of predictions and reported as a
    percent, which is how the official trainer logs it; ``average=False`` returns the raw sum.
    """
    total = 0.0
    for qid, pred in predictions.items():
        try:
            label = _lookup(labels, qid)
        except KeyError:
            raise MetricKeyError(f"no label dict for predicted question id {qid!r}") from None
        total += float(label.get(pred, 0.0))
    if not average:
        return total
    return 100.0 * total / len(predictions) if predictions else 0.0


# --------------------------------------------------------------------------------------------
# Loading the official annotation files (v2_mscoco_{train,val}2014_annotations.json)


class AnnotationFormatError(MetricError):
    """An annotation file (or object) does not have the expected structure."""


class VQAAnnotations(NamedTuple):
    """GT answers and types per question id, as built by :func:`load_vqa_annotations`."""

    answers: dict[int, list[str]]
    answer_types: dict[int, str]
    question_types: dict[int, str]


def parse_vqa_annotations(obj: Any, source: str = "<annotations>") -> VQAAnnotations:
    """Build :class:`VQAAnnotations` from the parsed official JSON structure.

    Expected: ``{"annotations": [{"question_id": int, "answers": [{"answer": str, ...}, ...],
    "answer_type": str, "question_type": str, ...}, ...]}``; the two types are optional.
    Raises :class:`AnnotationFormatError` naming ``source`` and the offending record.
    """

    def fail(msg: str) -> AnnotationFormatError:
        return AnnotationFormatError(f"{source}: {msg}")

    if not isinstance(obj, Mapping) or "annotations" not in obj:
        raise fail(
            "expected a JSON object with an 'annotations' list (the official VQA "
            f"v2_mscoco_*_annotations.json layout), got {type(obj).__name__}"
            + (f" with keys {sorted(obj)[:5]}" if isinstance(obj, Mapping) else "")
        )
    records = obj["annotations"]
    if not isinstance(records, list):
        raise fail(f"'annotations' must be a list, got {type(records).__name__}")

    answers: dict[int, list[str]] = {}
    atypes: dict[int, str] = {}
    qtypes: dict[int, str] = {}
    for i, rec in enumerate(records):
        where = f"record #{i}"
        if not isinstance(rec, Mapping):
            raise fail(f"{where} must be an object, got {type(rec).__name__}: {rec!r:.200}")
        if "question_id" not in rec:
            raise fail(f"{where} has no 'question_id': {dict(rec)!r:.200}")
        raw_qid = rec["question_id"]
        try:
            qid = int(raw_qid)
        except (TypeError, ValueError):
            raise fail(f"{where} has a non-integer question_id {raw_qid!r}") from None
        where = f"record #{i} (question_id={qid})"
        ans = rec.get("answers")
        if not isinstance(ans, list) or not ans:
            raise fail(f"{where} needs a non-empty 'answers' list, got {ans!r:.200}")
        texts = []
        for j, a in enumerate(ans):
            if not isinstance(a, Mapping) or not isinstance(a.get("answer"), str):
                raise fail(f"{where}: answers[{j}] must be an object with a string 'answer', got {a!r:.200}")
            texts.append(a["answer"])
        if qid in answers:
            raise fail(f"{where}: duplicate question_id")
        answers[qid] = texts
        for key, table in (("answer_type", atypes), ("question_type", qtypes)):
            if key in rec:
                if not isinstance(rec[key], str):
                    raise fail(f"{where}: '{key}' must be a string, got {rec[key]!r:.200}")
                table[qid] = rec[key]
    return VQAAnnotations(answers, atypes, qtypes)


def load_vqa_annotations(path: str | os.PathLike[str]) -> VQAAnnotations:
    """Read an official ``v2_mscoco_*_annotations.json`` file (see :func:`parse_vqa_annotations`)."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except json.JSONDecodeError as e:
        raise AnnotationFormatError(f"{path}: not valid JSON ({e})") from e
    return parse_vqa_annotations(obj, source=path)
