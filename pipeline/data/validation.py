"""Validation of a dataset before any training: every problem at once, each naming its case and file.

What is checked, per case:

* **pairing**: every image has its label and every label its image (sources emit a case for an orphan file, with
  the path where its partner was expected);
* **readable and complete files**: the header parses, and the data are all there. Cheap checks only:
  NIfTI ``.nii`` file size against the header; ``.nii.gz`` the gzip trailer (uncompressed size modulo 2³²) against
  the header, fully decompressed only when the two disagree (to confirm truncation); MetaImage ``.mhd`` the size
  of the ``.raw`` file; PNG ``Image.verify()`` (chunk checksums, no decoding);
* **modalities**: the number of image channels (one per file, or the 4th dimension of a 4D NIfTI) against the
  dataset's;
* **geometry**: image and label spatial shape, and affine (within ``affine_atol``), read from the headers;
* **label values**: the values in the label files against the dataset's set.

Only the label files are read in full (they are small integer volumes); images are read through their headers.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# MetaImage element types → numpy dtypes
_MET_TYPES = {
    "MET_CHAR": np.int8, "MET_UCHAR": np.uint8, "MET_SHORT": np.int16, "MET_USHORT": np.uint16,
    "MET_INT": np.int32, "MET_UINT": np.uint32, "MET_LONG": np.int32, "MET_ULONG": np.uint32,
    "MET_LONG_LONG": np.int64, "MET_ULONG_LONG": np.uint64, "MET_FLOAT": np.float32, "MET_DOUBLE": np.float64,
}


class FileProblem(Exception):
    """A file that cannot be used; the message says why."""


@dataclass
class Header:
    """What a file's header says: spatial ``shape``, number of ``channels``, ``affine`` (``None`` for PNG)."""

    shape: tuple[int, ...]
    channels: int
    affine: np.ndarray | None


def is_nifti(path: str | os.PathLike) -> bool:
    name = str(path).lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def _gzip_isize(path: Path) -> int:
    with open(path, "rb") as f:
        f.seek(-4, os.SEEK_END)
        return struct.unpack("<I", f.read(4))[0]


def _gzip_length(path: Path) -> int:
    """Decompress a whole gzip file; its uncompressed length, or :class:`FileProblem` when it is cut short."""
    n = 0
    try:
        with gzip.open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                n += len(chunk)
    except (EOFError, OSError, zlib.error) as e:
        raise FileProblem(f"truncated or corrupt gzip data ({e})") from None
    return n


def _nifti_header(path: Path) -> Header:
    import nibabel as nib

    try:
        img = nib.load(str(path))
    except Exception as e:  # nibabel raises several types for bad headers
        raise FileProblem(f"unreadable NIfTI header ({type(e).__name__}: {e})") from None
    shape = tuple(int(s) for s in img.shape)
    if len(shape) < 2:
        raise FileProblem(f"expected a 3D or 4D image, the header says shape {shape}")
    proxy = img.dataobj  # where and what the data are, as nibabel will read them
    expected = int(getattr(proxy, "offset", 352)) + int(np.prod(shape)) * np.dtype(proxy.dtype).itemsize
    size = path.stat().st_size
    if str(path).lower().endswith(".gz"):
        if size < 18:
            raise FileProblem("truncated gzip file")
        if _gzip_isize(path) != expected % (1 << 32):
            got = _gzip_length(path)
            if got < expected:
                raise FileProblem(f"truncated: {got} bytes of data, the header needs {expected}")
    elif size < expected:
        raise FileProblem(f"truncated: {size} bytes, the header needs {expected}")
    spatial = shape[:3] if len(shape) >= 3 else (*shape, 1)
    channels = int(np.prod(shape[3:])) if len(shape) > 3 else 1
    return Header(spatial, channels, np.asarray(img.affine, dtype=float))


def read_mhd_header(path: str | os.PathLike) -> dict[str, str]:
    """The ``key = value`` lines of a MetaImage header (``.mhd``), keys as written."""
    fields: dict[str, str] = {}
    try:
        text = Path(path).read_text(errors="strict")
    except (UnicodeDecodeError, OSError) as e:
        raise FileProblem(f"unreadable MetaImage header ({e})") from None
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def mhd_geometry(path: Path) -> tuple[dict, tuple[int, ...], int, np.dtype, Path]:
    """A MetaImage header's fields, dimensions, channels, data type and raw-data file; raises ``FileProblem``."""
    f = read_mhd_header(path)
    try:
        dims = tuple(int(v) for v in f["DimSize"].split())
        dtype = np.dtype(_MET_TYPES[f["ElementType"]])
        data_file = f["ElementDataFile"]
    except KeyError as e:
        raise FileProblem(f"MetaImage header lacks {e} (or has an unknown ElementType)") from None
    if f.get("BinaryDataByteOrderMSB", "False").lower() == "true":
        dtype = dtype.newbyteorder(">")
    channels = int(f.get("ElementNumberOfChannels", "1"))
    if data_file in ("LOCAL", "LIST") or "%" in data_file:
        raise FileProblem(f"ElementDataFile = {data_file} is not supported (expected a separate .raw file)")
    return f, dims, channels, dtype, path.parent / data_file


def _mhd_header(path: Path) -> Header:
    f, dims, channels, dtype, raw = mhd_geometry(path)
    if not raw.is_file():
        raise FileProblem(f"its data file {raw.name} is missing")
    expected = int(np.prod(dims)) * channels * dtype.itemsize
    if f.get("CompressedData", "False").lower() == "true":
        try:
            got = len(zlib.decompress(raw.read_bytes()))
        except zlib.error as e:
            raise FileProblem(f"corrupt compressed data in {raw.name} ({e})") from None
    else:
        got = raw.stat().st_size
    if got < expected:
        raise FileProblem(f"truncated: {raw.name} holds {got} bytes, the header needs {expected}")
    spacing = [float(v) for v in f.get("ElementSpacing", f.get("ElementSize", " ".join("1" * len(dims)))).split()]
    offset = [float(v) for v in f.get("Offset", f.get("Position", " ".join("0" * len(dims)))).split()]
    matrix = np.array([float(v) for v in f.get("TransformMatrix", "").split()] or np.eye(len(dims)).ravel())
    n = len(dims)
    affine = np.eye(4)
    affine[:n, :n] = matrix.reshape(n, n) * np.asarray(spacing)[None, :]
    affine[:n, 3] = offset
    spatial = dims[:3] if n >= 3 else (*dims, 1)
    return Header(spatial, channels, affine)


def read_mhd_array(path: str | os.PathLike) -> np.ndarray:
    """The voxels of a MetaImage file as a numpy array in ``x, y, z`` order (for label checks and tests)."""
    f, dims, channels, dtype, raw = mhd_geometry(Path(path))
    data = raw.read_bytes()
    if f.get("CompressedData", "False").lower() == "true":
        data = zlib.decompress(data)
    shape = (*dims[::-1], channels) if channels > 1 else dims[::-1]
    arr = np.frombuffer(data, dtype=dtype, count=int(np.prod(shape))).reshape(shape)
    return np.moveaxis(arr, list(range(len(dims))), list(range(len(dims)))[::-1])


def _png_header(path: Path) -> Header:
    from PIL import Image

    try:
        with Image.open(path) as im:
            size = im.size
            im.verify()
    except Exception as e:
        raise FileProblem(f"unreadable or truncated image ({type(e).__name__}: {e})") from None
    return Header((int(size[0]), int(size[1]), 1), 1, None)  # x (width), y (height), as MONAI's PILReader


def read_header(path: str | os.PathLike) -> Header:
    """The header of a NIfTI, MetaImage or PNG file, with the cheap completeness checks of this module.

    Raises:
        FileProblem: missing, unreadable or truncated file; the message says which.
    """
    path = Path(path)
    if not path.is_file():
        raise FileProblem("file missing")
    name = path.name.lower()
    if is_nifti(name):
        return _nifti_header(path)
    if name.endswith(".mhd"):
        return _mhd_header(path)
    if name.endswith((".png", ".jpg", ".jpeg", ".bmp")):
        return _png_header(path)
    raise FileProblem(f"unsupported file type (expected .nii, .nii.gz, .mhd or .png): {path.name}")


def read_label_array(path: str | os.PathLike) -> np.ndarray:
    """All voxels of a label file (NIfTI, MetaImage or PNG, the latter as grey values)."""
    path = Path(path)
    name = path.name.lower()
    try:
        if is_nifti(name):
            import nibabel as nib

            return np.asanyarray(nib.load(str(path)).dataobj)
        if name.endswith(".mhd"):
            return read_mhd_array(path)
        from PIL import Image

        with Image.open(path) as im:
            return np.asarray(im.convert("L"))
    except FileProblem:
        raise
    except Exception as e:
        raise FileProblem(f"unreadable data ({type(e).__name__}: {e})") from None


def unique_values(arr: np.ndarray) -> np.ndarray:
    """Sorted distinct values of an array, fast for small-range integers (``bincount`` instead of a sort)."""
    a = np.asarray(arr).ravel()
    if a.size == 0:
        return a
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            return np.unique(a)
        if np.array_equal(a, np.round(a)) and np.abs(a).max() < 2**31:
            a = a.astype(np.int64)
        else:
            return np.unique(a)
    lo, hi = int(a.min()), int(a.max())
    if hi - lo > 1 << 20:
        return np.unique(a)
    counts = np.bincount(a.astype(np.int64) - lo)
    return np.nonzero(counts)[0] + lo


def _fmt_values(values: Iterable) -> str:
    vals = [float(v) for v in values]
    return "[" + ", ".join(str(int(v)) if float(v).is_integer() else f"{v:g}" for v in vals) + "]"


def _as_list(x) -> list[str]:
    if x is None:
        return []
    return [str(p) for p in x] if isinstance(x, (list, tuple)) else [str(x)]


def check_case(
    case: dict,
    channels: int,
    label_values: Sequence[float],
    affine_atol: float = 1e-3,
    root: str | os.PathLike | None = None,
) -> list[str]:
    """Problems of one case (see the module docstring); empty when the case is usable.

    Args:
        case: ``{"id", "image": path or [paths], "label": path or [paths] (several = masks to merge)}``.
        channels: the number of image channels the dataset has (modalities).
        label_values: the values a label file may hold.
        affine_atol: largest difference allowed between image and label affines (mm).
        root: shown paths are made relative to it.
    """
    cid = case["id"]

    def show(p: str) -> str:
        if root is not None:
            try:
                return str(Path(p).relative_to(root))
            except ValueError:
                pass
        return str(p)

    images, labels = _as_list(case.get("image")), _as_list(case.get("label"))
    missing_images = [p for p in images if not Path(p).is_file()]
    missing_labels = [p for p in labels if not Path(p).is_file()]
    problems = []
    if not images or not labels:
        return [f"case {cid}: no {'image' if not images else 'label'} file listed"]
    if missing_images or missing_labels:
        if len(missing_images) == len(images) and len(missing_labels) == len(labels):
            return [f"case {cid}: neither image nor label found (expected {show(images[0])})"]
        for p in missing_images:
            kind = "label without its image" if len(missing_images) == len(images) else "missing modality"
            problems.append(f"case {cid}: {kind} (expected {show(p)})")
        for p in missing_labels:
            kind = "image without its label" if len(missing_labels) == len(labels) else "missing label file"
            problems.append(f"case {cid}: {kind} (expected {show(p)})")
        return problems

    headers: dict[str, Header] = {}
    for p in images + labels:
        try:
            headers[p] = read_header(p)
        except FileProblem as e:
            problems.append(f"case {cid}: {show(p)}: {e}")
    if problems:
        return problems
    n_channels = sum(headers[p].channels for p in images)
    if n_channels != channels:
        problems.append(
            f"case {cid}: {n_channels} image channel(s) in {', '.join(show(p) for p in images)}, expected "
            f"{channels} (one per modality)"
        )
    ref = headers[images[0]]
    for p in images[1:] + labels:
        h = headers[p]
        if h.shape != ref.shape:
            problems.append(f"case {cid}: {show(p)} has shape {h.shape}, {show(images[0])} has {ref.shape}")
        elif h.affine is not None and ref.affine is not None and not np.allclose(h.affine, ref.affine,
                                                                                   atol=affine_atol):
            problems.append(
                f"case {cid}: {show(p)} and {show(images[0])} have different affines (voxel-to-world maps "
                f"differ by up to {np.abs(h.affine - ref.affine).max():.3g} mm; allowed {affine_atol})"
            )
    allowed = {float(v) for v in label_values}
    for p in labels:
        try:
            values = unique_values(read_label_array(p))
        except FileProblem as e:
            problems.append(f"case {cid}: {show(p)}: {e}")
            continue
        bad = [v for v in values if float(v) not in allowed]
        if bad:
            problems.append(
                f"case {cid}: {show(p)} holds label values {_fmt_values(bad)} outside the dataset's "
                f"{_fmt_values(sorted(allowed))}"
            )
    return problems


def check_cases(
    cases: Sequence[dict],
    channels: int,
    label_values: Sequence[float],
    affine_atol: float = 1e-3,
    root: str | os.PathLike | None = None,
    workers: int | None = None,
) -> list[str]:
    """:func:`check_case` over all cases (in threads; file reading and decompression release the GIL), problems in
    case order."""
    workers = workers or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(lambda c: check_case(c, channels, label_values, affine_atol, root), cases)
        return [p for r in results for p in r]
