"""Synthetic demo samples written in each dataset's official layout (``make demo-data DATASET=<name>``).

:func:`write_demo_data` finds the dataset's source class through its config (``dataset::source::_target_``),
lets the class's ``write_demo`` fill a temporary folder next to the destination, marks it as demo data
(``.demo-data.json``) and renames it into place. An existing folder is replaced only when it carries that mark:
real data are never overwritten, and an interrupted run leaves nothing half-written.

The helpers below draw the synthetic anatomy (ellipsoids, smooth noise) and save NIfTI files with a real
voxel-to-world affine.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from pydoc import locate

import numpy as np

from pipeline.config import REPO_ROOT, available, load_config
from pipeline.io import building_folder
from pipeline.registry import check_name

MARKER = ".demo-data.json"


def is_demo_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / MARKER).is_file()


def source_class(dataset: str, config_dir: Path | None = None):
    """The source class a dataset's config selects (``dataset::source::_target_``)."""
    parser = load_config(dataset, config_dir=config_dir)
    target = parser["dataset"]["source"]["_target_"]
    cls = locate(target)
    if cls is None or not hasattr(cls, "write_demo"):
        raise ValueError(f"the source of dataset '{dataset}' ({target}) cannot write demo data")
    return cls


def write_demo_data(
    dataset: str,
    dest: str | os.PathLike | None = None,
    n_cases: int | None = None,
    shape: Sequence[int] | None = None,
    seed: int = 0,
    config_dir: Path | None = None,
    **options,
) -> Path:
    """Write the demo sample of ``dataset`` into ``dest`` (default ``data/demo/<dataset>``).

    Args:
        dataset: a dataset name (``configs/dataset/<name>.yaml``).
        dest: the folder to write; afterwards ``make train DATASET=<dataset> DATA_DIR=<dest>`` reads it.
        n_cases, shape, seed, options: passed to the source's ``write_demo``.

    Returns:
        ``dest``.

    Raises:
        FileExistsError: ``dest`` exists, is not empty and is not a demo folder written here.
    """
    check_name(dataset, available("dataset", config_dir), "dataset")
    cls = source_class(dataset, config_dir)
    dest = Path(dest) if dest else REPO_ROOT / "data" / "demo" / dataset
    if dest.exists() and not is_demo_folder(dest) and (not dest.is_dir() or any(dest.iterdir())):
        raise FileExistsError(
            f"{dest} exists and is not a demo folder written by `make demo-data`; it is left untouched. "
            "Choose another DATA_DIR or remove it yourself."
        )
    with building_folder(dest) as tmp:
        cls.write_demo(tmp, n_cases=n_cases, shape=shape, seed=seed, **options)
        info = {"dataset": dataset, "source": f"{cls.__module__}.{cls.__name__}", "n_cases": n_cases,
                "shape": None if shape is None else list(shape), "seed": seed, "options": options,
                "written": time.strftime("%Y-%m-%d %H:%M:%S")}
        (tmp / MARKER).write_text(json.dumps(info, indent=2) + "\n")
    return dest


# --------------------------------------------------------------------------------------------------------------
# drawing helpers
def grid(shape: Sequence[int], spacing: Sequence[float]) -> list[np.ndarray]:
    """Physical coordinates (mm, centred on the volume) of every voxel, one array per axis."""
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing)]
    return np.meshgrid(*axes, indexing="ij", sparse=True)


def ellipsoid(coords: Sequence[np.ndarray], center: Sequence[float], radii: Sequence[float]) -> np.ndarray:
    """Normalised squared distance to an axis-aligned ellipsoid: ``< 1`` inside (coordinates and radii in mm)."""
    return sum(((c - c0) / r) ** 2 for c, c0, r in zip(coords, center, radii))


def smooth_noise(shape: Sequence[int], rng: np.random.Generator, sigma: float = 2.0) -> np.ndarray:
    """Zero-mean, unit-variance Gaussian noise smoothed over ``sigma`` voxels (tissue texture, bias fields).

    Wide kernels are applied on a coarser grid and interpolated back (the result is smooth either way), which keeps
    full-size volumes (e.g. 240×240×155) fast.
    """
    from scipy.ndimage import gaussian_filter, zoom

    shape = tuple(int(s) for s in shape)
    f = max(1, int(sigma // 2))
    if f > 1:
        coarse = tuple(max(2, -(-s // f)) for s in shape)
        n = gaussian_filter(rng.standard_normal(coarse), sigma / f, mode="wrap")
        n = zoom(n, [s / c for s, c in zip(shape, coarse)], order=1, grid_mode=True, mode="grid-wrap")
        n = n[tuple(slice(0, s) for s in shape)]
    else:
        n = gaussian_filter(rng.standard_normal(shape), sigma)
    return ((n - n.mean()) / (n.std() + 1e-8)).astype(np.float32)


def affine_from(spacing: Sequence[float], shape: Sequence[int], flip: Sequence[int] = (1, 1, 1)) -> np.ndarray:
    """A voxel-to-world affine with ``spacing`` and axis signs ``flip``, centred on the world origin."""
    a = np.diag([*(f * s for f, s in zip(flip, spacing)), 1.0])
    a[:3, 3] = [-f * s * (n - 1) / 2 for f, s, n in zip(flip, spacing, shape)]
    return a


def save_nifti(data: np.ndarray, affine: np.ndarray, path: Path, dtype=None) -> Path:
    """Save a NIfTI file (``.nii.gz`` or ``.nii``) with sform and qform set and millimetre units."""
    import nibabel as nib

    arr = np.asarray(data if dtype is None else data.astype(dtype))
    img = nib.Nifti1Image(arr, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


def mri_intensity(label: np.ndarray, means: dict[int, float], rng: np.random.Generator, noise: float = 0.04,
                  bias: float = 0.08, scale: float = 1000.0, fields: tuple[np.ndarray, np.ndarray] | None = None
                  ) -> np.ndarray:
    """An MR-like image: a mean per tissue value of ``label``, a smooth multiplicative bias field, smooth texture
    and Rician noise (magnitude of complex Gaussian noise), times ``scale``.

    Args:
        fields: ``(bias field, texture)`` (unit-variance, from :func:`smooth_noise`) to reuse across the modalities
            of one subject; drawn when ``None``.
    """
    shape = label.shape
    if fields is None:
        fields = (smooth_noise(shape, rng, sigma=max(2.0, min(shape) / 4)), smooth_noise(shape, rng, sigma=1.0))
    lut = np.zeros(int(label.max()) + 1, dtype=np.float32)
    for value, mean in means.items():
        if value < lut.size:
            lut[value] = mean
    img = lut[label]
    img *= 1.0 + bias * fields[0]
    img += 0.5 * noise * fields[1] * (img > 0)
    re = img + noise * rng.standard_normal(shape, dtype=np.float32)
    im = noise * rng.standard_normal(shape, dtype=np.float32)
    return (np.sqrt(re**2 + im**2) * scale).astype(np.float32)


def write_mhd(data: np.ndarray, spacing: Sequence[float], offset: Sequence[float], path: Path,
              orientation: str = "RAI") -> Path:
    """Save a 3D ``x, y, z`` array as MetaImage: ``path`` (``.mhd`` header) and a ``.raw`` file beside it (x fastest,
    little-endian, uncompressed, identity direction), as the PROMISE12 archives hold them."""
    types = {np.dtype(np.int16): "MET_SHORT", np.dtype(np.uint8): "MET_UCHAR", np.dtype(np.float32): "MET_FLOAT",
             np.dtype(np.uint16): "MET_USHORT"}
    arr = np.asarray(data)
    if arr.dtype not in types:
        raise ValueError(f"unsupported MetaImage element type {arr.dtype}; expected one of {list(types)}")
    raw = path.with_suffix(".raw")
    path.parent.mkdir(parents=True, exist_ok=True)
    raw.write_bytes(np.ascontiguousarray(arr.transpose(2, 1, 0)).astype(arr.dtype.newbyteorder("<")).tobytes())
    header = [
        "ObjectType = Image", "NDims = 3", "BinaryData = True", "BinaryDataByteOrderMSB = False",
        "CompressedData = False", "TransformMatrix = 1 0 0 0 1 0 0 0 1",
        f"Offset = {' '.join(f'{v:g}' for v in offset)}", "CenterOfRotation = 0 0 0",
        f"AnatomicalOrientation = {orientation}", f"ElementSpacing = {' '.join(f'{v:g}' for v in spacing)}",
        f"DimSize = {' '.join(str(n) for n in arr.shape)}", f"ElementType = {types[arr.dtype]}",
        f"ElementDataFile = {raw.name}",
    ]
    path.write_text("\n".join(header) + "\n")
    return path
