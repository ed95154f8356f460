"""MRBrainS18: brain MRI of 7 subjects (T1, T1-IR, T2-FLAIR at 3 T), ten structure labels.

Layout (as ``MRBrainS18`` training data unpack; ``DATA_DIR`` is the folder holding ``training/``)::

    training/
      1/
        pre/reg_T1.nii.gz        registered to the FLAIR, 240×240×48 at 0.958×0.958×3.0 mm
        pre/reg_IR.nii.gz
        pre/FLAIR.nii.gz
        orig/…                   (original scans; not used)
        segm.nii.gz              1 cortical GM, 2 basal ganglia, 3 WM, 4 WM lesions, 5 extracerebral CSF,
                                 6 ventricles, 7 cerebellum, 8 brain stem, 9 infarction, 10 other
      4/  5/  7/  14/  070/  148/

The three tissue classes (GM = {1, 2}, WM = {3, 4}, CSF = {5, 6}; the rest background) come from a label mapping in
``configs/dataset/mrbrains.yaml``. The paper trained on 5 subjects and tested on 2 (and ran leave-one-out); here one
of the 5 is held out for model selection (4 / 1 / 2), or ``fold`` selects a leave-one-out fold.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.data.demo import mri_intensity, save_nifti, smooth_noise
from pipeline.data.files import FileDatasetSource, find_dir, list_dir, niftis, subdir

SUBJECTS = ("1", "4", "5", "7", "14", "070", "148")
MODALITIES = ("reg_T1", "reg_IR", "FLAIR")
_SUBJECT = re.compile(r"^\d+$")


def _subjects(d: Path) -> list[Path]:
    return [p for p in list_dir(d).values() if p.is_dir() and _SUBJECT.match(p.name)
            and (subdir(p, "pre") is not None or "segm" in niftis(p))]


class MRBrainSSource(FileDatasetSource):
    """MRBrainS18: ``modalities`` from each subject's ``pre/`` stacked as channels, labels 0–10 in ``segm``.

    Args:
        root: the folder holding ``training/`` (or the ``training`` folder itself).
        modalities: file names (without extension) in ``pre/``, in channel order (default reg_T1, reg_IR, FLAIR).
        split_counts: train/val/test subjects (default 4/1/2: the paper's 5 training subjects, one held out for
            model selection).
        fold: a leave-one-out fold (0–6: test = that subject in sorted order, val = the next; the paper's
            leave-one-out evaluation), instead of ``split_counts``.
        label_values, stratify, affine_atol: see :class:`pipeline.data.files.FileDatasetSource`.
    """

    name = "mrbrains"
    url = "https://mrbrains18.isi.uu.nl (training data, after registration)"
    layout = """
training/
  1/
    pre/reg_T1.nii.gz  pre/reg_IR.nii.gz  pre/FLAIR.nii.gz
    segm.nii.gz
  4/  5/  7/  14/  070/  148/
"""
    default_label_values = tuple(range(11))
    demo_cases = 7

    def __init__(self, root, modalities: Sequence[str] = MODALITIES, split_counts: Sequence[int] = (4, 1, 2),
                 **kwargs) -> None:
        super().__init__(root, split_counts, **kwargs)
        self.modalities = list(modalities)
        self.channels = len(self.modalities)

    def cases(self) -> list[dict]:
        top = find_dir(self.root, lambda d: bool(_subjects(d)))
        if top is None:
            raise self.not_found("no training/<subject>/pre/ folders found (searched two levels down)")
        cases = []
        for folder in _subjects(top):
            pre = niftis(subdir(folder, "pre") or folder / "pre")
            image = [str(pre.get(m.lower(), folder / "pre" / f"{m}.nii.gz")) for m in self.modalities]
            label = str(niftis(folder).get("segm", folder / "segm.nii.gz"))
            cases.append({"id": folder.name, "image": image, "label": label})
        return sorted(cases, key=lambda c: c["id"])

    @classmethod
    def write_demo(cls, root: Path, n_cases: int | None = None, shape: Sequence[int] | None = None,
                   seed: int = 0) -> None:
        """The 7 MRBrainS18 subjects (or the first ``n_cases`` of them; more get further numbers) on the grid
        ``shape`` (default 240×240×48 at 0.958×0.958×3.0 mm): a head with scalp and skull around a brain with all
        ten labels (cortex, basal ganglia, white matter with lesions, extracerebral CSF, ventricles, cerebellum and
        brain stem in the lower slices, an occasional infarct), in T1, T1-IR and FLAIR contrasts, in ``pre/`` (the
        unused ``orig/`` scans are not written)."""
        rng = np.random.default_rng(seed)
        n = int(n_cases or cls.demo_cases)
        names = list(SUBJECTS[:n]) + [str(200 + i) for i in range(max(0, n - len(SUBJECTS)))]
        shape = tuple(int(s) for s in (shape or (240, 240, 48)))
        spacing = (230.0 / shape[0], 230.0 / shape[1], 144.0 / shape[2])
        affine = np.diag([*spacing, 1.0])
        affine[:3, 3] = [-s * (d - 1) / 2 for s, d in zip(spacing, shape)]
        # tissue codes: the labels 1-10, 11 scalp, 12 skull
        means = {
            "reg_T1": {1: 0.55, 2: 0.62, 3: 0.85, 4: 0.55, 5: 0.15, 6: 0.12, 7: 0.7, 8: 0.8, 9: 0.3, 10: 0.4,
                       11: 0.9, 12: 0.08},
            "reg_IR": {1: 0.45, 2: 0.55, 3: 0.9, 4: 0.5, 5: 0.03, 6: 0.02, 7: 0.65, 8: 0.85, 9: 0.1, 10: 0.3,
                       11: 0.7, 12: 0.05},
            "FLAIR": {1: 0.62, 2: 0.58, 3: 0.45, 4: 0.95, 5: 0.06, 6: 0.05, 7: 0.55, 8: 0.5, 9: 0.2, 10: 0.4,
                      11: 0.8, 12: 0.05},
        }
        for name in names:
            folder = root / "training" / name
            label, tissue = _head(shape, spacing, rng)
            fields = (smooth_noise(shape, rng, sigma=max(2.0, min(shape) / 4)), smooth_noise(shape, rng, 1.0))
            for m in MODALITIES:
                img = mri_intensity(tissue, means[m], rng, noise=0.02, scale=1000.0, fields=fields)
                img = np.clip(img, 0, 32767).astype(np.int16)
                save_nifti(img, affine, folder / "pre" / f"{m}.nii.gz")
            save_nifti(label, affine, folder / "segm.nii.gz", dtype=np.uint8)


def _head(shape, spacing, rng) -> tuple[np.ndarray, np.ndarray]:
    """MRBrainS labels (0-10) and a tissue map (labels + 11 scalp, 12 skull) of one synthetic head (mm)."""
    axes = [((np.arange(n) - (n - 1) / 2) * s).astype(np.float32) for n, s in zip(shape, spacing)]
    X, Y, Z = np.meshgrid(*axes, indexing="ij", sparse=True)
    radii = np.array([70.0, 88.0, 75.0]) * rng.uniform(0.93, 1.05, 3)
    wobble = 0.05 * smooth_noise(shape, rng, sigma=max(2.0, min(shape) / 3))
    head = (X / radii[0]) ** 2 + (Y / radii[1]) ** 2 + ((Z - 10) / radii[2]) ** 2 + wobble
    label = np.zeros(shape, np.uint8)
    tissue = np.zeros(shape, np.uint8)
    tissue[head < 1.45] = 11                                      # scalp
    tissue[head < 1.3] = 12                                       # skull
    brain = head < 1.12
    label[brain] = 5                                              # extracerebral CSF
    cortex_noise = 0.04 * smooth_noise(shape, rng, sigma=2.0)
    label[head + cortex_noise < 1.02] = 1                         # cortical grey matter
    label[head + cortex_noise < 0.78] = 3                         # white matter
    lower = Z < -25
    cereb = ((X / 48) ** 2 + ((Y - 45) / 30) ** 2 + ((Z + 45) / 22) ** 2) < 1.0
    label[cereb & brain & lower] = 7                              # cerebellum
    stem = ((X / 11) ** 2 + ((Y - 15) / 12) ** 2 < 1.0) & (Z < -10)
    label[stem & brain] = 8                                       # brain stem
    for side in (-1, 1):
        bg = ((X - side * 20) / 9) ** 2 + ((Y + 5) / 14) ** 2 + ((Z - 8) / 10) ** 2 < 1.0
        label[bg & (label == 3)] = 2                              # basal ganglia
        vent = ((X - side * 8) / 6) ** 2 + ((Y + 0) / 28) ** 2 + ((Z - 18) / 9) ** 2 < 1.0
        label[vent & brain] = 6                                   # ventricles
    for _ in range(int(rng.integers(3, 7))):                      # white-matter lesions
        c = rng.uniform([-40, -50, 5], [40, 50, 40])
        r = rng.uniform(3, 7)
        lesion = ((X - c[0]) ** 2 + (Y - c[1]) ** 2 + ((Z - c[2]) / 1.5) ** 2) < r**2
        label[lesion & (label == 3)] = 4
    if rng.uniform() < 0.5:                                       # an infarct in the cortex
        c = rng.uniform([-50, -60, 10], [50, 60, 40])
        label[(((X - c[0]) ** 2 + (Y - c[1]) ** 2 + (Z - c[2]) ** 2) < 10.0**2) & (label == 1)] = 9
    c = rng.uniform([-30, -40, -10], [30, 40, 20])                # "other" (e.g. a cyst)
    label[(((X - c[0]) ** 2 + (Y - c[1]) ** 2 + (Z - c[2]) ** 2) < 4.0**2) & brain] = 10
    tissue[label > 0] = label[label > 0]
    return label, tissue
