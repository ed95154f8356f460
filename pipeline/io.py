"""Files that are either complete or absent: every writer of the pipeline goes through here.

A file is written to a temporary name in its own folder and renamed over the destination (``os.replace`` is atomic
on one file system), so a reader, a crash or a kill never leaves a half-written checkpoint, report or export. A
folder is built beside its destination and swapped in the same way (:func:`replace_folder`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without error, rename it to ``path``.

    The temporary name keeps the destination's suffixes (``.nii.gz`` selects the format of some writers). On an
    error the temporary file is removed and ``path`` is left as it was.

    >>> with atomic_path("/tmp/example.txt") as tmp:
    ...     _ = tmp.write_text("done")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=f"-{path.name}")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically; returns the path."""
    return write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def save_torch_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically; returns the path."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def write_with(writer: Callable[[Path], Any], path: str | os.PathLike) -> Path:
    """Call ``writer(tmp)`` on a temporary path and rename the result to ``path``; returns the path."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def write_nifti(volume, affine, path: str | os.PathLike) -> Path:
    """Write an ``X×Y×Z`` array as float32 NIfTI with ``affine`` (4×4, mm) atomically.

    Raises:
        ValueError: a volume that is not 3D, or an affine that is not 4×4.
    """
    import nibabel as nib

    data = np.asarray(volume, dtype=np.float32)
    if data.ndim != 3:
        raise ValueError(f"expected an X×Y×Z volume, got shape {data.shape}")
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"expected a 4×4 affine, got shape {affine.shape}")
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm")
    return write_with(lambda tmp: nib.save(img, tmp), path)


def new_temporary_folder(dest: str | os.PathLike) -> Path:
    """An empty folder beside ``dest`` (same file system) to build its replacement in."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.tmp-"))


def replace_folder(tmp: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Move the complete folder ``tmp`` to ``dest``, replacing what was there.

    The old ``dest`` is first renamed aside, then ``tmp`` renamed into place, then the old one deleted: at every
    moment ``dest`` is either the old folder or the new one.
    """
    tmp, dest = Path(tmp), Path(dest)
    old = None
    if dest.exists():
        old = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.old-"))
        os.replace(dest, old / "x")
    os.replace(tmp, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return dest


@contextmanager
def building_folder(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder; when the block ends without error, it replaces ``dest`` (:func:`replace_folder`).

    On an error the temporary folder is deleted and ``dest`` is left as it was.
    """
    tmp = new_temporary_folder(dest)
    try:
        yield tmp
        replace_folder(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
