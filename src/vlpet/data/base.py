"""The base of every task dataset (image-text here, video in vlpet.data.video) and its per-example randomness.

Kept apart from vlpet.data.datasets so that the video datasets subclass it without importing the image-text
builder, which itself dispatches to vlpet.data.video: the dependency goes one way (datasets -> video -> base).
"""

from __future__ import annotations

import hashlib
import random
from typing import Any, Mapping

import torch
from torch.utils.data import Dataset

from .errors import DataError
from .features import FeatureDir
from .tasks import TaskSpec

__all__ = ["ImageTextDataset", "best_answer", "example_seed", "sample_answer"]


def example_seed(seed: int, task: str, epoch: int, index: int) -> int:
    """A stable 64-bit seed for one example's randomness (independent of PYTHONHASHSEED)."""
    h = hashlib.blake2b(f"{seed}|{task}|{epoch}|{index}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little")


def sample_answer(label: Mapping[str, float], rng: random.Random | torch.Generator) -> tuple[str, float]:
    """Draw one answer with probability proportional to its soft score (spec §3.6).

    Returns ``(answer, score)``; ``("", 0.0)`` when the label is empty or sums to 0.
    """
    answers = list(label)
    weights = [float(label[a]) for a in answers]
    if not answers or sum(weights) <= 0:
        return "", 0.0
    if isinstance(rng, torch.Generator):
        k = int(torch.multinomial(torch.tensor(weights, dtype=torch.float64), 1, generator=rng))
    else:
        k = rng.choices(range(len(answers)), weights=weights, k=1)[0]
    return answers[k], weights[k]


def best_answer(label: Mapping[str, float]) -> tuple[str, float]:
    """The highest-scored answer (first one on ties); ``("", 0.0)`` for an empty label."""
    best, score = "", 0.0
    for a, s in label.items():
        if s > score:
            best, score = a, float(s)
    return best, score


def _encode(tokenizer, text: str, max_len: int | None) -> list[int]:
    kw = {"truncation": True, "max_length": max_len} if max_len else {}
    return [int(t) for t in tokenizer(text, **kw)["input_ids"]]


class ImageTextDataset(Dataset):
    """Base class. Subclasses fill ``self.items`` and implement ``_example``."""

    tokenizes = True  # the examples are tokenized here (with the tokenizer's pad token); False: by the collator

    def __init__(
        self,
        spec: TaskSpec,
        items: list,
        tokenizer,
        feature_dirs: Mapping[str, FeatureDir],
        *,
        mode: str,
        seed: int = 0,
        split: str = "",
    ) -> None:
        if mode not in ("train", "eval"):
            raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
        self.spec = spec
        self.task = spec.name
        self.items = items
        self.tokenizer = tokenizer
        self.feature_dirs = dict(feature_dirs)
        self.mode = mode
        self.seed = int(seed)
        self.split = split
        self.epoch = 0
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None and self.tokenizes:
            raise ValueError("the tokenizer has no pad token (pad_token_id is None)")
        self.pad_id = None if pad is None else int(pad)

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        """Epoch used by ``__getitem__`` for the per-example randomness."""
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.get_example(index, epoch=self.epoch)

    def get_example(
        self,
        index: int,
        epoch: int | None = None,
        rng: random.Random | torch.Generator | None = None,
    ) -> dict[str, Any]:
        """Example ``index``; its random choices come from ``rng`` if given, else from a
        ``random.Random(example_seed(seed, task, epoch, index))``."""
        if not 0 <= index < len(self.items):
            raise IndexError(f"{self.task} dataset index {index} out of range [0, {len(self.items)})")
        if rng is None:
            e = self.epoch if epoch is None else int(epoch)
            rng = random.Random(example_seed(self.seed, self.task, e, index))
        return self._example(index, rng)

    def _example(self, index: int, rng) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def image_ids(self) -> list[tuple[str, str]]:
        """(feature source, img_id) of every image the dataset reads."""
        raise NotImplementedError

    def check_features(self) -> None:
        """Raise DataError for the first missing feature file (and say how many are missing)."""
        missing = [(s, i) for s, i in dict.fromkeys(self.image_ids()) if not self.feature_dirs[s].path(i).is_file()]
        if missing:
            s, i = missing[0]
            raise DataError(
                self.feature_dirs[s].path(i),
                f"a feature file for every image of {self.task} {self.split}",
                got=f"{len(missing)} missing, this one first",
            )

    def check_feature_dim(self, feat_dim: int) -> None:
        """Every image's feature width is `feat_dim`: checked now from the files (a mixed folder would
        otherwise stop a run mid-way; FeatureDir.check_widths, one header per file size), and again on
        every later read."""
        for fd in self.feature_dirs.values():
            fd.expected_dim = feat_dim
        by_source: dict[str, list[str]] = {}
        for s, i in dict.fromkeys(self.image_ids()):
            by_source.setdefault(s, []).append(i)
        for s, ids in by_source.items():
            fd = self.feature_dirs[s]
            if hasattr(fd, "check_widths"):  # HDF5 files; video .npz files are checked when read
                fd.check_widths(ids, feat_dim)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(task={self.task!r}, split={self.split!r}, mode={self.mode!r}, n={len(self)})"
