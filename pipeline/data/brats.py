"""BraTS 2019: multi-modal brain tumour MRI (FLAIR, T1, T1ce, T2), glioma sub-regions.

Layout (as ``MICCAI_BraTS_2019_Data_Training.zip`` unpacks; ``DATA_DIR`` is that folder or one holding it)::

    MICCAI_BraTS_2019_Data_Training/
      HGG/BraTS19_2013_2_1/
        BraTS19_2013_2_1_flair.nii.gz
        BraTS19_2013_2_1_t1.nii.gz
        BraTS19_2013_2_1_t1ce.nii.gz
        BraTS19_2013_2_1_t2.nii.gz
        BraTS19_2013_2_1_seg.nii.gz    0, 1 necrotic / non-enhancing core, 2 edema, 4 enhancing tumour (no 3)
      LGG/BraTS19_2013_0_1/ …

240×240×155 voxels at 1 mm, co-registered and skull-stripped; 335 cases (259 HGG, 76 LGG). Case folders directly in
``DATA_DIR`` (later BraTS releases) are read too. Paper split 235 / 35 / 65 cases (stratified here by grade).
The label mapping (4 → 3 for training) and the evaluation regions (ET, TC, WT) are in ``configs/dataset/brats.yaml``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.data.demo import mri_intensity, save_nifti, smooth_noise
from pipeline.data.files import FileDatasetSource, find_dir, list_dir, nifti_stem

MODALITIES = ("flair", "t1", "t1ce", "t2")
GRADES = ("HGG", "LGG")


def _is_case_dir(d: Path) -> bool:
    return d.is_dir() and d.name.lower().startswith("brats")


def _has_cases(d: Path) -> bool:
    return any((list_dir(d).get(g.lower()) or Path("/nonexistent")).is_dir() for g in GRADES) or any(
        _is_case_dir(p) for p in list_dir(d).values())


class BraTSSource(FileDatasetSource):
    """BraTS 2019 training data: four modalities stacked as channels (in ``modalities`` order), labels 0/1/2/4.

    Args:
        root: the ``MICCAI_BraTS_2019_Data_Training`` folder (or a folder holding it).
        modalities: file suffixes of the image channels, in channel order (default flair, t1, t1ce, t2).
        split_counts, label_values, stratify, fold, affine_atol: see
            :class:`pipeline.data.files.FileDatasetSource` (default split 235/35/65, stratified by ``grade``).
    """

    name = "brats"
    url = "https://www.med.upenn.edu/cbica/brats2019/data.html (MICCAI_BraTS_2019_Data_Training, after registration)"
    layout = """
MICCAI_BraTS_2019_Data_Training/
  HGG/BraTS19_2013_2_1/
    BraTS19_2013_2_1_flair.nii.gz   _t1.nii.gz   _t1ce.nii.gz   _t2.nii.gz
    BraTS19_2013_2_1_seg.nii.gz
  LGG/BraTS19_2013_0_1/ ...
"""
    default_label_values = (0, 1, 2, 4)
    demo_cases = 8

    def __init__(self, root, modalities: Sequence[str] = MODALITIES, split_counts: Sequence[int] = (235, 35, 65),
                 stratify: str | None = "grade", **kwargs) -> None:
        super().__init__(root, split_counts, stratify=stratify, **kwargs)
        self.modalities = [m.lower() for m in modalities]
        self.channels = len(self.modalities)

    def cases(self) -> list[dict]:
        top = find_dir(self.root, _has_cases)
        if top is None:
            raise self.not_found("no HGG/ or LGG/ folder of BraTS* case folders (searched two levels down)")
        folders = [(g, list_dir(top).get(g.lower())) for g in GRADES]
        folders = [(g, d) for g, d in folders if d is not None and d.is_dir()] or [("", top)]
        cases = []
        for grade, folder in folders:
            for d in list_dir(folder).values():
                if _is_case_dir(d):
                    cases.append(self._case(d, grade))
        if not cases:
            raise self.not_found(f"{top} holds no BraTS* case folders")
        return sorted(cases, key=lambda c: c["id"])

    def _case(self, folder: Path, grade: str) -> dict:
        by_suffix = {}
        for p in list_dir(folder).values():
            stem = nifti_stem(p.name)
            if stem is not None and "_" in stem:
                by_suffix[stem.rsplit("_", 1)[1].lower()] = p
        cid = folder.name

        def path(suffix: str) -> str:
            return str(by_suffix.get(suffix, folder / f"{cid}_{suffix}.nii.gz"))

        return {"id": cid, "grade": grade, "image": [path(m) for m in self.modalities], "label": path("seg")}

    @classmethod
    def write_demo(cls, root: Path, n_cases: int | None = None, shape: Sequence[int] | None = None,
                   seed: int = 0) -> None:
        """``n_cases`` subjects (default 8: 6 HGG, 2 LGG) on the BraTS grid ``shape`` (default 240×240×155 at 1 mm,
        BraTS's LPS-style affine): a skull-stripped brain (cortex, white matter, ventricles) holding a tumour of
        nested regions, each visible differently per modality: edema bright in FLAIR and T2, the enhancing rim
        bright in T1ce, the necrotic core dark in T1 and T1ce. LGG tumours have no enhancing part."""
        rng = np.random.default_rng(seed)
        n = int(n_cases or cls.demo_cases)
        shape = tuple(int(s) for s in (shape or (240, 240, 155)))
        spacing = (240.0 / shape[0], 240.0 / shape[1], 155.0 / shape[2])
        affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
        affine[1, 3] = spacing[1] * (shape[1] - 1)
        n_lgg = max(1, n // 4)
        for i in range(n):
            grade = "LGG" if i >= n - n_lgg else "HGG"
            cid = f"BraTS19_DEMO_{i + 1:03d}_1"
            folder = root / "MICCAI_BraTS_2019_Data_Training" / grade / cid
            label, tissue = _brain_with_tumour(shape, spacing, rng, enhancing=grade == "HGG")
            fields = (smooth_noise(shape, rng, sigma=max(2.0, min(shape) / 4)), smooth_noise(shape, rng, 1.0))
            # tissue codes: 1 CSF, 2 GM, 3 WM, 4 edema, 5 enhancing, 6 necrosis
            means = {
                "flair": {1: 0.08, 2: 0.55, 3: 0.45, 4: 0.95, 5: 0.7, 6: 0.5},
                "t1": {1: 0.2, 2: 0.55, 3: 0.78, 4: 0.45, 5: 0.5, 6: 0.25},
                "t1ce": {1: 0.2, 2: 0.55, 3: 0.75, 4: 0.45, 5: 1.0, 6: 0.22},
                "t2": {1: 1.0, 2: 0.5, 3: 0.35, 4: 0.8, 5: 0.6, 6: 0.9},
            }
            brain = tissue > 0
            for m in MODALITIES:
                img = mri_intensity(tissue, means[m], rng, noise=0.02, scale=1000.0, fields=fields)
                img[~brain] = 0.0  # skull-stripped
                save_nifti(np.clip(img, 0, 32767).astype(np.int16), affine, folder / f"{cid}_{m}.nii.gz")
            save_nifti(label, affine, folder / f"{cid}_seg.nii.gz", dtype=np.uint8)


def _brain_with_tumour(shape, spacing, rng, enhancing: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """BraTS labels (0, 1, 2, 4) and a tissue map of one synthetic subject (coordinates in mm)."""
    axes = [((np.arange(n) - (n - 1) / 2) * s).astype(np.float32) for n, s in zip(shape, spacing)]
    X, Y, Z = np.meshgrid(*axes, indexing="ij", sparse=True)
    radii = np.array([68.0, 85.0, 62.0]) * rng.uniform(0.92, 1.05, 3)
    wobble = 0.06 * smooth_noise(shape, rng, sigma=max(2.0, min(shape) / 6))
    head = (X / radii[0]) ** 2 + (Y / radii[1]) ** 2 + ((Z + 5) / radii[2]) ** 2 + wobble
    brain = head < 1.0
    tissue = np.zeros(shape, np.uint8)
    tissue[brain] = 3                                          # white matter
    tissue[brain & (head > 0.72)] = 2                          # cortex
    tissue[brain & (head > 0.93)] = 1                          # sulcal CSF
    vent = ((np.abs(X) - 9) / 7) ** 2 + (Y / 28) ** 2 + ((Z - 8) / 14) ** 2 < 1.0
    tissue[vent & brain] = 1
    # the tumour: nested regions around a centre in one hemisphere
    c = np.array([rng.choice([-1, 1]) * rng.uniform(20, 38), rng.uniform(-35, 35), rng.uniform(-5, 25)])
    r = rng.uniform(14, 22)
    shape_noise = 0.25 * smooth_noise(shape, rng, sigma=max(2.0, min(shape) / 12))
    d = np.sqrt((X - c[0]) ** 2 + ((Y - c[1]) / 1.15) ** 2 + ((Z - c[2]) / 0.95) ** 2) / r + shape_noise
    label = np.zeros(shape, np.uint8)
    label[brain & (d < 1.8)] = 2                               # edema
    if enhancing:
        label[brain & (d < 1.0)] = 4                           # enhancing rim
        label[brain & (d < 0.7)] = 1                           # necrotic core
    else:
        label[brain & (d < 0.9)] = 1                           # non-enhancing core
    tissue[label == 2] = 4
    tissue[label == 4] = 5
    tissue[label == 1] = 6
    return label, tissue
