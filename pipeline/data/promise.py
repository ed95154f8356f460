"""PROMISE: prostate MRI, in either of its two public layouts.

* **MSD Task05** (the Medical Segmentation Decathlon's prostate set, 32 cases, T2 and ADC as a 4D NIfTI, labels
  1 peripheral zone, 2 transition zone), which is what the paper's 22 / 3 / 7 split with two foreground classes
  matches::

      Task05_Prostate/
        dataset.json
        imagesTr/prostate_00.nii.gz …    (X×Y×Z×2: T2, ADC)
        labelsTr/prostate_00.nii.gz …    (0, 1 PZ, 2 TZ)

* **PROMISE12** (MICCAI 2012 challenge, 50 cases, T2 only, MetaImage, label 1 prostate)::

      TrainingData_Part1/Case00.mhd + Case00.raw, Case00_segmentation.mhd + .raw, …
      TrainingData_Part2/…  TrainingData_Part3/…

``layout: auto`` detects which one ``DATA_DIR`` holds (MSD first); the class names and the number of channels follow
the layout (``configs/dataset/promise.yaml`` reads them from the source). ``.mhd`` files are read with MONAI's
``ITKReader`` (``itk-core``), NIfTI with nibabel.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.data.demo import affine_from, mri_intensity, smooth_noise, write_mhd
from pipeline.data.files import FileDatasetSource, find_dir, list_dir
from pipeline.data.msd import decathlon_cases, find_task, write_decathlon
from pipeline.registry import check_name

LAYOUTS = ("auto", "msd", "promise12")
_CASE = re.compile(r"^(case\d+)(_segmentation)?\.mhd$", re.IGNORECASE)
_INFO = {
    "msd": {"class_names": ["background", "PZ", "TZ"], "channels": 2, "label_values": (0, 1, 2)},
    "promise12": {"class_names": ["background", "prostate"], "channels": 1, "label_values": (0, 1)},
}


def _mhd_cases(d: Path) -> bool:
    return any(_CASE.match(p.name) for p in list_dir(d).values())


def _promise12_dirs(top: Path) -> list[Path]:
    parts = [p for p in list_dir(top).values() if p.is_dir() and p.name.lower().startswith("trainingdata")]
    return parts if parts else [top]


class PromiseSource(FileDatasetSource):
    """Prostate MRI from MSD Task05 (2 channels, PZ/TZ) or PROMISE12 (1 channel, whole gland).

    Args:
        root: the extracted ``Task05_Prostate`` folder, or the folder holding ``TrainingData_Part1..3`` (or a
            folder holding either).
        layout: ``auto`` (detect), ``msd`` or ``promise12``.
        split_counts: train/val/test cases (default the paper's 22/3/7; proportional for PROMISE12's 50).
        label_values: allowed label values (default: the layout's).
        stratify, fold, affine_atol: see :class:`pipeline.data.files.FileDatasetSource`.
    """

    name = "promise"
    url = ("http://medicaldecathlon.com (Task05_Prostate.tar, the paper's 2-class set) or "
           "https://promise12.grand-challenge.org (PROMISE12 training data)")
    layout = """
Task05_Prostate/                     (Medical Segmentation Decathlon)
  dataset.json
  imagesTr/prostate_00.nii.gz ...   (4D: T2, ADC)
  labelsTr/prostate_00.nii.gz ...
or PROMISE12:
  TrainingData_Part1/Case00.mhd  Case00.raw  Case00_segmentation.mhd  Case00_segmentation.raw ...
  TrainingData_Part2/ ...  TrainingData_Part3/ ...
"""

    demo_cases = 10

    def __init__(self, root, layout: str = "auto", split_counts: Sequence[int] = (22, 3, 7),
                 label_values: Sequence[float] | None = None, **kwargs) -> None:
        super().__init__(root, split_counts, label_values=label_values, **kwargs)
        self.requested = check_name(str(layout), LAYOUTS, "PROMISE layout")
        self._explicit_labels = label_values is not None
        self._found: tuple[str, Path | None] | None = None

    # ---- layout detection -----------------------------------------------------------------------------------
    def _detect(self) -> tuple[str, Path | None]:
        if self._found is None:
            task = find_task(self.root, "prostate") if self.requested in ("auto", "msd") else None
            if task is not None:
                self._found = ("msd", task)
            else:
                top = find_dir(self.root, lambda d: _mhd_cases(d) or any(
                    _mhd_cases(p) for p in _promise12_dirs(d) if p != d)) if self.requested != "msd" else None
                self._found = ("promise12", top) if top is not None else (
                    "promise12" if self.requested == "promise12" else "msd", None)
        return self._found

    @property
    def layout_name(self) -> str:
        """``msd`` or ``promise12``: the layout found (or requested; MSD, the paper's, when nothing is found)."""
        return self._detect()[0]

    @property
    def class_names(self) -> list[str]:
        return list(_INFO[self.layout_name]["class_names"])

    @property
    def in_channels(self) -> int:
        return int(_INFO[self.layout_name]["channels"])

    @property
    def channels(self) -> int:  # used by the validation
        return self.in_channels

    def validate(self, cases: list[dict]) -> list[str]:
        if not self._explicit_labels:
            self.label_values = tuple(_INFO[self.layout_name]["label_values"])
        return super().validate(cases)

    # ---- cases ----------------------------------------------------------------------------------------------
    def cases(self) -> list[dict]:
        layout, where = self._detect()
        if where is None:
            raise self.not_found("neither imagesTr/prostate_*.nii.gz (MSD Task05) nor CaseNN.mhd files (PROMISE12) "
                                 "found (searched two levels down)")
        if layout == "msd":
            cases = decathlon_cases(where)
        else:
            cases = []
            for folder in _promise12_dirs(where):
                found: dict[str, dict[str, Path]] = {}
                for p in list_dir(folder).values():
                    m = _CASE.match(p.name)
                    if m:
                        found.setdefault(m.group(1), {})["label" if m.group(2) else "image"] = p
                for name, files in found.items():
                    cases.append({
                        "id": name,
                        "image": str(files.get("image", folder / f"{name}.mhd")),
                        "label": str(files.get("label", folder / f"{name}_segmentation.mhd")),
                    })
            cases.sort(key=lambda c: c["id"])
        if not cases:
            raise self.not_found(f"{where} holds no cases")
        return cases

    # ---- demo -----------------------------------------------------------------------------------------------
    @classmethod
    def write_demo(cls, root: Path, n_cases: int | None = None, shape: Sequence[int] | None = None,
                   seed: int = 0, layout: str = "msd") -> None:
        """``n_cases`` pelvic MRI scans (default 10) on the grid ``shape`` (default 256×256×16 at 0.625×0.625×3.6
        mm): the prostate (transition zone inside, peripheral zone as a posterior crescent), rectum behind it,
        bladder above, muscle and fat around. ``layout="msd"``: Task05 layout, T2 and ADC as a 4D NIfTI, labels
        PZ/TZ. ``layout="promise12"``: PROMISE12 layout, T2 as ``.mhd/.raw`` in three parts, label 1 = gland."""
        layout = check_name(str(layout), ("msd", "promise12"), "PROMISE demo layout")
        rng = np.random.default_rng(seed)
        n = int(n_cases or cls.demo_cases)
        shape = tuple(int(s) for s in (shape or (256, 256, 16)))
        spacing = (160.0 / shape[0], 160.0 / shape[1], 57.6 / shape[2])
        volumes = []
        for i in range(n):
            label, tissue = _pelvis(shape, spacing, rng)
            fields = (smooth_noise(shape, rng, sigma=max(2.0, min(shape) / 4)), smooth_noise(shape, rng, 1.0))
            t2 = mri_intensity(tissue, {1: 0.8, 2: 0.45, 3: 0.3, 4: 0.9, 5: 1.0, 6: 0.15}, rng, noise=0.03,
                               scale=1000.0, fields=fields)
            t2 = np.clip(t2, 0, 32767).astype(np.int16)
            if layout == "msd":
                adc = mri_intensity(tissue, {1: 0.75, 2: 0.5, 3: 0.4, 4: 0.3, 5: 1.0, 6: 0.2}, rng, noise=0.05,
                                    scale=2000.0)
                image = np.stack([t2.astype(np.float32), adc], -1)
                volumes.append((f"prostate_{i:02d}", image, label, affine_from(spacing, shape)))
            else:
                part = root / f"TrainingData_Part{1 + i * 3 // n}"
                offset = [-s * (d - 1) / 2 for s, d in zip(spacing, shape)]
                write_mhd(t2, spacing, offset, part / f"Case{i:02d}.mhd")
                write_mhd((label > 0).astype(np.uint8), spacing, offset, part / f"Case{i:02d}_segmentation.mhd")
        if layout == "msd":
            write_decathlon(root / "Task05_Prostate", "PROSTATE", volumes,
                            labels={"0": "background", "1": "PZ", "2": "TZ"}, modality={"0": "T2", "1": "ADC"},
                            description="Prostate transitional zone and peripheral zone segmentation (synthetic)")


def _pelvis(shape, spacing, rng) -> tuple[np.ndarray, np.ndarray]:
    """Labels (1 PZ, 2 TZ) and tissue map (1 PZ, 2 TZ, 3 muscle, 4 fat, 5 bladder, 6 rectum) of one pelvis (mm)."""
    axes = [((np.arange(n) - (n - 1) / 2) * s).astype(np.float32) for n, s in zip(shape, spacing)]
    X, Y, Z = np.meshgrid(*axes, indexing="ij", sparse=True)
    tissue = np.full(shape, 4, np.uint8)                                         # fat
    muscle = ((np.abs(X) - 45) / 22) ** 2 + (Y / 45) ** 2 < 1.0                  # obturator muscles
    tissue[np.broadcast_to(muscle, shape)] = 3
    c = np.array([rng.uniform(-4, 4), rng.uniform(-2, 6), rng.uniform(-8, 4)])
    r = np.array([rng.uniform(20, 26), rng.uniform(15, 20), rng.uniform(17, 24)])
    wob = 0.1 * smooth_noise(shape, rng, sigma=max(2.0, min(shape) / 6))
    d = ((X - c[0]) / r[0]) ** 2 + ((Y - c[1]) / r[1]) ** 2 + ((Z - c[2]) / r[2]) ** 2 + wob
    gland = d < 1.0
    tz = (((X - c[0]) / (0.62 * r[0])) ** 2 + ((Y - c[1] - 0.25 * r[1]) / (0.62 * r[1])) ** 2
          + ((Z - c[2]) / (0.7 * r[2])) ** 2 + wob) < 1.0
    label = np.zeros(shape, np.uint8)
    label[gland] = 1                                                             # peripheral zone
    label[gland & tz] = 2                                                        # transition zone
    rectum = (((X - c[0]) / 18) ** 2 + ((Y - c[1] + r[1] + 14) / 12) ** 2 < 1.0) & (Z < c[2] + 20)
    bladder = ((X - c[0]) / 35) ** 2 + ((Y - c[1] - 5) / 30) ** 2 + ((Z - c[2] - r[2] - 25) / 22) ** 2 < 1.0
    tissue[np.broadcast_to(rectum, shape)] = 6
    tissue[np.broadcast_to(bladder, shape) & (label == 0)] = 5
    tissue[label > 0] = label[label > 0]
    return label, tissue
