"""Test helpers: a tiny generated dataset in a plain NIfTI layout, and a loss that turns NaN."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from pipeline.data.sources import SPLITS, DatasetNotFoundError, DatasetSource
from pipeline.losses import CrossEntropy

ROLES = ["train", "train", "train", "val", "test", "test"]


def write_blob_volumes(root: Path, n: int = 6, shape=(24, 20, 6), spacing=(1.5, 1.5, 3.0), seed: int = 0) -> Path:
    """``n`` volumes with two nested ellipsoids (classes 1, 2) on a noisy background, as NIfTI image/label pairs."""
    import nibabel as nib

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    x, y, z = np.meshgrid(*(np.arange(s, dtype=float) for s in shape), indexing="ij")
    affine = np.diag([*spacing, 1.0])
    for i in range(n):
        cx, cy = shape[0] / 2 + rng.uniform(-3, 3), shape[1] / 2 + rng.uniform(-3, 3)
        r = ((x - cx) / 8) ** 2 + ((y - cy) / 6) ** 2 + ((z - shape[2] / 2) / 6) ** 2
        label = np.where(r < 0.3, 2, np.where(r < 1.0, 1, 0)).astype(np.uint8)
        image = np.array([0.1, 0.5, 0.9])[label] + rng.normal(0, 0.05, shape)
        nib.save(nib.Nifti1Image(image.astype(np.float32), affine), root / "images" / f"case{i:02d}.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), root / "labels" / f"case{i:02d}.nii.gz")
    return root


class BlobSource(DatasetSource):
    """Reads ``images/caseNN.nii.gz`` + ``labels/caseNN.nii.gz``; split by position in :data:`ROLES`."""

    name = "blobs"

    def cases(self) -> list[dict]:
        images = sorted((self.root / "images").glob("*.nii.gz"))
        if not images:
            raise DatasetNotFoundError(f"no images in {self.root / 'images'}")
        return [
            {"id": p.name[: -len(".nii.gz")], "image": str(p), "label": str(self.root / "labels" / p.name)}
            for p in images
        ]

    def split(self, cases, seed):
        return {s: [c["id"] for c, r in zip(cases, ROLES) if r == s] for s in SPLITS}

    def validate(self, cases):
        return [f"case {c['id']}: label file missing ({c['label']})" for c in cases if not Path(c["label"]).is_file()]


class NaNAfter(CrossEntropy):
    """Cross-entropy that returns NaN from its ``n``-th call on."""

    def __init__(self, n: int = 3) -> None:
        super().__init__()
        self.n, self.calls = n, 0

    def _forward(self, logits, labels):
        self.calls += 1
        value = super()._forward(logits, labels)
        return value * math.nan if self.calls >= self.n else value


BLOBS_CONFIG = """
dataset:
  name: blobs
  class_names: [background, outer, inner]
  in_channels: 1
  slice_axis: 2
  source:
    _target_: tests.helpers.BlobSource
    root: "@data_dir"
epochs: 2
val_interval: 1
batch_size: 4
preprocess:
  - _target_: LoadImaged
    keys: [image, label]
    image_only: true
  - _target_: EnsureChannelFirstd
    keys: [image, label]
  - _target_: ScaleIntensityd
    keys: image
  - _target_: EnsureTyped
    keys: [image, label]
    dtype: $torch.float32
"""


def make_config_dir(tmp: Path) -> Path:
    """A copy of the repository's configs plus ``dataset/blobs.yaml`` for the generated data."""
    import shutil

    from pipeline.config import CONFIG_DIR

    out = tmp / "configs"
    shutil.copytree(CONFIG_DIR, out)
    (out / "dataset" / "blobs.yaml").write_text(BLOBS_CONFIG)
    return out


def tiny_unet_overrides() -> dict:
    return {"backbone::channels": [4, 8, 16], "backbone::strides": [2, 2], "backbone::num_res_units": 0,
            "backbone_divisor": 4}


def state_dict_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
