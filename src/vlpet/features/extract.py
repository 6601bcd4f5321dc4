"""Batch image-feature extraction to the VL-Adapter layout (spec §7.3).

One HDF5 file per image, ``{output_dir}/{img_id}.h5``, holding the dataset
``{img_id}/features`` of shape [49, F] (the 7x7 grid, row-major); ``img_id`` is the file name
without its extension. Existing valid files are skipped (cache); every file is written to a
temporary name and moved into place with ``os.replace``, so a killed run never leaves a
half-written ``{img_id}.h5``.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from ._image import (IMAGE_EXTENSIONS, ImageReadError, ImageSourceError, list_images, load_rgb, normalize_uint8_batch,
                     resize_to_uint8)
from ..errors import ConfigError

NUM_GRID_TOKENS = 49
DTYPES = {"float32": np.float32, "float16": np.float16}
_TMP_TAG = ".tmp-"
_PREFETCH_BATCHES = 2


# ----------------------------------------------------------------------------- registry
def _build_efficientnet_lite0(device: torch.device | str):
    """EfficientNet-Lite0, packaged ImageNet weights (offline); head ReLU6 map, [49, 1280]."""
    from .efficientnet_lite0 import load_efficientnet_lite0

    # BN folding is exact up to float rounding (max abs diff ~4e-5 on [0, 6] features) and faster.
    model = load_efficientnet_lite0(device=device, channels_last=True, fuse_bn=True)
    model.input_channels_last = True
    return model


def _build_clip_rn101(device: torch.device | str):
    """CLIP RN101 C5 map as in VL-Adapter / VL-PET, [49, 2048]; needs vlpet[clip] + torchvision
    and a download of the OpenAI weights."""
    from .clip_rn101 import load_clip_rn101

    model = load_clip_rn101(device=device)
    model.input_channels_last = False
    return model


class EncoderSpec(NamedTuple):
    """``feat_dim``: width F of the [49, F] grid; ``builder(device)`` returns a module with
    ``image_size``, ``mean``, ``std`` and ``grid_features(normalised [B,3,H,W]) -> [B,49,F]``."""

    feat_dim: int
    builder: Callable[[torch.device | str], Any]

    @property
    def description(self) -> str:
        return " ".join((self.builder.__doc__ or "").split())


ENCODERS: dict[str, EncoderSpec] = {
    "efficientnet-lite0": EncoderSpec(1280, _build_efficientnet_lite0),
    "clip-rn101": EncoderSpec(2048, _build_clip_rn101),
}


class UnknownEncoderError(ConfigError):
    pass


class ImageIdError(ConfigError):
    """Two images map to one feature file, or an image name is not usable as one."""


def get_encoder_spec(name: str) -> EncoderSpec:
    """Registry lookup; an unknown name raises an error listing the allowed names."""
    try:
        return ENCODERS[name]
    except KeyError:
        allowed = ", ".join(sorted(ENCODERS))
        raise UnknownEncoderError(
            f"unknown image encoder {name!r}; choose one of: {allowed}"
        ) from None


# ----------------------------------------------------------------------------- HDF5 I/O
def feature_path(output_dir: str | os.PathLike, img_id: str) -> Path:
    return Path(output_dir) / f"{img_id}.h5"


def is_valid_feature_file(
    path: str | os.PathLike, img_id: str, feat_dim: int | None = None
) -> bool:
    """True if ``path`` opens and holds ``{img_id}/features`` of shape [49, feat_dim]."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            shape = f[f"{img_id}/features"].shape
    except Exception:
        return False
    if len(shape) != 2 or shape[0] != NUM_GRID_TOKENS:
        return False
    return feat_dim is None or shape[1] == feat_dim


def write_feature_file(path: str | os.PathLike, img_id: str, features: np.ndarray) -> None:
    """Atomically write ``features`` [49, F] to ``path`` as dataset ``{img_id}/features``."""
    import h5py

    path = Path(path)
    tmp = path.with_name(f".{path.name}{_TMP_TAG}{os.getpid()}")
    try:
        with h5py.File(tmp, "w") as f:
            f.create_dataset(f"{img_id}/features", data=features)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_features(path_or_dir: str | os.PathLike, img_id: str | None = None) -> np.ndarray:
    """Read one feature file: ``read_features(dir, img_id)`` or ``read_features(file)``."""
    import h5py

    p = Path(path_or_dir)
    if img_id is None:
        img_id = p.stem
    elif p.is_dir() or p.suffix != ".h5":
        p = feature_path(p, img_id)
    with h5py.File(p, "r") as f:
        return f[f"{img_id}/features"][...]


def _remove_stale_tmp_files(output_dir: Path) -> None:
    """Delete temporary files left by killed runs (their writer process no longer exists)."""
    for tmp in output_dir.glob(f".*.h5{_TMP_TAG}*"):
        try:
            pid = int(tmp.name.rsplit(_TMP_TAG, 1)[1])
        except ValueError:
            continue
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
            continue  # that process is alive (maybe a concurrent run): leave its file alone
        except ProcessLookupError:
            pass
        except OSError:  # PermissionError: alive, owned by someone else
            continue
        tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- extraction
def _usable_cpus() -> int | None:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count()


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _load_one(path: Path, size: int) -> torch.Tensor:
    """Decode + resize one image to uint8 [size, size, 3] (PIL releases the GIL for most of it)."""
    return resize_to_uint8(load_rgb(path), size)


def _collect_images(source) -> list[tuple[str, Path]]:
    """(img_id, path) pairs from a directory / file / iterable of paths (img_id = file stem) or
    a mapping {img_id: path}; img_ids must be unique and usable as file names."""
    if isinstance(source, Mapping):
        items = [(str(k), Path(v)) for k, v in source.items()]
    else:
        items = [(p.stem, p) for p in list_images(source)]
    if not items:
        raise ImageSourceError(f"--images {str(source)!r}: no image files ({', '.join(IMAGE_EXTENSIONS)}) found; "
                               f"nothing to extract")
    seen: dict[str, Path] = {}
    for img_id, p in items:
        if not img_id or "/" in img_id or os.sep in img_id or img_id.startswith("."):
            raise ImageIdError(f"image id {img_id!r} (for {str(p)!r}) is not usable as a file name")
        if img_id in seen:  # e.g. x.png and x.jpg: both would write x.h5
            raise ImageIdError(f"duplicate image id {img_id!r}: {str(seen[img_id])!r} and {str(p)!r} "
                               f"(img_id = file name without extension; rename one of them)")
        seen[img_id] = p
    return items


def extract_features(
    image_dir_or_list: str | os.PathLike | Iterable[str | os.PathLike] | Mapping[str, Any],
    output_dir: str | os.PathLike,
    encoder: str = "efficientnet-lite0",
    batch_size: int = 32,
    dtype: str = "float32",
    progress: bool = True,
    *,
    device: torch.device | str | None = None,
    num_threads: int | None = None,
    on_error: str = "raise",
    overwrite: bool = False,
    forward_batch_size: int | None = None,
    num_workers: int | None = None,
) -> dict[str, Any]:
    """Extract [49, F] grid features for every image and write ``{output_dir}/{img_id}.h5``.

    Args:
        image_dir_or_list: a directory (its image files, non-recursive), one image file, an
            iterable of image paths (``img_id`` = file name without extension), or a mapping
            ``{img_id: path}``. Image ids must be unique.
        encoder: a key of :data:`ENCODERS` ('efficientnet-lite0' or 'clip-rn101').
        dtype: storage dtype, 'float32' or 'float16' (computation is always float32).
        device: defaults to CUDA if available, else CPU; ``num_threads`` defaults to all CPUs.
        on_error: 'raise' (default: an :class:`ImageReadError` naming the file) or 'skip'
            (unreadable images are listed under ``failed`` in the summary).
        overwrite: recompute even if a valid file exists.
        forward_batch_size: images per forward pass; defaults to ``batch_size`` on CUDA and
            ``min(batch_size, 8)`` on CPU, where small batches stay in cache and run faster.
        num_workers: image-decoding threads, running ahead of the model by two batches;
            defaults to 1 on CPU (the model needs the cores) and min(8, #CPUs) on CUDA.

    Returns a summary dict: encoder, feat_dim, dtype, output_dir, n_images, n_cached,
    n_written, n_failed, failed [(path, reason)], device, seconds, images_per_s (written images
    per second, model loading included; None when everything was cached).
    """
    spec = get_encoder_spec(encoder)
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if on_error not in ("raise", "skip"):
        raise ConfigError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")

    items = _collect_images(image_dir_or_list)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp_files(out)

    todo = [
        (img_id, p) for img_id, p in items
        if overwrite or not is_valid_feature_file(feature_path(out, img_id), img_id, spec.feat_dim)
    ]
    summary: dict[str, Any] = {
        "encoder": encoder,
        "feat_dim": spec.feat_dim,
        "dtype": dtype,
        "output_dir": str(out),
        "n_images": len(items),
        "n_cached": len(items) - len(todo),
        "n_written": 0,
        "n_failed": 0,
        "failed": [],
        "device": None,
        "seconds": 0.0,
        "images_per_s": None,
    }
    if not todo:
        return summary

    dev = torch.device(device) if device is not None else _default_device()
    summary["device"] = str(dev)
    prev_threads = torch.get_num_threads()
    # Full fp32 on CUDA (TF32 convs drift by ~0.1 on [0, 6] features); restored afterwards.
    prev_tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    if dev.type == "cpu":
        torch.set_num_threads(num_threads or _usable_cpus() or prev_threads)
    np_dtype = DTYPES[dtype]
    t0 = time.perf_counter()
    try:
        model = spec.builder(dev)
        size, channels_last = model.image_size, getattr(model, "input_channels_last", False)
        fwd_bs = forward_batch_size or (batch_size if dev.type == "cuda" else min(batch_size, 8))
        batches = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
        if num_workers is None:
            num_workers = 1 if dev.type == "cpu" else min(8, _usable_cpus() or 1)
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc=f"features[{encoder}]", unit="img", disable=not progress)
        pool = ThreadPoolExecutor(max_workers=max(1, num_workers))
        submit = lambda batch: [  # noqa: E731
            (img_id, p, pool.submit(_load_one, p, size)) for img_id, p in batch
        ]
        pending = deque(submit(b) for b in batches[:_PREFETCH_BATCHES])
        try:
            with bar:
                for k in range(len(batches)):
                    futures = pending.popleft()
                    if k + _PREFETCH_BATCHES < len(batches):
                        pending.append(submit(batches[k + _PREFETCH_BATCHES]))
                    arrays, ok = [], []
                    for img_id, p, fut in futures:
                        try:
                            arrays.append(fut.result())
                            ok.append(img_id)
                        except ImageReadError as exc:
                            if on_error == "raise":
                                raise
                            summary["failed"].append((str(p), exc.reason))
                    if arrays:
                        x = normalize_uint8_batch(
                            torch.stack(arrays), model.mean, model.std, dev, channels_last
                        )
                        with torch.inference_mode():
                            feats = torch.cat([model.grid_features(c) for c in x.split(fwd_bs)])
                        if feats.shape[1:] != (NUM_GRID_TOKENS, spec.feat_dim):
                            raise RuntimeError(
                                f"encoder {encoder!r} returned shape {tuple(feats.shape)}"
                            )
                        feats = feats.float().cpu().numpy().astype(np_dtype, copy=False)
                        for img_id, f in zip(ok, feats):
                            write_feature_file(feature_path(out, img_id), img_id, f)
                        summary["n_written"] += len(ok)
                    bar.update(len(futures))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    finally:
        torch.set_num_threads(prev_threads)
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = prev_tf32
    secs = time.perf_counter() - t0
    summary["n_failed"] = len(summary["failed"])
    summary["seconds"] = round(secs, 3)
    summary["images_per_s"] = round(summary["n_written"] / secs, 2) if secs > 0 else None
    return summary
