"""Validated readers for the image-text annotation files (spec §7.2).

Each reader returns a list of frozen dataclasses; anything malformed raises :class:`DataError`
naming the file, the record index (and id) and the field. An empty split is an error too.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from .errors import DataError

__all__ = [
    "VQARecord",
    "GQARecord",
    "NLVR2Record",
    "CocoImage",
    "VQAAnnotation",
    "load_json",
    "read_vqa",
    "read_gqa",
    "read_nlvr2",
    "read_coco_karpathy",
    "read_ans2label",
    "read_label2ans",
    "read_vqa_annotations",
    "nlvr_consistency_key",
    "KARPATHY_SPLITS",
]

KARPATHY_SPLITS = ("train", "restval", "val", "test")


# ------------------------------------------------------------------------------------------------
# records
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VQARecord:
    img_id: str
    sent: str
    question_id: int
    label: dict[str, float]  # answer -> soft score; may be empty (no answer in the vocabulary)
    answer_type: str | None = None
    question_type: str | None = None
    is_topk_optimal: bool | None = None


@dataclass(frozen=True)
class GQARecord:
    img_id: str
    sent: str
    question_id: str
    label: dict[str, float]


@dataclass(frozen=True)
class NLVR2Record:
    identifier: str  # "{split}-{set}-{pair}-{sentence}", e.g. "train-10171-0-0"
    img0: str
    img1: str
    label: int  # 1 = true, 0 = false
    sent: str
    uid: str

    @property
    def consistency_key(self) -> str:
        return nlvr_consistency_key(self.identifier)


@dataclass(frozen=True)
class CocoImage:
    img_id: str  # filename without extension
    filename: str
    split: str  # split as used here: restval is reported as "train" when merged
    karpathy_split: str  # the split written in dataset_coco.json
    refs: tuple[str, ...]  # the reference captions (stripped ``sentences[].raw``)


@dataclass(frozen=True)
class VQAAnnotation:
    question_id: int
    answers: tuple[str, ...]  # the 10 human answers, unnormalised
    answer_type: str
    question_type: str
    multiple_choice_answer: str | None = None


def nlvr_consistency_key(identifier: str) -> str:
    """The consistency group of an NLVR2 identifier: its third field (the pair id) blanked."""
    parts = identifier.split("-")
    if len(parts) != 4:
        raise ValueError(f"NLVR2 identifier {identifier!r} does not have 4 '-'-separated fields")
    parts[2] = ""
    return "-".join(parts)


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def load_json(path: str | os.PathLike, what: str = "JSON") -> Any:
    """``json.load`` with :class:`DataError` for a missing, unreadable or invalid file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, f"{what} file", got="no such file" if not path.exists() else "not a file")
    try:
        with open(path, "r", encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as e:
        # e.msg may end in "at" ("Unterminated string starting at"): a colon, not a second "at"
        raise DataError(path, f"valid JSON ({what})", got=f"{e.msg}: line {e.lineno} column {e.colno}") from e
    except UnicodeDecodeError as e:
        raise DataError(path, f"UTF-8 JSON ({what})", got=f"undecodable bytes at offset {e.start}") from e
    except OSError as e:
        raise DataError(path, f"a readable {what} file", got=f"{type(e).__name__}: {e}") from e


def _typename(v: Any) -> str:
    return type(v).__name__


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class _Rec:
    """Field access for record ``index`` of ``path`` with DataError messages."""

    def __init__(self, path: Path, index: int, rec: Any, id_field: str | None = None) -> None:
        self.path, self.index, self.rec = path, index, rec
        if not isinstance(rec, dict):
            raise DataError(path, "a JSON object per record", record=index, got=_typename(rec))
        self.rid = None
        if id_field is not None and id_field in rec and isinstance(rec[id_field], (str, int)):
            self.rid = f"{id_field}={rec[id_field]!r}"

    def err(self, field: str, expected: str, got: Any) -> DataError:
        return DataError(self.path, expected, record=self.index, record_id=self.rid, field=field, got=got)

    def _get(self, field: str, required: bool) -> tuple[bool, Any]:
        if field not in self.rec:
            if required:
                raise self.err(field, "the field to be present", "a record without it")
            return False, None
        return True, self.rec[field]

    def str(self, field: str, required: bool = True, nonempty: bool = False) -> str | None:
        present, v = self._get(field, required)
        if not present or (v is None and not required):
            return None
        if not isinstance(v, str):
            raise self.err(field, "a string", f"{_typename(v)} {v!r}"[:80])
        if nonempty and not v.strip():
            raise self.err(field, "a non-empty string", repr(v))
        return v

    def int(self, field: str, required: bool = True) -> int | None:
        present, v = self._get(field, required)
        if not present:
            return None
        if not _is_int(v):
            raise self.err(field, "an integer", f"{_typename(v)} {v!r}"[:80])
        return v

    def bool(self, field: str, required: bool = False) -> bool | None:
        present, v = self._get(field, required)
        if not present or v is None:
            return None
        if not isinstance(v, bool):
            raise self.err(field, "a boolean", f"{_typename(v)} {v!r}"[:80])
        return v

    def label(self, field: str = "label") -> dict[str, float]:
        _, v = self._get(field, True)
        expected = "a dict mapping answer strings to soft scores >= 0"
        if not isinstance(v, dict):
            raise self.err(field, expected, _typename(v))
        out: dict[str, float] = {}
        for a, s in v.items():
            if not isinstance(a, str) or not _is_num(s) or s < 0 or s != s:
                raise self.err(field, expected, f"entry {a!r}: {s!r}")
            out[a] = float(s)
        return out


def _records(path: Path, what: str) -> list:
    data = load_json(path, what)
    if not isinstance(data, list):
        raise DataError(path, f"a JSON list of records ({what})", got=_typename(data))
    if not data:
        raise DataError(path, f"a non-empty split ({what})", got="0 records")
    return data


def _check_unique(path: Path, field: str, values: Iterable) -> None:
    seen: dict = {}
    for i, v in enumerate(values):
        if v in seen:
            raise DataError(path, f"unique {field} values", record=i, record_id=f"{field}={v!r}",
                            field=field, got=f"a duplicate of record {seen[v]}")
        seen[v] = i


# ------------------------------------------------------------------------------------------------
# readers
# ------------------------------------------------------------------------------------------------
def read_vqa(path: str | os.PathLike) -> list[VQARecord]:
    """A VQA Karpathy split (``vqa/karpathy_*.json``)."""
    path = Path(path)
    out = []
    for i, raw in enumerate(_records(path, "VQA split")):
        r = _Rec(path, i, raw, "question_id")
        out.append(
            VQARecord(
                img_id=r.str("img_id", nonempty=True),
                sent=r.str("sent"),
                question_id=r.int("question_id"),
                label=r.label(),
                answer_type=r.str("answer_type", required=False),
                question_type=r.str("question_type", required=False),
                is_topk_optimal=r.bool("is_topk_optimal"),
            )
        )
    _check_unique(path, "question_id", (x.question_id for x in out))
    return out


def read_gqa(path: str | os.PathLike) -> list[GQARecord]:
    """A GQA split (``GQA/{train,valid,testdev}.json``); ``question_id`` is a string."""
    path = Path(path)
    out = []
    for i, raw in enumerate(_records(path, "GQA split")):
        r = _Rec(path, i, raw, "question_id")
        out.append(
            GQARecord(
                img_id=r.str("img_id", nonempty=True),
                sent=r.str("sent"),
                question_id=r.str("question_id", nonempty=True),
                label=r.label(),
            )
        )
    _check_unique(path, "question_id", (x.question_id for x in out))
    return out


def read_nlvr2(path: str | os.PathLike) -> list[NLVR2Record]:
    """An NLVR2 split (``nlvr/{train,valid,test}.json``)."""
    path = Path(path)
    out = []
    for i, raw in enumerate(_records(path, "NLVR2 split")):
        r = _Rec(path, i, raw, "uid")
        identifier = r.str("identifier", nonempty=True)
        if len(identifier.split("-")) != 4:
            raise r.err("identifier", "'{split}-{set}-{pair}-{sentence}' (4 fields)", repr(identifier))
        label = r.int("label")
        if label not in (0, 1):
            raise r.err("label", "0 or 1", repr(label))
        out.append(
            NLVR2Record(
                identifier=identifier,
                img0=r.str("img0", nonempty=True),
                img1=r.str("img1", nonempty=True),
                label=label,
                sent=r.str("sent"),
                uid=r.str("uid", nonempty=True),
            )
        )
    _check_unique(path, "uid", (x.uid for x in out))
    return out


def read_coco_karpathy(
    path: str | os.PathLike, splits: str | Iterable[str], merge_restval: bool = True
) -> list[CocoImage]:
    """Images of ``COCO/dataset_coco.json`` whose Karpathy split is in ``splits``.

    With ``merge_restval`` (the default, as in the official loaders) ``"train"`` also selects the
    ``restval`` images, which are then reported with ``split="train"``.
    """
    path = Path(path)
    wanted = {splits} if isinstance(splits, str) else set(splits)
    bad = wanted - set(KARPATHY_SPLITS)
    if bad:
        raise DataError(path, f"Karpathy splits in {list(KARPATHY_SPLITS)}", got=sorted(bad))
    if merge_restval and "train" in wanted:
        wanted.add("restval")
    data = load_json(path, "COCO Karpathy")
    if not isinstance(data, dict) or "images" not in data:
        raise DataError(path, "a JSON object with an 'images' list", field="images",
                        got=_typename(data) if not isinstance(data, dict) else f"keys {sorted(data)[:5]}")
    images = data["images"]
    if not isinstance(images, list):
        raise DataError(path, "a list", field="images", got=_typename(images))
    out = []
    for i, raw in enumerate(images):
        r = _Rec(path, i, raw, "filename")
        filename = r.str("filename", nonempty=True)
        ksplit = r.str("split")
        if ksplit not in KARPATHY_SPLITS:
            raise r.err("split", f"one of {list(KARPATHY_SPLITS)}", repr(ksplit))
        if ksplit not in wanted:
            continue
        sents = raw.get("sentences")
        if not isinstance(sents, list) or not sents:
            raise r.err("sentences", "a non-empty list of {raw: ...}", _typename(sents) if sents is not None else "missing")
        refs = []
        for k, s in enumerate(sents):
            if not isinstance(s, dict) or not isinstance(s.get("raw"), str):
                raise r.err(f"sentences[{k}].raw", "a string", _typename(s.get("raw") if isinstance(s, dict) else s))
            refs.append(s["raw"].strip())
        split = "train" if (merge_restval and ksplit == "restval") else ksplit
        out.append(CocoImage(os.path.splitext(filename)[0], filename, split, ksplit, tuple(refs)))
    if not out:
        raise DataError(path, f"images in Karpathy split(s) {sorted(wanted)}", got="none")
    _check_unique(path, "filename", (x.filename for x in out))
    return out


def read_ans2label(path: str | os.PathLike) -> dict[str, int]:
    data = load_json(path, "ans2label")
    path = Path(path)
    if not isinstance(data, dict) or not data:
        raise DataError(path, "a non-empty JSON object answer -> label index", got=_typename(data) if not isinstance(data, dict) else "{}")
    for a, k in data.items():
        if not _is_int(k):
            raise DataError(path, "integer label indices", field=a, got=repr(k))
    return dict(data)


def read_label2ans(path: str | os.PathLike) -> list[str]:
    data = load_json(path, "label2ans")
    path = Path(path)
    if not isinstance(data, list) or not data:
        raise DataError(path, "a non-empty JSON list of answers", got=_typename(data) if not isinstance(data, list) else "[]")
    for i, a in enumerate(data):
        if not isinstance(a, str):
            raise DataError(path, "answer strings", record=i, got=_typename(a))
    return list(data)


def read_vqa_annotations(path: str | os.PathLike) -> dict[int, VQAAnnotation]:
    """Official VQA v2 annotations (``v2_mscoco_*2014_annotations.json``) keyed by question_id."""
    path = Path(path)
    data = load_json(path, "VQA annotations")
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise DataError(path, "a JSON object with an 'annotations' list", field="annotations",
                        got=_typename(data.get("annotations")) if isinstance(data, dict) else _typename(data))
    anns = data["annotations"]
    if not anns:
        raise DataError(path, "at least one annotation", field="annotations", got="0")
    out: dict[int, VQAAnnotation] = {}
    for i, raw in enumerate(anns):
        r = _Rec(path, i, raw, "question_id")
        qid = r.int("question_id")
        answers = raw.get("answers")
        if not isinstance(answers, list) or not answers:
            raise r.err("answers", "a non-empty list of {answer, ...}", _typename(answers) if answers is not None else "missing")
        texts = []
        for k, a in enumerate(answers):
            if not isinstance(a, dict) or not isinstance(a.get("answer"), str):
                raise r.err(f"answers[{k}].answer", "a string", _typename(a.get("answer") if isinstance(a, dict) else a))
            texts.append(a["answer"])
        if qid in out:
            raise r.err("question_id", "unique question ids", "a duplicate")
        out[qid] = VQAAnnotation(
            question_id=qid,
            answers=tuple(texts),
            answer_type=r.str("answer_type"),
            question_type=r.str("question_type"),
            multiple_choice_answer=r.str("multiple_choice_answer", required=False),
        )
    return out

