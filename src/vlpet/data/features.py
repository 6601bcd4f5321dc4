"""Pre-extracted visual features.

Image-text (spec §3.1, §7.3): one HDF5 file per image, ``{feature_dir}/{img_id}.h5``, holding a
dataset ``{img_id}/features`` of shape [49, F] (the 7x7 grid, row-major; F = 2048 for CLIP RN101,
1280 for EfficientNet-Lite0). Files are opened lazily, one read per example, like the official
loaders, so DataLoader worker processes need no shared handles.

Video (spec §3.9, §7.4): one ``.npz`` per video with key ``features`` of shape [T, 512].
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from .errors import DataError

__all__ = [
    "GRID_TOKENS",
    "read_h5_features",
    "write_h5_features",
    "read_npz_video",
    "write_npz_video",
    "FeatureDir",
]

GRID_TOKENS = 49


def _h5py():
    import h5py  # local import: h5py is heavy and only needed when features are read

    return h5py


def _check_array(path, what: str, arr: np.ndarray, n_rows: int | None, dim: int | None, field: str):
    if arr.ndim != 2:
        raise DataError(path, f"a 2-D {what} array", got=f"shape {tuple(arr.shape)}", field=field)
    if n_rows is not None and arr.shape[0] != n_rows:
        raise DataError(path, f"{n_rows} rows ({what})", got=f"shape {tuple(arr.shape)}", field=field)
    if n_rows is None and arr.shape[0] < 1:
        raise DataError(path, f"at least one row ({what})", got=f"shape {tuple(arr.shape)}", field=field)
    if dim is not None and arr.shape[1] != dim:
        raise DataError(
            path,
            f"feature dim {dim} (shape [{arr.shape[0]}, {dim}])",
            got=f"feature dim {arr.shape[1]} (shape {list(arr.shape)}); wrong encoder or feat_dim?",
            field=field,
        )
    if arr.dtype.kind not in "fiu":
        raise DataError(path, f"a numeric {what} array", got=f"dtype {arr.dtype}", field=field)


def read_h5_features(
    path: str | os.PathLike,
    img_id: str,
    expected_dim: int | None = None,
    n_tokens: int | None = GRID_TOKENS,
) -> np.ndarray:
    """Read ``f[f"{img_id}/features"]`` from one per-image HDF5 file as float32 [n_tokens, F].

    ``expected_dim`` (e.g. 2048) and ``n_tokens`` (default 49; None to accept any) are checked;
    every failure (missing file, not HDF5, truncated, missing key, wrong shape, non-finite values)
    raises :class:`DataError` naming the file.
    """
    path = Path(path)
    key = f"{img_id}/features"
    if not path.is_file():
        raise DataError(path, f"an HDF5 feature file for image {img_id!r}", got="no such file")
    h5py = _h5py()
    try:
        is_h5 = h5py.is_hdf5(path)
    except OSError as e:  # unreadable
        raise DataError(path, "a readable HDF5 file", got=f"{type(e).__name__}: {e}") from e
    if not is_h5:
        raise DataError(
            path,
            "an HDF5 file (signature missing)",
            got=f"{path.stat().st_size} bytes that are not HDF5 (empty, truncated or another format)",
        )
    try:
        with h5py.File(path, "r") as f:
            if key not in f:
                keys = sorted(f.keys())
                shown = ", ".join(repr(k) for k in keys[:5]) + (", ..." if len(keys) > 5 else "")
                raise DataError(
                    path, f"an HDF5 dataset {key!r}", field=key, got=f"top-level keys [{shown}]"
                )
            ds = f[key]
            if not isinstance(ds, h5py.Dataset):
                raise DataError(path, f"{key!r} to be a dataset", field=key, got=type(ds).__name__)
            shape = tuple(ds.shape)
            if len(shape) != 2:
                raise DataError(path, "a 2-D feature array [49, F]", field=key, got=f"shape {shape}")
            arr = ds[...]
    except DataError:
        raise
    except (OSError, KeyError, ValueError, RuntimeError, TypeError) as e:
        raise DataError(
            path,
            f"a readable HDF5 file with dataset {key!r}",
            got=f"{type(e).__name__}: {e} (truncated or corrupt file?)",
        ) from e
    arr = np.asarray(arr)
    _check_array(path, "feature", arr, n_tokens, expected_dim, key)
    arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        raise DataError(path, "finite feature values", field=key, got="NaN or inf")
    return arr


def _atomic_target(path: Path) -> tuple[int, str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    return tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)


@contextlib.contextmanager
def _atomic_file(path: Path):
    """Yield a temporary path beside `path`; on success it replaces `path`, on failure it is removed."""
    fd, tmp = _atomic_target(path)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_h5_features(path: str | os.PathLike, img_id: str, array) -> Path:
    """Write ``array`` [N, F] as dataset ``{img_id}/features`` (float32), atomically.

    The file is written under a temporary name in the same directory and moved into place with
    ``os.replace``, so readers never see a half-written file.
    """
    path = Path(path)
    arr = np.asarray(array, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"features for {img_id!r} must be 2-D [N, F], got shape {arr.shape}")
    h5py = _h5py()
    with _atomic_file(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset(f"{img_id}/features", data=arr)
    return path


def read_npz_video(path: str | os.PathLike, expected_dim: int | None = 512) -> np.ndarray:
    """Read a video's frame features (``.npz`` with key ``features``) as float32 [T, expected_dim]."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "an .npz video feature file", got="no such file")
    try:
        with np.load(path, allow_pickle=False) as z:
            if not hasattr(z, "files"):
                raise DataError(path, "an .npz archive with key 'features'", got="a bare .npy array")
            if "features" not in z.files:
                raise DataError(path, "an array named 'features'", field="features", got=f"keys {z.files}")
            arr = np.asarray(z["features"])
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise DataError(
            path, "a readable .npz archive", got=f"{type(e).__name__}: {e} (truncated or corrupt file?)"
        ) from e
    _check_array(path, "frame feature", arr, None, expected_dim, "features")
    arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        raise DataError(path, "finite feature values", field="features", got="NaN or inf")
    return arr


def write_npz_video(path: str | os.PathLike, array) -> Path:
    """Write [T, F] frame features to ``path`` (key ``features``), atomically."""
    path = Path(path)
    arr = np.asarray(array, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"video features must be 2-D [T, F], got shape {arr.shape}")
    with _atomic_file(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, features=arr)
    return path


class FeatureDir:
    """A directory of per-image HDF5 files: ``FeatureDir(d, 2048).load("COCO_val2014_...")``."""

    def __init__(self, directory: str | os.PathLike, expected_dim: int | None = None,
                 n_tokens: int | None = GRID_TOKENS) -> None:
        self.directory = Path(directory)
        self.expected_dim = expected_dim
        self.n_tokens = n_tokens

    def path(self, img_id: str) -> Path:
        return self.directory / f"{img_id}.h5"

    def load(self, img_id: str) -> np.ndarray:
        return read_h5_features(self.path(img_id), img_id, self.expected_dim, self.n_tokens)

    def feature_shape(self, img_id: str) -> tuple[int, ...] | None:
        """The stored feature array's shape read from the file's header (no data), None if unreadable
        (a full read then names the exact problem)."""
        try:
            with _h5py().File(self.path(img_id), "r") as f:
                return tuple(f[f"{img_id}/features"].shape)
        except Exception:  # noqa: BLE001 - any failure is reported by load() with its own message
            return None

    def check_shape(self, img_id: str, expected_dim: int) -> None:
        """DataError naming the file when its feature width is not `expected_dim`."""
        shape = self.feature_shape(img_id)
        if shape is None or len(shape) != 2:
            self.load(img_id)  # raises the precise DataError (or the file is fine after all)
            return
        if shape[1] != expected_dim:
            raise DataError(self.path(img_id), f"feature dim {expected_dim} like the other images (shape "
                            f"[{shape[0]}, {expected_dim}])", field=f"{img_id}/features",
                            got=f"shape {list(shape)}; features from another encoder?")

    def check_widths(self, img_ids, expected_dim: int) -> None:
        """`check_shape` for a whole folder at the cost of a stat per file and one HDF5 header per distinct
        file size: a [49, F] array is stored contiguously (vlpet and VL-Adapter write it uncompressed), so a
        file of another width has another size. Opening every header took minutes on VQAv2-sized folders;
        compressed files (all sizes differ) fall back to one header each. Every read re-checks the width."""
        checked: set[int] = set()
        for i in img_ids:
            try:
                size = self.path(i).stat().st_size
            except OSError:
                size = None  # missing or unreadable: check_shape names the problem
            if size in checked:
                continue
            self.check_shape(i, expected_dim)
            if size is not None:
                checked.add(size)

    def missing(self, img_ids) -> list[str]:
        """The ids whose feature file does not exist (for an early check before training)."""
        return [i for i in img_ids if not self.path(i).is_file()]

    def __repr__(self) -> str:
        return f"FeatureDir({str(self.directory)!r}, expected_dim={self.expected_dim})"
