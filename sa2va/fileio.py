"""Files that are never half-written (image/mask reading lives in sa2va.imageio).

Every writer goes to a temporary sibling first and is renamed into place, so a crash
leaves either the old file or the new one, never a torn one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image

from .errors import UserError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if os.stat(tmp_path).st_mode & 0o777 == 0o600:  # mkstemp's 0600, unless the caller chose a mode
            os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; move it to `path` only on success.

    With overwrite=False an existing non-empty `path` is refused before any work.
    With overwrite=True the old folder is replaced only after the new one is complete.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{path} exists and is not a folder")
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise UserError(f"{path} already exists and is not empty (choose another --out or remove it)")
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent))
    except OSError as err:
        raise UserError(f"cannot write to {parent}: {err.strerror}") from err
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
        if path.exists():
            old = parent / f".{path.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def check_writable_dir(path: str | os.PathLike) -> Path:
    """Create `path` if needed and prove we can write there, before any long work starts."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test.") as probe:
            # An empty file can be created on a full disk; bytes that reach the disk cannot.
            probe.write(b"\0" * 65536)
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as err:
        raise UserError(f"output folder {path} is not writable: {err.strerror}") from err
    return path


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """Read an image as uint8 (H, W, 3): sa2va.imageio.read_image (every mode, 16-bit scaling)."""
    from .imageio import read_image

    return read_image(path)


def read_mask(path: str | os.PathLike, binarize: float | None = None) -> np.ndarray:
    """Read a binary mask as bool (H, W): sa2va.imageio.read_mask (lossless formats, 8/16-bit)."""
    from .imageio import read_mask as _read_mask

    return _read_mask(path, binarize=binarize)


def write_mask(path: str | os.PathLike, mask: np.ndarray) -> None:
    """Write a bool mask as an 8-bit PNG of 0/255, atomically."""
    with atomic_path(path) as tmp:
        Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).save(tmp, format="PNG")


def write_png(path: str | os.PathLike, image: np.ndarray) -> None:
    """Write a uint8 (H, W) or (H, W, 3) array as PNG, atomically."""
    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")


def safe_join(root: str | os.PathLike, relative: str, what: str) -> Path:
    """Join a path from a data file to its root; refuse absolute paths and paths leaving root."""
    root = Path(root).resolve()
    if not isinstance(relative, str) or not relative:
        raise UserError(f"{what}: expected a relative path string, got {relative!r}")
    if os.path.isabs(relative):
        raise UserError(f"{what}: absolute path {relative!r} is not allowed; paths are relative to {root}")
    try:
        full = (root / relative).resolve()
    except (OSError, ValueError) as err:  # a NUL byte, a symlink loop
        raise UserError(f"{what}: path {relative!r} cannot be used: {err}") from err
    if full != root and root not in full.parents:
        raise UserError(f"{what}: path {relative!r} leaves the data folder {root}")
    return full
