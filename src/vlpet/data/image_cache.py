"""A disk cache of frozen image features: the VLM's vision tower (BLIP-2: and Q-Former) runs once per
image, not once per step.

When the part of the image path before the first trainable module is frozen, its output for an
image never changes, so it is computed once (``model.frozen_image_features``) and read back in every
epoch, as the paper's pipeline reads precomputed CLIP features. One safetensors file per image input::

    <cache_dir>/<model key>-<processor key>/<ab>/<image digest>.safetensors

* model key: ``model.image_features_key()`` (the backbone's config, its frozen vision weights and
  the processor's image settings, from the model side);
* processor key: a digest of the image processor settings the collator uses (so a changed
  resolution or normalisation never reads stale features);
* image digest: BLAKE2b of the file bytes (NLVR2: of both files, in order), so an edited image is
  recomputed. Digests are remembered per (path, size, mtime) in ``digests.json`` so later runs do
  not hash every file again.

Files are written atomically (a temporary name, then a rename), so an interrupted build leaves only
complete entries and the next run computes the rest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Iterable

import torch

from .errors import DataError
from .images import ImageRef, open_image

__all__ = ["ImageFeatureCache", "default_cache_dir", "file_digest", "processor_key"]


def default_cache_dir() -> Path:
    """``$VLPET_CACHE/image-features`` (default ``~/.cache/vlpet/image-features``)."""
    return Path(os.environ.get("VLPET_CACHE") or "~/.cache/vlpet").expanduser() / "image-features"


def file_digest(path: str | os.PathLike) -> str:
    h = hashlib.blake2b(digest_size=16)
    try:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    except OSError as exc:
        raise DataError(path, "a readable image file", got=f"{type(exc).__name__}: {exc}"[:160]) from exc
    return h.hexdigest()


def processor_key(processor) -> str:
    """A digest of the image processor's settings (its JSON form, sorted)."""
    ip = getattr(processor, "image_processor", processor)
    try:
        text = json.dumps(ip.to_dict(), sort_keys=True, default=str)
    except Exception:  # an image processor without to_dict: its repr
        text = repr(ip)
    return hashlib.blake2b(f"{type(ip).__name__}|{text}".encode(), digest_size=6).hexdigest()


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive advisory lock on ``path`` (POSIX flock; without fcntl the atomic replace alone)."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class ImageFeatureCache:
    """Frozen image features of one model + processor, keyed by image content."""

    def __init__(self, cache_dir: str | os.PathLike, model_key: str, processor) -> None:
        if not model_key or not isinstance(model_key, str):
            raise ValueError(f"model_key must be a non-empty string, got {model_key!r}")
        self.root = Path(cache_dir)
        self.processor = processor
        self.dir = self.root / f"{model_key}-{processor_key(processor)}"
        self._index_path = self.root / "digests.json"
        self._digests: dict[str, list] = self._read_index()
        self._index_dirty = False

    # -- keys -----------------------------------------------------------------------------------
    def _file_digest(self, path: str) -> str:
        try:
            st = os.stat(path)
        except OSError as exc:  # the same one-line error as file_digest's
            raise DataError(path, "a readable image file", got=f"{type(exc).__name__}: {exc}"[:160]) from exc
        stamp = [st.st_size, st.st_mtime_ns]
        hit = self._digests.get(path)
        if hit is not None and hit[:2] == stamp:
            return hit[2]
        d = file_digest(path)
        self._digests[path] = stamp + [d]
        self._index_dirty = True
        return d

    def digest(self, ref: ImageRef) -> str:
        parts = [self._file_digest(p) for p in ref.paths]
        if len(parts) == 1:
            return parts[0]
        return hashlib.blake2b(("side-by-side|" + "|".join(parts)).encode(), digest_size=16).hexdigest()

    def path(self, ref: ImageRef) -> Path:
        d = self.digest(ref)
        return self.dir / d[:2] / f"{d}.safetensors"

    def _read_index(self) -> dict[str, list]:
        try:
            data = json.loads(self._index_path.read_text())
        except (OSError, ValueError):  # none yet, or unreadable: digests are recomputed
            return {}
        return data if isinstance(data, dict) else {}

    def reload_index(self) -> None:
        """Take in the digests other processes saved (after the ranks' shared cache fill)."""
        self._digests = {**self._read_index(), **self._digests}

    def _save_index(self) -> None:
        # Ranks fill disjoint shards of the cache: each merges its digests into the index on disk (read, update,
        # atomic replace, under a lock) so that no rank's entries are lost to the last writer.
        if not self._index_dirty:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        with _locked(self._index_path.with_name(".digests.json.lock")):
            merged = {**self._read_index(), **self._digests}
            tmp = self._index_path.with_name(f".digests.json.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            tmp.write_text(json.dumps(merged))
            os.replace(tmp, self._index_path)
        self._digests = merged
        self._index_dirty = False

    # -- read / build ---------------------------------------------------------------------------
    def load(self, ref: ImageRef) -> torch.Tensor:
        from safetensors.torch import load_file

        p = self.path(ref)
        try:
            return load_file(str(p))["features"]
        except FileNotFoundError:
            raise DataError(p, f"cached image features of {ref.paths[0]} (build the cache first)",
                            got="no such file") from None
        except Exception as exc:  # a truncated or foreign file
            raise DataError(p, "a safetensors file with a 'features' tensor (delete it to recompute)",
                            got=f"{type(exc).__name__}: {exc}"[:160]) from exc

    def missing(self, refs: Iterable[ImageRef]) -> list[ImageRef]:
        out = [r for r in dict.fromkeys(refs) if not self.path(r).is_file()]
        self._save_index()
        return out

    @torch.no_grad()
    def build(self, model, refs: Iterable[ImageRef], *, batch_size: int = 16, device=None, dtype=None,
              progress: bool = True, desc: str = "image features") -> int:
        """Compute and store the features of every ref not cached yet; returns how many were computed."""
        from safetensors.torch import save_file
        from tqdm.auto import tqdm

        todo = self.missing(refs)
        if not todo:
            return 0
        was_training = model.training
        model.eval()
        # the frozen tower's device and dtype (bf16 when the frozen backbone is stored in bf16)
        param = next((p for p in model.parameters() if not p.requires_grad), None)
        if param is None:
            param = next(model.parameters(), None)
        device = device or (param.device if param is not None else "cpu")
        ip = getattr(self.processor, "image_processor", self.processor)  # a processor, or an image processor alone
        try:
            with tqdm(total=len(todo), desc=desc, disable=not progress, unit="img", dynamic_ncols=True) as bar:
                for start in range(0, len(todo), batch_size):
                    chunk = todo[start:start + batch_size]
                    pixels = ip([open_image(r) for r in chunk], return_tensors="pt")["pixel_values"]
                    pixels = pixels.to(device=device, dtype=dtype or (param.dtype if param is not None else None))
                    feats = model.frozen_image_features(pixels)
                    for r, f in zip(chunk, feats):
                        dest = self.path(r)
                        dest.parent.mkdir(parents=True, exist_ok=True)
                        tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
                        save_file({"features": f.detach().to("cpu").contiguous()}, str(tmp))
                        os.replace(tmp, dest)
                    bar.update(len(chunk))
        finally:
            model.train(was_training)
            self._save_index()
        return len(todo)
