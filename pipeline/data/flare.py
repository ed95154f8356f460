"""FLARE 2021: abdominal CT (Fast and Low GPU memory Abdominal oRgan sEgmentation), four organs.

Layout (as the training archive unpacks; ``DATA_DIR`` is the folder holding ``TrainingImg/``)::

    TrainingImg/train_000_0000.nii.gz …   (CT in Hounsfield units; 361 cases, varying resolution)
    TrainingMask/train_000.nii.gz …       0 background, 1 liver, 2 kidneys, 3 spleen, 4 pancreas

Paper: resampled to a common spacing, cropped to 192×192×30, split 240 / 40 / 80. The CT window, spacing and crop
are in ``configs/dataset/flare.yaml``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.data.demo import save_nifti, smooth_noise
from pipeline.data.files import FileDatasetSource, find_dir, niftis, subdir

_MODALITY_SUFFIX = re.compile(r"_0000$")


class FLARESource(FileDatasetSource):
    """FLARE 2021 training data: one CT channel (HU), labels 0–4.

    Args:
        root: the folder holding ``TrainingImg/`` and ``TrainingMask/``.
        split_counts, label_values, stratify, fold, affine_atol: see
            :class:`pipeline.data.files.FileDatasetSource` (default split 240/40/80).
    """

    name = "flare"
    url = "https://flare.grand-challenge.org (FLARE21 training data, after registration)"
    layout = """
FLARE21/
  TrainingImg/train_000_0000.nii.gz ...
  TrainingMask/train_000.nii.gz ...
"""
    default_label_values = (0, 1, 2, 3, 4)
    demo_cases = 10

    def __init__(self, root, split_counts: Sequence[int] = (240, 40, 80), **kwargs) -> None:
        super().__init__(root, split_counts, **kwargs)

    def cases(self) -> list[dict]:
        top = find_dir(self.root, lambda d: subdir(d, "TrainingImg") is not None
                       or subdir(d, "TrainingMask") is not None)
        if top is None:
            raise self.not_found("no TrainingImg/ folder found (searched two levels down)")
        img_dir = subdir(top, "TrainingImg") or top / "TrainingImg"
        mask_dir = subdir(top, "TrainingMask") or top / "TrainingMask"
        images = {_MODALITY_SUFFIX.sub("", k): p for k, p in niftis(img_dir).items()}
        masks = niftis(mask_dir)
        cases = []
        for key in sorted(set(images) | set(masks)):
            image = images.get(key)
            mask = masks.get(key)
            cid = (mask.name if mask is not None else _MODALITY_SUFFIX.sub("", image.name.split(".")[0])).split(".")[0]
            cases.append({
                "id": cid,
                "image": str(image if image is not None else img_dir / f"{cid}_0000.nii.gz"),
                "label": str(mask if mask is not None else mask_dir / f"{cid}.nii.gz"),
            })
        if not cases:
            raise self.not_found(f"{img_dir} holds no train_NNN_0000.nii.gz files")
        return cases

    @classmethod
    def write_demo(cls, root: Path, n_cases: int | None = None, shape: Sequence[int] | None = None,
                   seed: int = 0) -> None:
        """``n_cases`` abdominal CT scans (default 10) on the grid ``shape`` (default 256×256×48 at
        1.5625×1.5625×5 mm, LPS-style axes as converted from DICOM), in Hounsfield units: air, a body contour
        with subcutaneous fat and muscle, spine and aorta, liver, spleen, both kidneys and the pancreas as soft
        blobs with their own enhancement, bowel gas; int16 images, uint8 masks."""
        rng = np.random.default_rng(seed)
        n = int(n_cases or cls.demo_cases)
        shape = tuple(int(s) for s in (shape or (256, 256, 48)))
        spacing = (400.0 / shape[0], 400.0 / shape[1], 240.0 / shape[2])
        affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
        affine[:3, 3] = [spacing[0] * (shape[0] - 1) / 2, spacing[1] * (shape[1] - 1) / 2, -600.0]
        for i in range(n):
            hu, label = _abdomen(shape, spacing, rng)
            save_nifti(hu, affine, root / "TrainingImg" / f"train_{i:03d}_0000.nii.gz", dtype=np.int16)
            save_nifti(label, affine, root / "TrainingMask" / f"train_{i:03d}.nii.gz", dtype=np.uint8)


def _abdomen(shape, spacing, rng) -> tuple[np.ndarray, np.ndarray]:
    """HU image and labels of one synthetic abdomen. Coordinates in mm, RAS (+x towards the patient's right)."""
    axes = [((np.arange(n) - (n - 1) / 2) * s).astype(np.float32) for n, s in zip(shape, spacing)]
    # voxel axes run right-to-left and anterior-to-posterior (affine diag(-s, -s, s)): flip to RAS for drawing
    X, Y, Z = np.meshgrid(-axes[0], -axes[1], axes[2], indexing="ij", sparse=True)
    a, b = rng.uniform(150, 180), rng.uniform(105, 125)          # body half-width, half-depth (mm)
    body = (X / a) ** 2 + ((Y + 10) / b) ** 2
    hu = np.full(shape, -1000.0, np.float32)
    hu[np.broadcast_to(body < 1.0, shape)] = -100.0              # subcutaneous fat
    hu[np.broadcast_to(body < 0.82, shape)] = 45.0               # muscle wall
    hu[np.broadcast_to(body < 0.72, shape)] = -80.0              # intra-abdominal fat
    label = np.zeros(shape, np.uint8)

    def blob(c, r, noise=0.15):
        d = ((X - c[0]) / r[0]) ** 2 + ((Y - c[1]) / r[1]) ** 2 + ((Z - c[2]) / r[2]) ** 2
        return d + noise * smooth_noise(shape, rng, sigma=max(2.0, min(shape) / 10)) < 1.0

    z0 = rng.uniform(-20, 20)
    liver = blob((rng.uniform(60, 75), rng.uniform(0, 15), z0 + 45), (rng.uniform(70, 85), 80, 70))
    spleen = blob((rng.uniform(-90, -75), -25, z0 + 40), (28, 45, 45))
    kid_r = blob((55, -45, z0 - 25), (25, 28, 50), 0.08)
    kid_l = blob((-55, -45, z0 - 15), (25, 28, 50), 0.08)
    pancreas = blob((-15, 5, z0 - 5), (55, 12, 14), 0.25)
    spine = ((X / 22) ** 2 + ((Y + 70) / 20) ** 2) < 1.0
    aorta = ((X + 15) / 12) ** 2 + ((Y + 40) / 12) ** 2 < 1.0
    hu[np.broadcast_to(spine, shape)] = 650.0
    hu[np.broadcast_to(aorta, shape)] = 170.0
    for k, (mask, value) in enumerate([(liver, 105.0), (kid_r | kid_l, 160.0), (spleen, 115.0), (pancreas, 90.0)]):
        mask = mask & (hu > -500) & (hu < 500) & np.broadcast_to(~(spine | aorta), shape)
        label[mask] = k + 1
        hu[mask] = value
    gas = blob((rng.uniform(-40, 40), rng.uniform(20, 70), z0 - 40), (30, 20, 25), 0.5) & (label == 0) & (body < 0.7)
    hu[gas] = -850.0
    hu += 25.0 * smooth_noise(shape, rng, 1.0) * (hu > -900) + rng.normal(0, 12, shape).astype(np.float32)
    return np.round(hu).astype(np.int16), label
