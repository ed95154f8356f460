"""ACDC: the Automated Cardiac Diagnosis Challenge (MICCAI 2017), cine MRI, short-axis stacks.

Layout (as the archive unpacks; ``DATA_DIR`` is the ``database`` folder or one holding ``training/``)::

    training/
      patient001/
        Info.cfg                       ED: 1 / ES: 12 / Group: DCM / Height / NbFrame / Weight
        patient001_4d.nii.gz           (all frames; not used)
        patient001_frame01.nii.gz      end-diastolic (ED) frame
        patient001_frame01_gt.nii.gz   its labels: 0 background, 1 RV cavity, 2 myocardium, 3 LV cavity
        patient001_frame12.nii.gz      end-systolic (ES) frame
        patient001_frame12_gt.nii.gz
      … patient100/
    testing/patient101 … 150/          (read too when ``subsets`` lists it)

Each labelled frame is one volume (case id ``patient001_frame01``, with ``phase`` ED or ES); the split is by
patient (both frames of a patient in the same split), stratified by the diagnostic group of ``Info.cfg``. Paper
split: 70 / 10 / 20 patients.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.data.demo import mri_intensity, save_nifti
from pipeline.data.files import FileDatasetSource, find_dir, list_dir, nifti_stem

_PATIENT = re.compile(r"^patient\d+$", re.IGNORECASE)
_FRAME = re.compile(r"^(patient\d+)_frame(\d+)(_gt)?$", re.IGNORECASE)
GROUPS = ("DCM", "HCM", "MINF", "NOR", "RV")


def read_info(path: Path) -> dict[str, str]:
    """``Info.cfg`` as a dict (``{"ED": "1", "ES": "12", "Group": "DCM", …}``); empty when missing or unreadable."""
    info = {}
    try:
        for line in path.read_text(errors="replace").splitlines():
            key, sep, value = line.partition(":")
            if sep:
                info[key.strip()] = value.strip()
    except OSError:
        pass
    return info


def _patients(folder: Path) -> list[Path]:
    return [p for p in list_dir(folder).values() if p.is_dir() and _PATIENT.match(p.name)]


class ACDCSource(FileDatasetSource):
    """ACDC cine MRI: ED and ES frames of each patient, one channel, labels 0–3.

    Args:
        root: the ``database`` folder (holding ``training/``), or the ``training`` folder itself.
        subsets: which sub-folders to read (default ``["training"]``, the 100 patients the paper split).
        split_counts, label_values, stratify, fold, affine_atol: see
            :class:`pipeline.data.files.FileDatasetSource` (default split 70/10/20 patients, stratified by
            ``group``).
    """

    name = "acdc"
    url = "https://www.creatis.insa-lyon.fr/Challenge/acdc/ (ACDC database, after registration)"
    layout = """
database/
  training/
    patient001/
      Info.cfg                      (ED: 1, ES: 12, Group: DCM, ...)
      patient001_frame01.nii.gz     + patient001_frame01_gt.nii.gz
      patient001_frame12.nii.gz     + patient001_frame12_gt.nii.gz
    ... patient100/
"""
    channels = 1
    default_label_values = (0, 1, 2, 3)
    demo_cases = 10

    def __init__(self, root, subsets: Sequence[str] = ("training",), split_counts: Sequence[int] = (70, 10, 20),
                 stratify: str | None = "group", **kwargs) -> None:
        super().__init__(root, split_counts, stratify=stratify, **kwargs)
        self.subsets = list(subsets)

    def _folders(self) -> list[Path]:
        top = find_dir(self.root, lambda d: any(_patients(d / s) for s in self.subsets if (d / s).is_dir())
                       or bool(_patients(d)))
        if top is None:
            return []
        if _patients(top) and not any((top / s).is_dir() for s in self.subsets):
            return [top]  # DATA_DIR is the training folder itself
        return [top / s for s in self.subsets if (top / s).is_dir()]

    def cases(self) -> list[dict]:
        folders = self._folders()
        if not folders:
            raise self.not_found("no training/patientNNN folders found (searched two levels down)")
        cases = []
        for folder in folders:
            for patient in _patients(folder):
                cases += self._patient_cases(patient)
        if not cases:
            raise self.not_found(f"the patient folders under {folders[0]} hold no frame files")
        return sorted(cases, key=lambda c: c["id"])

    @staticmethod
    def _patient_cases(patient: Path) -> list[dict]:
        entries = list_dir(patient)
        info = read_info(entries["info.cfg"]) if "info.cfg" in entries else {}
        files: dict[int, dict[str, Path]] = {}
        for p in entries.values():
            m = _FRAME.match(nifti_stem(p.name) or "")
            if m:
                files.setdefault(int(m.group(2)), {})["label" if m.group(3) else "image"] = p
        phases = {}
        for phase in ("ED", "ES"):
            try:
                phases[int(info[phase])] = phase
            except (KeyError, ValueError):
                pass
        name = patient.name
        out = []
        for frame in sorted(set(files) | set(phases)):
            found = files.get(frame, {})
            stem = f"{name}_frame{frame:02d}"
            out.append({
                "id": stem, "subject": name, "phase": phases.get(frame, ""), "group": info.get("Group", ""),
                "image": str(found.get("image", patient / f"{stem}.nii.gz")),
                "label": str(found.get("label", patient / f"{stem}_gt.nii.gz")),
            })
        return out

    @classmethod
    def write_demo(cls, root: Path, n_cases: int | None = None, shape: Sequence[int] | None = None,
                   seed: int = 0, n_frames: int = 10) -> None:
        """``n_cases`` patients (default 10, two per diagnostic group) with an oblique short-axis stack of
        ``shape`` (default 160×160×9 at 1.5625×1.5625×10 mm): body, lungs, LV cavity inside its myocardium, RV
        crescent on the septal side, shrinking from base to apex and from ED to ES; ``Info.cfg``, the 4D file
        (``n_frames`` frames) and the ED and ES frames with their ground truth."""
        rng = np.random.default_rng(seed)
        n = int(n_cases or cls.demo_cases)
        shape = tuple(int(s) for s in (shape or (160, 160, 9)))
        spacing = (1.5625, 1.5625, 10.0) if shape[0] >= 64 else (250.0 / shape[0], 250.0 / shape[1], 10.0)
        for i in range(n):
            name = f"patient{i + 1:03d}"
            group = GROUPS[i % len(GROUPS)]
            folder = root / "training" / name
            folder.mkdir(parents=True)
            es = int(rng.integers(max(2, n_frames // 2 - 1), n_frames - 1))
            size = {"DCM": 1.3, "HCM": 0.85, "MINF": 1.15, "NOR": 1.0, "RV": 0.95}[group]
            heart = {"lv": 24.0 * size * rng.uniform(0.92, 1.08), "wall": 8.0 * (1.4 if group == "HCM" else 1.0),
                     "rv": 1.5 if group == "RV" else 1.0, "ef": 0.25 if group in ("DCM", "MINF") else 0.55,
                     "center": rng.uniform(-12, 12, 2), "angle": rng.uniform(0, 2 * np.pi)}
            affine = _oblique_affine(spacing, shape, rng)
            frames, labels = [], {}
            for t in range(1, n_frames + 1):
                phase = 0.5 - 0.5 * np.cos(np.pi * min((t - 1) / max(es - 1, 1), 1.0)) if t <= es else \
                    0.5 + 0.5 * np.cos(np.pi * (t - es) / max(n_frames - es, 1))
                label, tissue = _heart(shape, spacing, heart, phase)
                img = mri_intensity(tissue, {0: 0.0, 1: 0.55, 2: 0.22, 3: 0.95, 4: 0.06, 5: 0.4, 6: 0.8}, rng,
                                    noise=0.03, scale=300.0)
                frames.append(np.clip(img, 0, 32767).astype(np.int16))
                if t in (1, es):
                    labels[t] = label
            save_nifti(np.stack(frames, -1), affine, folder / f"{name}_4d.nii.gz")
            for t, label in labels.items():
                save_nifti(frames[t - 1], affine, folder / f"{name}_frame{t:02d}.nii.gz")
                save_nifti(label, affine, folder / f"{name}_frame{t:02d}_gt.nii.gz", dtype=np.uint8)
            (folder / "Info.cfg").write_text(
                f"ED: 1\nES: {es}\nGroup: {group}\nHeight: {rng.uniform(155, 195):.1f}\nNbFrame: {n_frames}\n"
                f"Weight: {rng.uniform(50, 110):.1f}\n"
            )


def _oblique_affine(spacing, shape, rng) -> np.ndarray:
    """A short-axis orientation: the stack axis tilted from the body axes, as cardiac planning does."""
    a, b = rng.uniform(0.4, 0.8), rng.uniform(-0.6, -0.2)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
    m = rz @ rx @ np.diag(spacing)
    affine = np.eye(4)
    affine[:3, :3] = m
    affine[:3, 3] = -m @ ((np.asarray(shape) - 1) / 2) + rng.uniform(-20, 20, 3)
    return affine


def _heart(shape, spacing, h, phase: float) -> tuple[np.ndarray, np.ndarray]:
    """Label (1 RV, 2 myocardium, 3 LV) and tissue map of one frame; ``phase`` 0 = ED, 1 = ES."""
    x, y = ((np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape[:2], spacing[:2]))
    X, Y = np.meshgrid(x, y, indexing="ij")
    label = np.zeros(shape, np.uint8)
    tissue = np.zeros(shape, np.uint8)
    body = (X / (shape[0] * spacing[0] * 0.47)) ** 2 + (Y / (shape[1] * spacing[1] * 0.40)) ** 2
    cx, cy = h["center"]
    c, s = np.cos(h["angle"]), np.sin(h["angle"])
    u, v = (X - cx) * c + (Y - cy) * s, -(X - cx) * s + (Y - cy) * c  # heart frame, RV towards -u
    nz = shape[2]
    for k in range(nz):
        frac = k / max(nz - 1, 1)                                    # 0 base … 1 apex
        taper = np.sqrt(max(1.0 - frac**2 * 0.85, 0.05))
        lv_r = h["lv"] * taper * (1.0 - h["ef"] * 0.45 * phase)
        wall = h["wall"] * (1.0 + 0.5 * phase)
        d_lv = np.sqrt(u**2 + (v / 1.08) ** 2)
        lung = ((np.abs(X - cx) - 55) / 45) ** 2 + ((Y - cy) / 70) ** 2 < 1.0
        t = np.where(body < 1.0, 5, 0).astype(np.uint8)             # chest wall / liver-like tissue
        t[(body > 0.8) & (body < 1.0)] = 6                           # subcutaneous fat
        t[lung & (body < 0.8)] = 4
        sl = np.zeros(shape[:2], np.uint8)
        if frac < 0.85:
            rv_r = lv_r * 1.15 * h["rv"] * (1.0 - 0.3 * phase) * (1 - 0.6 * frac)
            rv = ((u + lv_r + wall + rv_r * 0.15) / (rv_r * 0.75)) ** 2 + (v / (rv_r * 1.4)) ** 2 < 1.0
            sl[rv & (d_lv > lv_r + wall)] = 1
        sl[d_lv < lv_r + wall] = 2
        sl[d_lv < lv_r] = 3 if frac < 0.95 else 2
        t[sl == 1] = 3
        t[sl == 3] = 3
        t[sl == 2] = 2
        t[(t == 4) & (d_lv < lv_r + wall + 12)] = 1                  # pericardial tissue between heart and lungs
        label[..., k] = sl
        tissue[..., k] = t
    return label, tissue
