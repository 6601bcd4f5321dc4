"""Exact-match metrics: GQA accuracy, NLVR2 accuracy and consistency, video QA accuracy (spec §5).

All scores are percents. Ids may be int or str; every prediction must have a label.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from ..errors import MetricError, MetricKeyError

__all__ = [
    "gqa_accuracy",
    "nlvr2_group_id",
    "nlvr2_scores",
    "parse_choice",
    "video_qa_accuracy",
]


def _label_for(labels: Mapping[Any, Any], key: Any, what: str) -> Any:
    if key in labels:
        return labels[key]
    raise MetricKeyError(f"no {what} label for predicted id {key!r}")


# --------------------------------------------------------------------------------------------
# GQA


def gqa_accuracy(predictions: Mapping[Any, str], labels: Mapping[Any, Mapping[str, float]]) -> float:
    """GQA exact-match accuracy: ``100 * sum(label.get(pred, 0)) / n``.

    ``labels`` maps question id -> the ``label`` dict of the annotation file (``{answer: score}``;
    one-hot for GQA, so this is plain accuracy). No answer normalisation, as in the official code.
    """
    if not predictions:
        return 0.0
    score = 0.0
    for qid, pred in predictions.items():
        score += float(_label_for(labels, qid, "GQA").get(pred, 0.0))
    return 100.0 * score / len(predictions)


# --------------------------------------------------------------------------------------------
# NLVR2


def nlvr2_group_id(identifier: str) -> str:
    """Consistency group of an NLVR2 example: the identifier with its third field blanked.

    ``"train-10171-0-0" -> "train-10171--0"`` (the examples of one sentence over several image
    pairs share a group).
    """
    parts = identifier.split("-")
    if len(parts) != 4:
        raise MetricError(
            f"NLVR2 identifier {identifier!r} must have 4 dash-separated fields, e.g. 'train-10171-0-0'"
        )
    parts[2] = ""
    return "-".join(parts)


def _as_label(v: Any, key: Any, what: str) -> int:
    if isinstance(v, str):
        s = v.strip().lower()
        if s in ("true", "1"):
            return 1
        if s in ("false", "0"):
            return 0
        raise MetricError(f"NLVR2 {what} for {key!r} must be 0/1, True/False or 'true'/'false', got {v!r}")
    iv = int(v)
    if iv not in (0, 1):
        raise MetricError(f"NLVR2 {what} for {key!r} must be 0 or 1, got {v!r}")
    return iv


def nlvr2_scores(
    predictions: Mapping[str, Any],
    labels: Mapping[str, Any],
    *,
    group_of: Mapping[str, str] | None = None,
) -> dict[str, float]:
    """NLVR2 accuracy and consistency (percents).

    ``predictions`` and ``labels`` map the example ``identifier`` (e.g. ``"test1-0-1-0"``) to 0/1
    (bools and "true"/"false" are accepted). Consistency is the share of groups
    (:func:`nlvr2_group_id`) in which every predicted example is correct. If the predictions are
    keyed by something else (e.g. the ``uid``), pass ``group_of``: key -> identifier.

    Returns ``{"accuracy", "consistency", "n", "n_groups"}``.
    """
    correct_by_group: dict[str, bool] = {}
    n_correct = 0
    for key, pred in predictions.items():
        ok = _as_label(pred, key, "prediction") == _as_label(_label_for(labels, key, "NLVR2"), key, "label")
        n_correct += ok
        ident = group_of[key] if group_of is not None else key
        g = nlvr2_group_id(str(ident))
        correct_by_group[g] = correct_by_group.get(g, True) and ok
    n = len(predictions)
    n_groups = len(correct_by_group)
    return {
        "accuracy": 100.0 * n_correct / n if n else 0.0,
        "consistency": 100.0 * sum(correct_by_group.values()) / n_groups if n_groups else 0.0,
        "n": n,
        "n_groups": n_groups,
    }


# --------------------------------------------------------------------------------------------
# Video QA (TVQA, How2QA): answers are generated as "a<k>"

_CHOICE = re.compile(r"\s*a\s*(\d+)\s*\.?\s*", re.IGNORECASE)


def parse_choice(text: str) -> int | None:
    """Parse a generated video-QA answer ``"a<k>"`` into ``k``; ``None`` when it is not one.

    Accepts surrounding whitespace, upper case, a space after the "a" and a trailing period
    ("a3", " A3 ", "a 3", "a3."). Anything else ("3", "answer 3", "a3 a4", "") is ``None``.
    The official code reads ``int(answer[1])`` and falls back to choice 0; we never guess.
    """
    if not isinstance(text, str):
        return None
    m = _CHOICE.fullmatch(text)
    return int(m.group(1)) if m else None


def video_qa_accuracy(
    predictions: Mapping[Any, str],
    labels: Mapping[Any, Any],
    *,
    num_choices: int | None = None,
) -> dict[str, Any]:
    """Accuracy (percent) of generated choices against the answer index.

    ``predictions``: id -> generated text ("a3"). ``labels``: id -> the answer index (int, or an
    "a<k>" string). An unparsable prediction (see :func:`parse_choice`), or with ``num_choices``
    an index outside ``[0, num_choices)``, counts as wrong and its id is listed in
    ``"unparsable"``; it is never mapped to choice 0.

    Returns ``{"accuracy", "n", "n_correct", "unparsable": [ids]}``.
    """
    n_correct = 0
    bad: list[Any] = []
    for qid, text in predictions.items():
        gold = _label_for(labels, qid, "video QA")
        if isinstance(gold, str):
            parsed_gold = parse_choice(gold)
            if parsed_gold is None:
                raise MetricError(f"video QA label for {qid!r} is not an index or 'a<k>': {gold!r}")
            gold = parsed_gold
        choice = parse_choice(text)
        if choice is None or (num_choices is not None and not 0 <= choice < num_choices):
            bad.append(qid)
            continue
        n_correct += int(choice == int(gold))
    n = len(predictions)
    return {
        "accuracy": 100.0 * n_correct / n if n else 0.0,
        "n": n,
        "n_correct": n_correct,
        "unparsable": bad,
    }
