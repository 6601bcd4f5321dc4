"""Video-text tasks in the VALUE layout (spec §3.9, §5, §7.4): TVQA, How2QA, TVC and YC2C.

Files, under ``<data_root>/video/``::

    ann/{tv,how2,yc2}_subtitles.jsonl                    {vid_name, sub: [{text, start, end}]}
    ann/tvqa/tvqa_{train,val,test_public,test_release}.jsonl
    ann/how2qa/how2qa_{train_release,val_release,test_public_release}.jsonl
    ann/tvc/tvc_{train_release,val_release,test_release}.jsonl
    ann/yc2c/yc2c_{train_release,val_release,test_release}.jsonl
    vis_features/{tv,how2,yc2}/clip-vit/{vid_name}.npz  key "features", [T, 512] CLIP-ViT frames

=======  =====================  ====================  ===============================  =========
task     train                  val                   test                             features
=======  =====================  ====================  ===============================  =========
tvqa     train                  val                   test_public + test_release       tv
how2qa   train_release          val_release           test_public_release              how2
tvc      train_release          val_release           test_release (no descs)          tv
yc2c     train_release          val_release           test_release (no descs)          yc2
=======  =====================  ====================  ===============================  =========

Inputs (spec §3.9), per example:

* **Frames.** Every video becomes exactly ``n_frames = 64`` visual tokens (:func:`resize_frames`):
  zero-padded at the end when shorter, adaptive max pooling over time when longer
  (``F.adaptive_max_pool1d``: frame ``i`` is the max over ``[floor(i*T/64), ceil((i+1)*T/64))``).
  ``vis_mask`` marks the real frames. Unlike the official code, padded frames are **masked out of
  attention by default**; ``mask_padded_frames=False`` gives the official behaviour (the mask is
  then all ones, so the batch keys stay the same).
* **Text**, exactly as the official loaders build it (:func:`video_input_text`)::

      subs    = "[Subs] " + " ".join(t.strip() for t in subtitle texts)     # "[Subs] " when none
      QA      = " ".join([subs, f"[Q] {q.strip()}", f"[TS] ({ts})",
                          "[Choices] " + " ".join(f"a{i}: {choice.strip('. ')}." for each choice)])
      TVC     = " ".join([subs, f"[TS] ({ts})"])
      YC2C    = subs
      encoder text = f"{sent} {prompt}"      # prompt "tvqa: " / "how2qa: " / "tvc: " / "yc2c: "

  So one space separates the text from the prompt, and the text **ends with the prompt's
  trailing space** (a lone "Ġ" token for BART's byte-level BPE; T5's sentencepiece drops it).
  ``ts`` is written as Python formats the JSON value: TVQA's string ``"76.01-84.2"`` gives
  ``(76.01-84.2)``, TVC's list ``[5.8, 8.24]`` gives ``([5.8, 8.24])``. Choice texts lose leading
  and trailing dots and spaces, then get one ``"."``. Without prompts (``use_prompts=False``) the
  text ends with ``" "``, as in the official code.
* **Truncation** to 600 tokens, special tokens included. ``truncation="end"`` (default, official)
  cuts the end of the text, i.e. the prompt, choices and question go first when subtitles are
  long; ``truncation="subtitles"`` instead drops subtitle words from the end until the text fits,
  so the question, choices and prompt always survive.
* **Subtitles** are looked up by ``vid_name``; a video without a subtitle line gets empty
  subtitles (the official loader raises ``KeyError``), and :attr:`VideoDataset.missing_subtitles`
  counts them.

Targets: QA answers are ``"a<k>"`` (max 20 tokens); captions use one example per description in
training (max 20 tokens) and one example per clip for evaluation, whose ``targets`` are all the
clip's descriptions (the clip's text and frames do not depend on the description, so predicting
once per clip gives the official per-description predictions too).

Prediction files follow VALUE's submission format (VALUE-Leaderboard/EvaluationTools):
QA ``{"<qid>": answer_idx, ...}`` in one ``.json``; captioning one JSON object per line
(``.jsonl``) ``{"video_id": vid_name, "vid_name": vid_name, "clip_id": clip_id,
"descs": [{"desc": caption}]}`` (VALUE reads ``clip_id`` and ``descs[0].desc``; ``video_id`` is
VALUE's sample key, ``vid_name`` the official VL-PET dump's). See :func:`value_submission`.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .base import ImageTextDataset, _encode
from .errors import DataError
from .layout import VLAdapterLayout, resolve_data_root
from .records import _Rec, _typename
from .tasks import VIDEO_TASKS, task_entry, task_names

__all__ = [
    "VIDEO_TASKS",
    "VIDEO_QA_TASKS",
    "VIDEO_CAPTION_TASKS",
    "N_FRAMES",
    "VIDEO_FEAT_DIM",
    "VideoTaskInfo",
    "VIDEO_TASK_INFO",
    "VideoQARecord",
    "VideoCaptionClip",
    "VideoDesc",
    "VideoFeatureDir",
    "VideoDataset",
    "VideoQADataset",
    "VideoCaptionDataset",
    "video_ann_path",
    "video_subtitles_path",
    "read_jsonl",
    "read_subtitles",
    "read_video_qa",
    "read_video_captions",
    "resize_frames",
    "subtitle_text",
    "video_input_text",
    "encode_video_text",
    "build_video_dataset",
    "score_video_task",
    "value_submission",
    "value_prediction_filename",
    "write_value_predictions",
]

# From the task registry (data/tasks.py); VIDEO_TASK_INFO below adds the VALUE-layout details per task.
VIDEO_QA_TASKS = task_names("video", "qa")
VIDEO_CAPTION_TASKS = task_names("video", "caption")
N_FRAMES = 64
VIDEO_FEAT_DIM = 512
TRUNCATIONS = ("end", "subtitles")


@dataclass(frozen=True)
class VideoTaskInfo:
    name: str
    source: str  # subtitles file and feature folder: tv | how2 | yc2
    n_choices: int | None  # QA only
    uses_ts: bool  # "[TS] (<ts>)" in the text
    file_splits: tuple[str, ...]  # every annotation file split that exists

    @property
    def kind(self) -> str:
        """The output kind ("qa" | "caption"), from the task registry."""
        return task_entry(self.name).kind


VIDEO_TASK_INFO = {
    "tvqa": VideoTaskInfo("tvqa", "tv", 5, True, ("train", "val", "test_public", "test_release")),
    "how2qa": VideoTaskInfo("how2qa", "how2", 4, True,
                            ("train_release", "val_release", "test_public_release")),
    "tvc": VideoTaskInfo("tvc", "tv", None, True, ("train_release", "val_release", "test_release")),
    "yc2c": VideoTaskInfo("yc2c", "yc2", None, False, ("train_release", "val_release", "test_release")),
}


# ------------------------------------------------------------------------------------------------
# records
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VideoQARecord:
    qid: int | str
    vid_name: str
    q: str
    choices: tuple[str, ...]  # a0, a1, ...
    answer_idx: int | None  # None in the test files
    ts: Any  # the JSON value, rendered with str() ("76.01-84.2" in TVQA)
    show_name: str | None = None


@dataclass(frozen=True)
class VideoDesc:
    desc: str
    desc_id: int | str | None = None
    type: str | None = None


@dataclass(frozen=True)
class VideoCaptionClip:
    clip_id: int | str
    vid_name: str
    duration: float | None
    ts: Any  # TVC: [start, end]; None for YC2C
    descs: tuple[VideoDesc, ...]  # empty in the test files

    @property
    def refs(self) -> tuple[str, ...]:
        return tuple(d.desc for d in self.descs)


# ------------------------------------------------------------------------------------------------
# paths
# ------------------------------------------------------------------------------------------------
def video_subtitles_path(layout: VLAdapterLayout, source: str) -> Path:
    """``video/ann/{tv,how2,yc2}_subtitles.jsonl``."""
    if source not in ("tv", "how2", "yc2"):
        raise DataError(layout.video_ann_dir, "a subtitle source in ['tv', 'how2', 'yc2']", got=repr(source))
    return layout.video_ann_dir / f"{source}_subtitles.jsonl"


def video_ann_path(layout: VLAdapterLayout, task: str, file_split: str) -> Path:
    """``video/ann/<task>/<task>_<file_split>.jsonl``; ``file_split`` must be one VALUE ships."""
    info = VIDEO_TASK_INFO[task]
    folder = layout.video_ann_dir / task
    if file_split not in info.file_splits:
        raise DataError(folder, f"a {task} split in {list(info.file_splits)} (or train / val / test)",
                        got=repr(file_split))
    return folder / f"{task}_{file_split}.jsonl"


# ------------------------------------------------------------------------------------------------
# readers
# ------------------------------------------------------------------------------------------------
def read_jsonl(path: str | os.PathLike, what: str = "JSON lines") -> list[tuple[int, Any]]:
    """``[(line_number, object), ...]`` of a ``.jsonl`` file (blank lines skipped); DataError for a
    missing file, undecodable bytes or a line that is not JSON."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, f"a {what} file (.jsonl)", got="no such file" if not path.exists() else "not a file")
    out = []
    try:
        with open(path, "r", encoding="utf-8") as fh:
            for n, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    out.append((n, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise DataError(path, f"one JSON object per line ({what})", record_id=f"line {n}",
                                    got=f"{e.msg}: column {e.colno}") from e  # e.msg may end in "at"
    except UnicodeDecodeError as e:
        raise DataError(path, f"UTF-8 JSON lines ({what})", got=f"undecodable bytes at offset {e.start}") from e
    except OSError as e:
        raise DataError(path, f"a readable {what} file", got=f"{type(e).__name__}: {e}") from e
    return out


class _Line(_Rec):
    """Field access for one line of a .jsonl file: the record index is the 0-based line index among
    the records, and the record id names the line number too."""

    def __init__(self, path: Path, index: int, line: int, rec: Any, id_field: str | None = None) -> None:
        super().__init__(path, index, rec, id_field)
        self.rid = f"{self.rid}, line {line}" if self.rid else f"line {line}"

    def id(self, field: str) -> int | str:
        present, v = self._get(field, True)
        if isinstance(v, bool) or not isinstance(v, (int, str)) or (isinstance(v, str) and not v.strip()):
            raise self.err(field, "an integer or a non-empty string id", f"{_typename(v)} {v!r}"[:80])
        return v

    def ts(self, field: str = "ts") -> Any:
        present, v = self._get(field, True)
        ok = isinstance(v, str) or (isinstance(v, (int, float)) and not isinstance(v, bool)) or (
            isinstance(v, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v))
        if not ok:
            raise self.err(field, "a timestamp: a string such as '76.01-84.2' or a list of numbers",
                           f"{_typename(v)} {v!r}"[:80])
        return v

    def number(self, field: str, required: bool = False) -> float | None:
        present, v = self._get(field, required)
        if not present or v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise self.err(field, "a number", f"{_typename(v)} {v!r}"[:80])
        return float(v)


_SUBTITLE_CACHE: dict[tuple[str, int, int], dict[str, tuple[str, ...]]] = {}


def read_subtitles(path: str | os.PathLike) -> dict[str, tuple[str, ...]]:
    """``{vid_name: (text, ...)}`` from ``{tv,how2,yc2}_subtitles.jsonl`` (only ``text`` is used,
    as in the official loaders; a later line for the same video replaces an earlier one, as there).
    Cached per file (path, size, mtime), since TVQA and TVC share the large TV file."""
    path = Path(path)
    try:
        st = path.stat()
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    except OSError:
        key = None
    if key is not None and key in _SUBTITLE_CACHE:
        return _SUBTITLE_CACHE[key]
    out: dict[str, tuple[str, ...]] = {}
    for i, (line, raw) in enumerate(read_jsonl(path, "subtitles")):
        r = _Line(path, i, line, raw, "vid_name")
        vid = r.str("vid_name", nonempty=True)
        _, subs = r._get("sub", True)
        if not isinstance(subs, list):
            raise r.err("sub", "a list of {text, start, end} objects", _typename(subs))
        texts = []
        for j, s in enumerate(subs):
            if not isinstance(s, dict) or not isinstance(s.get("text"), str):
                raise r.err(f"sub[{j}].text", "a subtitle object with a string 'text'", repr(s)[:80])
            texts.append(s["text"])
        out[vid] = tuple(texts)
    if key is not None:
        if len(_SUBTITLE_CACHE) > 8:
            _SUBTITLE_CACHE.clear()
        _SUBTITLE_CACHE[key] = out
    return out


def _check_unique(path: Path, field: str, values) -> None:
    seen: dict = {}
    for i, v in enumerate(values):
        if v in seen:
            raise DataError(path, f"unique {field} values", record=i, record_id=f"{field}={v!r}", field=field,
                            got=f"a duplicate of record {seen[v]}")
        seen[v] = i


def read_video_qa(path: str | os.PathLike, task: str = "tvqa") -> list[VideoQARecord]:
    """A TVQA (5 choices) or How2QA (4 choices) split: ``{qid, vid_name, q, a0.., answer_idx, ts}``.
    ``answer_idx`` may be absent (test files) but, when present, must index a choice."""
    path = Path(path)
    n = VIDEO_TASK_INFO[task].n_choices
    out = []
    lines = read_jsonl(path, f"{task} split")
    if not lines:
        raise DataError(path, f"a non-empty split ({task})", got="0 records")
    for i, (line, raw) in enumerate(lines):
        r = _Line(path, i, line, raw, "qid")
        qid = r.id("qid")
        choices = tuple(r.str(f"a{k}") for k in range(n))
        ans = r.int("answer_idx", required=False)
        if ans is not None and not 0 <= ans < n:
            raise r.err("answer_idx", f"an index in [0, {n})", repr(ans))
        out.append(VideoQARecord(qid=qid, vid_name=r.str("vid_name", nonempty=True), q=r.str("q"), choices=choices,
                                 answer_idx=ans, ts=r.ts(), show_name=r.str("show_name", required=False)))
    _check_unique(path, "qid", (x.qid for x in out))
    return out


def read_video_captions(path: str | os.PathLike, task: str = "tvc") -> list[VideoCaptionClip]:
    """A TVC / YC2C split: one clip per line ``{vid_name, duration, [ts,] clip_id, descs: [{desc,
    desc_id[, type]}]}``; ``descs`` is absent in the test files. TVC clips need ``ts``."""
    path = Path(path)
    info = VIDEO_TASK_INFO[task]
    lines = read_jsonl(path, f"{task} split")
    if not lines:
        raise DataError(path, f"a non-empty split ({task})", got="0 records")
    out = []
    for i, (line, raw) in enumerate(lines):
        r = _Line(path, i, line, raw, "clip_id")
        clip_id = r.id("clip_id")
        descs: list[VideoDesc] = []
        present, ds = r._get("descs", False)
        if present:
            if not isinstance(ds, list):
                raise r.err("descs", "a list of {desc, desc_id} objects", _typename(ds))
            for j, d in enumerate(ds):
                if not isinstance(d, dict):
                    raise r.err(f"descs[{j}]", "a {desc, desc_id} object", _typename(d))
                text = d.get("desc")
                if not isinstance(text, str) or not text.strip():
                    raise r.err(f"descs[{j}].desc", "a non-empty string", repr(text)[:80])
                did = d.get("desc_id")
                if did is not None and (isinstance(did, bool) or not isinstance(did, (int, str))):
                    raise r.err(f"descs[{j}].desc_id", "an integer or string id", repr(did)[:80])
                typ = d.get("type")
                descs.append(VideoDesc(text, did, typ if isinstance(typ, str) else None))
        out.append(VideoCaptionClip(clip_id=clip_id, vid_name=r.str("vid_name", nonempty=True),
                                    duration=r.number("duration"), ts=r.ts() if info.uses_ts else None,
                                    descs=tuple(descs)))
    _check_unique(path, "clip_id", (x.clip_id for x in out))
    return out


# ------------------------------------------------------------------------------------------------
# frames
# ------------------------------------------------------------------------------------------------
def resize_frames(feats, n_frames: int = N_FRAMES) -> tuple[np.ndarray, np.ndarray]:
    """[T, D] frame features -> ([n_frames, D] float32, [n_frames] int64 mask of real frames).

    T < n: the T frames, then zero rows (mask 0). T > n: ``adaptive_max_pool1d`` over time, output
    frame i = max over frames [floor(i*T/n), ceil((i+1)*T/n)) (all mask 1). T = n: unchanged.
    """
    import torch
    import torch.nn.functional as F

    arr = np.asarray(feats, dtype=np.float32)
    if arr.ndim != 2 or arr.shape[0] < 1:
        raise ValueError(f"frame features must be [T >= 1, D], got shape {arr.shape}")
    t, d = arr.shape
    mask = np.zeros(n_frames, dtype=np.int64)
    if t <= n_frames:
        out = np.zeros((n_frames, d), dtype=np.float32)
        out[:t] = arr
        mask[:t] = 1
        return out, mask
    pooled = F.adaptive_max_pool1d(torch.from_numpy(np.ascontiguousarray(arr.T))[None], n_frames)[0].T
    mask[:] = 1
    return np.ascontiguousarray(pooled.numpy()), mask


class VideoFeatureDir:
    """``video/vis_features/<source>/clip-vit/{vid_name}.npz`` files, read with :func:`read_npz_video`."""

    def __init__(self, directory: str | os.PathLike, expected_dim: int | None = VIDEO_FEAT_DIM) -> None:
        self.directory = Path(directory)
        self.expected_dim = expected_dim

    def path(self, vid_name: str) -> Path:
        return self.directory / f"{vid_name}.npz"

    def load(self, vid_name: str) -> np.ndarray:
        from .features import read_npz_video

        return read_npz_video(self.path(vid_name), self.expected_dim)

    def __repr__(self) -> str:
        return f"VideoFeatureDir({str(self.directory)!r}, expected_dim={self.expected_dim})"


# ------------------------------------------------------------------------------------------------
# text
# ------------------------------------------------------------------------------------------------
def subtitle_text(texts: Sequence[str]) -> str:
    """``"[Subs] " + " ".join(t.strip() for t in texts)`` (``"[Subs] "`` when there are none)."""
    return "[Subs] " + " ".join(t.strip() for t in texts)


def video_input_text(task: str, subtitles: Sequence[str] | str, *, prompt: str = "", q: str | None = None,
                     choices: Sequence[str] | None = None, ts: Any = None) -> str:
    """The encoder text of one example, exactly as the official video loaders build it (see the
    module docstring). ``subtitles``: the subtitle texts, or an already joined ``"[Subs] ..."``."""
    info = VIDEO_TASK_INFO[task]
    subs = subtitles if isinstance(subtitles, str) else subtitle_text(subtitles)
    parts = [subs]
    if info.kind == "qa":
        if q is None or choices is None:
            raise ValueError(f"{task} text needs q and choices")
        parts += [f"[Q] {q.strip()}", f"[TS] ({ts})",
                  "[Choices] " + " ".join(f"a{i}: {c.strip('. ')}." for i, c in enumerate(choices))]
    elif info.uses_ts:
        parts.append(f"[TS] ({ts})")
    return f"{' '.join(parts)} {prompt}"


def encode_video_text(tokenizer, task: str, subtitles: Sequence[str], max_len: int | None, truncation: str = "end",
                      **text_kw) -> tuple[list[int], str]:
    """(token ids, text) of one example; see the module docstring for the two truncation modes."""
    if truncation not in TRUNCATIONS:
        raise ValueError(f"truncation must be one of {TRUNCATIONS}, got {truncation!r}")
    text = video_input_text(task, subtitles, **text_kw)
    if truncation == "end" or not max_len:
        return _encode(tokenizer, text, max_len), text
    full = _encode(tokenizer, text, None)
    if len(full) <= max_len:
        return full, text
    words = " ".join(t.strip() for t in subtitles).split()
    lo, hi = 0, len(words)  # the largest k whose text fits: binary search over subtitle words kept
    fits = None
    while lo <= hi:
        mid = (lo + hi) // 2
        cand = video_input_text(task, "[Subs] " + " ".join(words[:mid]), **text_kw)
        ids = _encode(tokenizer, cand, None)
        if len(ids) <= max_len:
            fits, lo = (ids, cand), mid + 1
        else:
            hi = mid - 1
    if fits is None:  # even without subtitles it is too long: cut the end
        return _encode(tokenizer, text, max_len), text
    return fits[0], fits[1]


# ------------------------------------------------------------------------------------------------
# datasets
# ------------------------------------------------------------------------------------------------


class VideoDataset(ImageTextDataset):
    """Base of the video datasets. ``feature_dirs`` = ``{source: VideoFeatureDir}``."""

    def __init__(self, spec, items, tokenizer, feature_dirs, *, mode: str, seed: int = 0, split: str = "",
                 subtitles: Mapping[str, Sequence[str]] | None = None, n_frames: int = N_FRAMES,
                 mask_padded_frames: bool = True, truncation: str = "end") -> None:
        super().__init__(spec, items, tokenizer, feature_dirs, mode=mode, seed=seed, split=split)
        if truncation not in TRUNCATIONS:
            raise ValueError(f"truncation must be one of {TRUNCATIONS}, got {truncation!r}")
        self.info = VIDEO_TASK_INFO[self.task]
        self.subtitles = subtitles or {}
        self.n_frames = int(n_frames)
        self.mask_padded_frames = bool(mask_padded_frames)
        self.truncation = truncation
        self._text_cache: dict[Any, tuple[list[int], str]] = {}
        self.missing_subtitles = len({v for v in self.video_names() if v not in self.subtitles})

    def video_names(self) -> list[str]:
        raise NotImplementedError

    def image_ids(self):
        return [(self.info.source, v) for v in self.video_names()]

    def frames(self, vid_name: str) -> tuple[np.ndarray, np.ndarray]:
        feats, mask = resize_frames(self.feature_dirs[self.info.source].load(vid_name), self.n_frames)
        if not self.mask_padded_frames:
            mask = np.ones_like(mask)
        return feats, mask

    def _text(self, key, vid_name: str, **kw) -> tuple[list[int], str]:
        if key not in self._text_cache:
            self._text_cache[key] = encode_video_text(
                self.tokenizer, self.task, self.subtitles.get(vid_name, ()), self.spec.max_text_len,
                self.truncation, prompt=self.spec.prompt, **kw)
        return self._text_cache[key]

    def _base(self, vid_name: str, ids: list[int], text: str, target: str) -> dict[str, Any]:
        feats, mask = self.frames(vid_name)
        return {
            "task": self.task,
            "input_ids": ids,
            "target_ids": _encode(self.tokenizer, target, self.spec.max_target_len),
            "vis_feats": feats,
            "vis_mask": mask,
            "score": 1.0,
            "target_text": target,
            "img_id": vid_name,
            "sent": text,
        }


class VideoQADataset(VideoDataset):
    """TVQA / How2QA: one example per question, target ``"a<answer_idx>"`` (empty in test)."""

    items: list[VideoQARecord]

    def _example(self, index, rng):
        rec = self.items[index]  # build_video_dataset checked that training questions have answers
        ids, text = self._text(rec.qid, rec.vid_name, q=rec.q, choices=rec.choices, ts=rec.ts)
        answer = "" if rec.answer_idx is None else f"a{rec.answer_idx}"
        ex = self._base(rec.vid_name, ids, text, answer)
        ex.update(question_id=rec.qid, targets=[answer] if answer else [])
        return ex

    def video_names(self):
        return [r.vid_name for r in self.items]


class VideoCaptionDataset(VideoDataset):
    """TVC / YC2C. ``items``: (clip, description index) in train mode, one per description;
    (clip, None) in eval mode, one per clip with every description in ``targets``."""

    items: list[tuple[VideoCaptionClip, int | None]]

    def _example(self, index, rng):
        clip, k = self.items[index]
        refs = list(clip.refs)
        ids, text = self._text(clip.clip_id, clip.vid_name, ts=clip.ts)
        if k is None:
            ex = self._base(clip.vid_name, ids, text, refs[0] if refs else "")
            ex.update(question_id=clip.clip_id, targets=refs)
        else:
            d = clip.descs[k]
            ex = self._base(clip.vid_name, ids, text, d.desc)
            ex.update(question_id=d.desc_id if d.desc_id is not None else f"{clip.clip_id}/{k}", targets=refs)
        return ex

    def video_names(self):
        return [c.vid_name for c, _ in self.items]


_REPORTED: set = set()


def build_video_dataset(
    task: str,
    split: str,
    data_root: str | os.PathLike | None,
    tokenizer,
    *,
    mode: str | None = None,
    feat_dim: int | None = VIDEO_FEAT_DIM,
    n_frames: int = N_FRAMES,
    mask_padded_frames: bool = True,
    truncation: str = "end",
    layout: VLAdapterLayout | None = None,
    spec=None,
    use_prompts: bool = True,
    seed: int = 0,
    limit: int | None = None,
    check_features: bool = False,
) -> VideoDataset:
    """The dataset of one video task and split (``train`` / ``val`` / ``test`` or VALUE file split
    names, comma-separated). ``feat_dim`` is checked on every read (None: any); ``limit`` keeps the
    first ``limit`` examples; ``check_features`` stats every ``.npz`` up front."""
    from .tasks import canonical_task, get_task_spec

    task = canonical_task(task)
    if task not in VIDEO_TASK_INFO:
        raise ValueError(f"{task!r} is not a video task ({', '.join(VIDEO_TASKS)})")
    info = VIDEO_TASK_INFO[task]
    if layout is None:
        layout = VLAdapterLayout(resolve_data_root(data_root))
    if spec is None:
        spec = get_task_spec(task, use_prompts=use_prompts)
    elif spec.name != task:
        raise ValueError(f"spec is for task {spec.name!r}, not {task!r}")
    file_splits = spec.resolve_split(split)
    paths = [video_ann_path(layout, task, fs) for fs in file_splits]  # validates names before reading
    if mode is None:
        mode = "train" if split == "train" else "eval"
    if mode not in ("train", "eval"):
        raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
    subtitles = read_subtitles(video_subtitles_path(layout, info.source))
    items: list
    if info.kind == "qa":
        items = [r for p in paths for r in read_video_qa(p, task)]
        if len(paths) > 1:
            _check_unique(Path(",".join(map(str, paths))), "qid", (r.qid for r in items))
        if mode == "train":
            for i, r in enumerate(items):
                if r.answer_idx is None:
                    raise DataError(paths[0] if len(paths) == 1 else ",".join(map(str, paths)),
                                    f"an answer_idx in every record of a {task} training split", record=i,
                                    record_id=f"qid={r.qid!r}", field="answer_idx", got="a record without it")
        cls = VideoQADataset
    else:
        clips = [c for p in paths for c in read_video_captions(p, task)]
        if mode == "train":
            items = [(c, k) for c in clips for k in range(len(c.descs))]
            if not items:
                raise DataError(paths[0], f"descriptions ('descs') to train {task} on", got="none in the split")
        else:
            items = [(c, None) for c in clips]
        cls = VideoCaptionDataset
    if limit is not None:
        items = items[: int(limit)]
    fdir = VideoFeatureDir(layout.video_dir / "vis_features" / info.source / "clip-vit", feat_dim)
    ds = cls(spec, items, tokenizer, {info.source: fdir}, mode=mode, seed=seed, split=split, subtitles=subtitles,
             n_frames=n_frames, mask_padded_frames=mask_padded_frames, truncation=truncation)
    note = (task, split, str(layout.video_dir), ds.missing_subtitles)
    if ds.missing_subtitles and note not in _REPORTED:  # once per split, not at every validation
        _REPORTED.add(note)
        print(f"vlpet: {task} {split}: {ds.missing_subtitles} video(s) have no line in "
              f"{video_subtitles_path(layout, info.source).name}; their subtitles are empty", file=sys.stderr)
    if check_features:
        ds.check_features()
    return ds


# ------------------------------------------------------------------------------------------------
# scoring and VALUE submission files
# ------------------------------------------------------------------------------------------------
def score_video_task(task: str, result: Mapping[str, Any],
                     caption_metrics=("BLEU-4", "METEOR", "ROUGE-L", "CIDEr"), *, tokenizer: str = "auto",
                     log=print) -> dict[str, float]:
    """Scores of :func:`vlpet.train.evaluate.predict_task`'s result for a video task; ``{}`` when the
    split has no labels (VALUE test files).

    QA: ``accuracy`` (percent) and ``unparsable`` (how many generations were not ``"a<k>"``; they
    count as wrong and are logged, never mapped to choice 0). Captions, every metric twice:
    ``multi_ref/<metric>`` — one prediction per clip against all of the clip's descriptions (the
    usual score; ``multi_ref/CIDEr`` is the task's main number) — and ``single_ref/<metric>`` — the
    clip's prediction against each description separately, as the official validation computes it
    (``CocoEvaluator`` with one reference per description).
    """
    from ..metrics import video_caption_scores, video_qa_accuracy

    preds, gold = result["predictions"], result["gold"]
    info = VIDEO_TASK_INFO[task]
    if info.kind == "qa":
        answers = gold.get("answers", {})
        labelled = {q: p for q, p in preds.items() if q in answers}
        if not labelled:
            return {}
        acc = video_qa_accuracy(labelled, answers, num_choices=info.n_choices)
        bad = acc["unparsable"]
        if bad and log is not None:
            shown = ", ".join(f"{q!r}: {labelled[q]!r}" for q in bad[:3])
            log(f"vlpet: {task}: {len(bad)} of {acc['n']} generated answers are not 'a<k>' with k < "
                f"{info.n_choices}; counted as wrong (e.g. {shown})")
        return {"accuracy": acc["accuracy"], "unparsable": float(len(bad)), "n": float(acc["n"])}
    refs = gold.get("refs", {})
    clips = [c for c in preds if refs.get(c)]
    if not clips:
        return {}
    records = [(c, j, text) for c in clips for j, text in enumerate(refs[c])]
    per_desc = {(c, j): preds[c] for c, j, _ in records}
    both = video_caption_scores(per_desc, records, example_id_fn=lambda r: (r[0], r[1]),
                                clip_id_fn=lambda r: r[0], text_fn=lambda r: r[2],
                                metrics=tuple(caption_metrics), tokenizer=tokenizer)
    out = {f"multi_ref/{k}": v for k, v in both["multi_ref"].items()}
    out.update({f"single_ref/{k}": v for k, v in both["single_ref"].items()})
    out["n_clips"], out["n_refs"] = float(len(clips)), float(len(records))
    return out


_VALUE_SPLIT_NAMES = {  # split -> the split word in VALUE's file names
    "tvqa": {"val": "val", "test": "test"},
    "how2qa": {"val": "val", "test": "test_public"},
    "tvc": {"val": "val", "test": "test"},
    "yc2c": {"val": "val", "test": "test"},
}


def value_prediction_filename(task: str, split: str = "test") -> str:
    """VALUE's file name: ``tvqa_test_predictions.json``, ``how2qa_test_public_predictions.json``,
    ``tvc_test_predictions.jsonl``, ``yc2c_val_predictions.jsonl``, ..."""
    word = _VALUE_SPLIT_NAMES[task].get(split, split.replace(",", "+"))
    ext = "json" if VIDEO_TASK_INFO[task].kind == "qa" else "jsonl"
    return f"{task}_{word}_predictions.{ext}"


def value_submission(task: str, result: Mapping[str, Any], *, log=print):
    """The VALUE submission payload of a prediction result.

    QA: ``{str(qid): answer_idx}``; an answer that is not ``"a<k>"`` (k a valid choice) is written
    as ``-1``, which VALUE scores as wrong (the official VL-PET dump writes 0), and is logged.
    Captions: a list of ``{"video_id", "vid_name", "clip_id", "descs": [{"desc"}]}`` (one line
    each in the ``.jsonl``).
    """
    from ..metrics import parse_choice

    preds = result["predictions"]
    vids = result.get("gold", {}).get("img_ids", {})
    info = VIDEO_TASK_INFO[task]
    if info.kind == "qa":
        out, bad = {}, []
        for q, text in preds.items():
            k = parse_choice(text)
            if k is None or not 0 <= k < info.n_choices:
                bad.append(q)
                k = -1
            out[str(q)] = int(k)
        if bad and log is not None:
            log(f"vlpet: {task}: {len(bad)} of {len(preds)} answers are not 'a<k>'; written as -1 (wrong), "
                f"e.g. {bad[0]!r}: {preds[bad[0]]!r}")
        return out
    return [{"video_id": vids.get(c), "vid_name": vids.get(c), "clip_id": c, "descs": [{"desc": text}]}
            for c, text in preds.items()]


def write_value_predictions(task: str, result: Mapping[str, Any], path: str | os.PathLike, *, log=print) -> Path:
    """Write :func:`value_submission` to ``path`` (``.json`` for QA, ``.jsonl`` for captions);
    a directory ``path`` gets VALUE's file name for the test split."""
    from ..checkpoint import atomic_write_bytes

    path = Path(path)
    if path.is_dir():
        path = path / value_prediction_filename(task, "test")
    payload = value_submission(task, result, log=log)
    if isinstance(payload, dict):
        data = json.dumps(payload)
    else:
        data = "".join(json.dumps(line) + "\n" for line in payload)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data.encode())
    return path
