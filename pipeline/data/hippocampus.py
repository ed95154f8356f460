"""Hippocampus: the Medical Segmentation Decathlon's Task04 (T1 MRI crops around the hippocampus, Vanderbilt).

Layout (as ``Task04_Hippocampus.tar`` unpacks)::

    Task04_Hippocampus/
      dataset.json
      imagesTr/hippocampus_001.nii.gz …   (260 cases, ≈35×51×35 voxels at 1 mm)
      labelsTr/hippocampus_001.nii.gz …   (0 background, 1 anterior, 2 posterior)
      imagesTs/…                          (no labels; not used)

Paper split: 185 / 25 / 50 cases.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.data.demo import affine_from, mri_intensity
from pipeline.data.files import FileDatasetSource
from pipeline.data.msd import decathlon_cases, find_task, write_decathlon


class HippocampusSource(FileDatasetSource):
    """MSD Task04 Hippocampus: one T1 channel, labels 0/1/2 (anterior, posterior).

    Args: see :class:`pipeline.data.files.FileDatasetSource` (default split: the paper's 185/25/50).
    """

    name = "hippocampus"
    url = "http://medicaldecathlon.com (Task04_Hippocampus.tar)"
    layout = """
Task04_Hippocampus/
  dataset.json
  imagesTr/hippocampus_001.nii.gz ...
  labelsTr/hippocampus_001.nii.gz ...
"""
    channels = 1
    default_label_values = (0, 1, 2)
    demo_cases = 20

    def __init__(self, root, split_counts: Sequence[int] = (185, 25, 50), **kwargs) -> None:
        super().__init__(root, split_counts, **kwargs)

    def cases(self) -> list[dict]:
        task = find_task(self.root, "hippocampus")
        if task is None:
            raise self.not_found("no folder with imagesTr/hippocampus_*.nii.gz (searched two levels down)")
        cases = decathlon_cases(task)
        if not cases:
            raise self.not_found(f"{task} holds no training cases")
        return cases

    @classmethod
    def write_demo(cls, root: Path, n_cases: int | None = None, shape: Sequence[int] | None = None,
                   seed: int = 0) -> None:
        """``n_cases`` (default 20) T1-like crops of about ``shape`` (default 36×50×36 at 1 mm; each case varies
        by a few voxels): a curved hippocampus (head = anterior, body and tail = posterior) in grey matter, with
        white matter above and the temporal horn's CSF beside it."""
        rng = np.random.default_rng(seed)
        n = int(n_cases or cls.demo_cases)
        base = np.array(shape or (36, 50, 36))
        volumes = []
        for i in range(n):
            dims = tuple(int(d) for d in base + rng.integers(-2, 3, 3) * (base >= 20))
            label, tissue = _hippocampus(dims, rng)
            image = mri_intensity(tissue, {0: 0.45, 1: 0.55, 2: 0.55, 3: 0.85, 4: 0.15}, rng, noise=0.03, scale=100)
            affine = affine_from((1.0, 1.0, 1.0), dims)
            volumes.append((f"hippocampus_{i + 1:03d}", image, label, affine))
        write_decathlon(root / "Task04_Hippocampus", "Hippocampus", volumes,
                        labels={"0": "background", "1": "Anterior", "2": "Posterior"}, modality={"0": "MRI"},
                        description="Left and right hippocampus segmentation (synthetic demo)")


def _hippocampus(dims: tuple[int, int, int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Label (0/1/2) and tissue map (0 GM, 1/2 hippocampus, 3 WM, 4 CSF) of one synthetic crop (1 mm voxels)."""
    x, y, z = (np.arange(d, dtype=float) - (d - 1) / 2 for d in dims)
    X, Y, Z = np.meshgrid(x, y, z, indexing="ij")
    half = dims[1] / 2 * rng.uniform(0.6, 0.75)                 # half length along y (anterior = -y)
    t = np.clip((Y + half) / (2 * half), 0.0, 1.0)               # 0 at the head, 1 at the tail
    xc = rng.uniform(-1.5, 1.5) + rng.uniform(1.0, 3.0) * np.sin(np.pi * t)
    zc = rng.uniform(-2, 0) + rng.uniform(3.0, 6.0) * t**2     # the tail curves upwards
    r = rng.uniform(4.0, 5.5) * (1.0 - 0.5 * t)                   # thick head, thin tail
    inside_len = np.abs(Y) <= half
    d = ((X - xc) / r) ** 2 + ((Z - zc) / (0.75 * r)) ** 2
    hippo = (d < 1.0) & inside_len
    label = np.zeros(dims, np.uint8)
    split = rng.uniform(0.35, 0.45)
    label[hippo & (t < split)] = 1
    label[hippo & (t >= split)] = 2
    tissue = np.zeros(dims, np.uint8)
    tissue[Z > zc + 1.3 * r + 2] = 3                             # white matter above
    horn = (d >= 1.0) & (d < 1.6) & (X > xc) & (Z > zc) & inside_len
    tissue[horn] = 4                                             # temporal horn (CSF)
    tissue[label == 1] = 1
    tissue[label == 2] = 2
    return label, tissue
