"""A run's data as a bundle sees them: ``configs/datalist.json`` and the files under ``dataset_dir``.

The bundle's configs read image/label files below ``dataset_dir`` in the layout of MONAI's model zoo (and of the
Medical Segmentation Decathlon): training and validation cases in ``imagesTr/`` and ``labelsTr/``, test cases in
``imagesTs/`` and ``labelsTs/``, one file per case named by its id (``<id>_0000…`` for cases made of several image
files, one per channel). ``configs/datalist.json`` lists the run's split in that layout under the keys MONAI's
``load_decathlon_datalist`` reads: ``training``, ``validation`` and ``test``. :func:`write_bundle_dataset` copies
a run's cases into that layout.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

#: run split → (datalist key, image folder, label folder)
LAYOUT = {"train": ("training", "imagesTr", "labelsTr"), "val": ("validation", "imagesTr", "labelsTr"),
          "test": ("test", "imagesTs", "labelsTs")}
DEFAULT_SUFFIX = ".nii.gz"


def file_suffix(path: str | os.PathLike) -> str:
    """``.nii.gz`` for gzipped NIfTI, else the file's last suffix (``.nii``, ``.mhd``, ``.png``)."""
    name = Path(path).name
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def _entries(case_id: str, files: str | Sequence[str] | None, folder: str) -> list[tuple[str | None, str]]:
    """``[(source file or None, path in the layout)]`` of one key of one case."""
    if files is None:
        return [(None, f"{folder}/{case_id}{DEFAULT_SUFFIX}")]
    if isinstance(files, (str, os.PathLike)):
        return [(str(files), f"{folder}/{case_id}{file_suffix(files)}")]
    return [(str(f), f"{folder}/{case_id}_{i:04d}{file_suffix(f)}") for i, f in enumerate(files)]


def case_layout(split: Mapping[str, Sequence[str]], cases: Mapping[str, Mapping] | None = None
                ) -> dict[str, list[dict]]:
    """The cases of a split in the bundle's layout: ``{datalist key: [{"image": [(source, path)], "label": …}]}``.

    Args:
        split: ``{"train": [ids], "val": [ids], "test": [ids]}`` (a run's ``splits.json``).
        cases: ``{id: case}`` from the dataset's source, for the file names and suffixes (``None``: one
            ``.nii.gz`` file per key and case).

    Raises:
        KeyError: an id of the split that ``cases`` lacks.
    """
    out: dict[str, list[dict]] = {}
    for part, (key, image_dir, label_dir) in LAYOUT.items():
        items = []
        for cid in split.get(part, []):
            if cases is not None and cid not in cases:
                raise KeyError(f"case '{cid}' of the '{part}' split is not among the dataset's cases")
            case = cases[cid] if cases is not None else {}
            items.append({"image": _entries(cid, case.get("image"), image_dir),
                          "label": _entries(cid, case.get("label"), label_dir)})
        out[key] = items
    return out


def datalist(layout: Mapping[str, list[dict]]) -> dict[str, list[dict]]:
    """``configs/datalist.json`` from :func:`case_layout`: paths relative to ``dataset_dir``."""
    def one(entries):
        paths = [p for _, p in entries]
        return paths[0] if len(paths) == 1 else paths

    return {key: [{"image": one(c["image"]), "label": one(c["label"])} for c in items]
            for key, items in layout.items()}


def _companions(source: Path) -> list[Path]:
    """Files that belong to ``source`` (the ``.raw``/``.zraw`` data of a MetaImage header)."""
    if source.suffix.lower() != ".mhd":
        return []
    return [p for p in (source.with_suffix(".raw"), source.with_suffix(".zraw")) if p.is_file()]


def write_bundle_dataset(layout: Mapping[str, list[dict]], dest: str | os.PathLike) -> Path:
    """Copy the files of :func:`case_layout` into ``dest`` (the bundle's ``dataset_dir``); returns ``dest``.

    Raises:
        FileNotFoundError: a case without source files (the layout was made without the dataset) or a missing file.
        ValueError: a MetaImage header whose data file name would not follow the copy.
    """
    dest = Path(dest)
    for items in layout.values():
        for case in items:
            for source, rel in case["image"] + case["label"]:
                if source is None or not Path(source).is_file():
                    raise FileNotFoundError(f"no source file for {rel} ({source}): is the run's dataset available?")
                target = dest / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, target)
                for extra in _companions(Path(source)):
                    if Path(rel).stem != Path(source).stem:  # the header names its data file: keep the names
                        raise ValueError(f"{source} names its data file {extra.name} in its header and would be "
                                         f"renamed to {rel}; copy this case by hand")
                    shutil.copyfile(extra, target.with_suffix(extra.suffix))
    return dest


def training_profile(layout: Mapping[str, list[dict]], max_images: int = 8, slice_axis: int = 2) -> dict:
    """What the network saw, from (up to ``max_images``) training images of :func:`case_layout`: their common voxel
    spacing in RAS order (``None`` when they differ or cannot be read) and the range of their 0.5th-99.5th
    intensity percentiles (``None`` when none can be read). NIfTI files only (read with nibabel).

    Also the mean number of slices along ``slice_axis`` (RAS order) per training image, from every training
    image's header (``None`` when none can be read): what an epoch of the run held per volume.

    Returns:
        ``{"spacing": [x, y, z] | None, "intensity_range": [low, high] | None, "n_images": int,
        "slices_per_volume": int | None}``.
    """
    depths = []
    for case in layout.get("training", []):
        source = case["image"][0][0]
        if source is not None and Path(source).name.endswith((".nii", ".nii.gz")):
            try:
                depths.append(int(nib.as_closest_canonical(nib.load(source)).shape[slice_axis]))
            except Exception:  # noqa: BLE001 - an unreadable header: not counted
                continue
    sources = [s for case in layout.get("training", []) for s, _ in case["image"]
               if s is not None and Path(s).name.endswith((".nii", ".nii.gz"))][:max_images]
    spacings, lows, highs = [], [], []
    for source in sources:
        try:
            image = nib.as_closest_canonical(nib.load(source))
            data = np.asarray(image.dataobj, dtype=np.float64)
        except Exception:  # noqa: BLE001 - an unreadable file: no profile from it
            continue
        spacings.append([float(v) for v in image.header.get_zooms()[:3]])
        low, high = np.percentile(data[np.isfinite(data)], (0.5, 99.5))
        lows.append(float(low))
        highs.append(float(high))
    same = bool(spacings) and all(np.allclose(s, spacings[0], rtol=1e-3) for s in spacings)
    return {"spacing": spacings[0] if same else None,
            "intensity_range": [min(lows), max(highs)] if lows else None, "n_images": len(lows),
            "slices_per_volume": round(sum(depths) / len(depths)) if depths else None}
