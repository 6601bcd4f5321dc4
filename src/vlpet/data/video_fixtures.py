"""A tiny, exact VALUE data tree for tests and smoke runs of the video-text tasks (spec §7.4).

``make_video_fixture(root)`` writes, under ``root/video/``, every file the video loaders read, with
VALUE's file names and field names: the three subtitle files, the TVQA / How2QA / TVC / YC2C
splits (test files without answers or descriptions, TVQA's test in two files) and one ``.npz``
(key ``features``, [T, 512]) per video. Frame counts differ per video, some shorter and some
longer than the 64 frames the model reads, so both padding and time pooling are exercised.

The content is learnable: each video has a hidden colour; its frame features carry a strong
pattern in that colour's block of channels, its subtitles mention the colour, QA questions ask for
it (the right choice names it) and every description names it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .features import write_npz_video

__all__ = ["make_video_fixture", "VideoFixture", "FIXTURE_COLORS", "FRAME_COUNTS"]

FIXTURE_COLORS = ("red", "blue", "green", "yellow")
# Frames per video, cycled: shorter than, equal to and longer than the 64 model frames.
FRAME_COUNTS = (20, 100, 64, 7, 150, 37, 90)
_SHOWS = ("friends", "bbt", "house")


@dataclass
class VideoFixture:
    root: Path  # the data root: pass it as --data-root (it holds video/)
    videos: dict[str, dict] = field(default_factory=dict)  # vid_name -> {source, n_frames, color}
    files: dict[str, list[dict]] = field(default_factory=dict)  # relative path -> records written
    no_subtitles: tuple[str, ...] = ()  # videos left out of their subtitle file

    def path(self, rel: str) -> Path:
        return self.root / "video" / rel


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _features(rng: np.random.Generator, n: int, color: int, dim: int) -> np.ndarray:
    x = 0.1 * rng.standard_normal((n, dim)).astype(np.float32)
    block = dim // len(FIXTURE_COLORS)
    x[:, color * block:(color + 1) * block] += 1.0
    x += np.linspace(0, 0.5, n, dtype=np.float32)[:, None] * (np.arange(dim) % 2 == 0)  # varies over time
    return x


def make_video_fixture(root, *, feat_dim: int = 512, n_train: int = 8, n_val: int = 4, n_test: int = 2,
                       seed: int = 0) -> VideoFixture:
    """Write the VALUE tree under ``root/video`` and return a :class:`VideoFixture` describing it.

    Per task: ``n_train`` training records (TVC / YC2C: clips with 2 descriptions each, so
    ``2 * n_train // 2`` training examples), ``n_val`` validation records and ``n_test`` test
    records (TVQA: ``n_test`` in test_public plus 1 in test_release).
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    fx = VideoFixture(root=root)
    n_vid = {"tv": 10, "how2": 6, "yc2": 6}
    vids: dict[str, list[str]] = {}
    k = 0
    for source, count in n_vid.items():
        vids[source] = []
        for i in range(count):
            name = {"tv": f"{_SHOWS[i % 3]}_s01e0{i % 9 + 1}_seg02_clip_{i:02d}",
                    "how2": f"how2_{i:03d}_{7 * i}_{7 * i + 60}", "yc2": f"yc2_vid{i:02d}_{i % 4}"}[source]
            n = FRAME_COUNTS[k % len(FRAME_COUNTS)]
            color = (i + len(source)) % len(FIXTURE_COLORS)
            k += 1
            fx.videos[name] = {"source": source, "n_frames": n, "color": color}
            write_npz_video(root / "video" / "vis_features" / source / "clip-vit" / f"{name}.npz",
                            _features(rng, n, color, feat_dim))
            vids[source].append(name)

    # subtitles: the last tv video has no line (empty subtitles); one how2 video has an empty list
    missing = (vids["tv"][-1],)
    fx.no_subtitles = missing
    for source in n_vid:
        recs = []
        for j, name in enumerate(vids[source]):
            if name in missing:
                continue
            c = FIXTURE_COLORS[fx.videos[name]["color"]]
            sub = [] if (source == "how2" and j == 1) else [
                {"text": f" Look at the {c} one. ", "start": 0.5, "end": 2.0},
                {"text": f"It is {c}, I think.", "start": 2.5, "end": 4.25},
            ]
            recs.append({"vid_name": name, "sub": sub})
        _write_jsonl(root / "video" / "ann" / f"{source}_subtitles.jsonl", recs)
        fx.files[f"ann/{source}_subtitles.jsonl"] = recs

    def color_of(name: str) -> str:
        return FIXTURE_COLORS[fx.videos[name]["color"]]

    def qa(task: str, n_choices: int, splits: dict[str, int], source: str, qid0: int) -> None:
        qid = qid0
        for split, count in splits.items():
            recs = []
            for i in range(count):
                name = vids[source][(qid - qid0) % len(vids[source])]
                c = color_of(name)
                others = [x for x in FIXTURE_COLORS if x != c] + ["purple", "orange"]
                ans = (qid * 7 + 3) % n_choices
                options = others[: n_choices - 1]
                options.insert(ans, c)
                rec = {"qid": qid, "vid_name": name, "q": " What colour is the object? ",
                       "ts": f"{1.5 + i:.2f}-{10 + i:.1f}"}
                if task == "tvqa":
                    rec["show_name"] = name.split("_")[0]
                for j, o in enumerate(options):
                    rec[f"a{j}"] = f"It is {o}." if j % 2 == 0 else f"the {o} one"
                if not split.startswith("test"):
                    rec["answer_idx"] = ans
                recs.append(rec)
                qid += 1
            rel = f"ann/{task}/{task}_{split}.jsonl"
            _write_jsonl(root / "video" / rel, recs)
            fx.files[rel] = recs

    qa("tvqa", 5, {"train": n_train, "val": n_val, "test_public": n_test, "test_release": 1}, "tv", 1000)
    qa("how2qa", 4, {"train_release": n_train, "val_release": n_val, "test_public_release": n_test}, "how2", 5000)

    def captions(task: str, splits: dict[str, int], source: str, clip0: int) -> None:
        clip = clip0
        desc_id = clip0 * 10
        templates = {"tvc": ("someone holds a {c} cup.", "A {c} thing is on the table."),
                     "yc2c": ("add the {c} pepper to the pan", "cut the {c} vegetables")}[task]
        for split, count in splits.items():
            recs = []
            for i in range(count):
                name = vids[source][(clip - clip0) % len(vids[source])]
                c = color_of(name)
                rec = {"vid_name": name, "duration": 60.5 + i, "clip_id": clip}
                if task == "tvc":
                    rec["ts"] = [round(1.2 + i, 2), round(8.24 + i, 2)]
                if not split.startswith("test"):
                    descs = []
                    for t in templates:
                        d = {"desc": t.format(c=c), "desc_id": desc_id}
                        if task == "tvc":
                            d["type"] = ("v", "t", "vt")[desc_id % 3]
                        descs.append(d)
                        desc_id += 1
                    rec["descs"] = descs
                recs.append(rec)
                clip += 1
            rel = f"ann/{task}/{task}_{split}.jsonl"
            _write_jsonl(root / "video" / rel, recs)
            fx.files[rel] = recs

    half = max(1, n_train // 2)
    captions("tvc", {"train_release": half, "val_release": n_val, "test_release": n_test}, "tv", 200)
    captions("yc2c", {"train_release": half, "val_release": n_val, "test_release": n_test}, "yc2", 300)
    return fx
