"""The embedded default dataset: the ICBM152 2009a T1 template shipped inside the nilearn wheel (no download).

Four classes, from the template's own tissue maps: 0 background, 1 CSF, 2 GM, 3 WM.

* **Soft reference labels** (``probs``, 4 channels summing to 1): outside the brain mask background = 1; inside
  it GM and WM are the template's probability maps and CSF = clip(1 − GM − WM, 0, 1), renormalised where GM + WM
  exceeds 1. These are kept next to the hard labels so calibration can be measured against tissue probabilities.
* **Hard labels**: the argmax of the soft labels (ties to the lowest class).
* **Image**: the brain-extracted T1 template, already in [0, 1].

One brain (an average of 152 subjects), so it is split *spatially*: the volume is cropped in-plane around the
brain mask, then cut along the axial axis into slabs of ``slab`` slices separated by ``gap`` unused slices, and
each slab gets a role from the repeating ``roles`` pattern. Each slab is written as its own NIfTI file with its
own affine, so that every later stage treats it as an ordinary volume: the test slabs are the "volumes" of the
3D evaluation. Preparation is deterministic and cached in ``root`` with a manifest of its parameters; changed
parameters re-create it.
"""

from __future__ import annotations

import json
import os

import numpy as np

from pipeline.data.sources import SPLITS, DatasetSource
from pipeline.data.validation import FileProblem, check_cases, read_header
from pipeline.io import building_folder, write_json_atomic

CLASS_NAMES = ("background", "CSF", "GM", "WM")
_FORMAT_VERSION = 2


def mni_tissue_volumes(resolution_mm: int = 2) -> dict:
    """Load the template, the tissue maps and the mask from nilearn; return image, soft and hard labels, affine.

    Returns:
        ``{"image": X×Y×Z float32, "probs": X×Y×Z×4 float32, "label": X×Y×Z uint8, "affine": 4×4}``.
    """
    from nilearn import datasets

    t1 = datasets.load_mni152_template(resolution=resolution_mm)
    gm = datasets.load_mni152_gm_template(resolution=resolution_mm).get_fdata()
    wm = datasets.load_mni152_wm_template(resolution=resolution_mm).get_fdata()
    mask = datasets.load_mni152_brain_mask(resolution=resolution_mm).get_fdata() > 0
    inside = mask.astype(np.float64)
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0)
    soft = np.stack([1.0 - inside, inside * csf, inside * gm, inside * wm], axis=-1)
    soft = (soft / soft.sum(-1, keepdims=True)).astype(np.float32)  # labels from the stored float32 values
    return {
        "image": np.clip(t1.get_fdata(), 0.0, 1.0).astype(np.float32),
        "probs": soft,
        "label": soft.argmax(-1).astype(np.uint8),
        "affine": t1.affine.copy(),
        "mask": mask,
    }


def _crop_window(lo: int, hi: int, size: int, length: int) -> tuple[int, int]:
    """A window of ``size`` centred on ``[lo, hi]`` and kept inside ``[0, length)``."""
    if size > length:
        raise ValueError(f"crop size {size} is larger than the volume ({length} voxels)")
    start = (lo + hi + 1) // 2 - size // 2
    start = min(max(start, 0), length - size)
    return start, start + size


def slab_layout(n_slices: int, slab: int, gap: int, roles: list[str]) -> list[tuple[int, int, str]]:
    """Cut ``n_slices`` into slabs of ``slab`` slices separated by ``gap``; roles repeat cyclically.

    >>> slab_layout(12, 3, 1, ["train", "test"])
    [(0, 3, 'train'), (4, 7, 'test'), (8, 11, 'train')]
    """
    if slab < 1 or gap < 0:
        raise ValueError(f"slab must be >= 1 and gap >= 0, got slab={slab}, gap={gap}")
    bad = [r for r in roles if r not in SPLITS]
    if not roles or bad:
        raise ValueError(f"roles must be a non-empty list of {list(SPLITS)}, got {roles}")
    out, start, i = [], 0, 0
    while start + slab <= n_slices:
        out.append((start, start + slab, roles[i % len(roles)]))
        start += slab + gap
        i += 1
    return out


class MNI152Slabs(DatasetSource):
    """The embedded MNI152 dataset, prepared into ``root`` as one NIfTI file per slab.

    Args:
        root: where the prepared slabs are cached (created when missing).
        resolution_mm: template resolution, 1 or 2 mm.
        crop: in-plane size ``(X, Y)`` of the crop centred on the brain mask.
        slab: slices per slab along the axial axis.
        gap: unused slices between two slabs (no neighbouring slice is shared between splits).
        roles: the repeating pattern of split roles for consecutive slabs, from inferior to superior.
    """

    name = "mni"
    #: the template's licence (exported bundles: docs/data_license.txt): the notice the MNI distributes with the
    #: ICBM 2009a templates (nilearn ships the files without it)
    data_license = (
        "ICBM 2009a Nonlinear Symmetric template and tissue probability maps (Fonov et al., NeuroImage 2011; "
        "Fonov et al., NeuroImage 2009), as shipped in the nilearn package. The MNI distributes them with this "
        "notice:\n\n"
        "Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological Institute, "
        "McGill University. Permission to use, copy, modify, and distribute this software and its documentation for "
        "any purpose and without fee is hereby granted, provided that the above copyright notice appear in all "
        "copies. The authors and McGill University make no representations about the suitability of this software "
        "for any purpose. It is provided \"as is\" without express or implied warranty. The authors are not "
        "responsible for any data loss, equipment damage, property loss, or injury to subjects or patients "
        "resulting from the use or misuse of this software package.\n\n"
        "The hard labels and slabs are derived from these files by the MbLS pipeline (pipeline/data/mni.py).")

    def __init__(
        self,
        root: str | os.PathLike,
        resolution_mm: int = 2,
        crop: tuple[int, int] = (80, 96),
        slab: int = 5,
        gap: int = 1,
        roles: list[str] = ("train", "train", "test", "train", "val", "train", "test", "train", "val", "train",
                            "test", "train", "train"),
    ) -> None:
        super().__init__(root)
        self.params = {
            "format": _FORMAT_VERSION,
            "resolution_mm": int(resolution_mm),
            "crop": [int(c) for c in crop],
            "slab": int(slab),
            "gap": int(gap),
            "roles": list(roles),
        }

    # ----------------------------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Write the slabs and the manifest into ``root`` unless an identical preparation is already there."""
        manifest = self.root / "manifest.json"
        if manifest.is_file():
            try:
                if json.loads(manifest.read_text()).get("params") == self.params:
                    return
            except json.JSONDecodeError:
                pass
        import nibabel as nib

        p = self.params
        vol = mni_tissue_volumes(p["resolution_mm"])
        nz = np.argwhere(vol["mask"])
        lo, hi = nz.min(0), nz.max(0)
        (x0, x1), (y0, y1) = (
            _crop_window(lo[a], hi[a], p["crop"][a], vol["image"].shape[a]) for a in range(2)
        )
        z_lo, z_hi = int(lo[2]), int(hi[2]) + 1
        layout = slab_layout(z_hi - z_lo, p["slab"], p["gap"], p["roles"])
        missing = [r for r in ("train", "test") if r not in {role for *_, role in layout}]
        if missing:
            raise ValueError(f"the slab layout {layout} has no {missing} slab; change slab, gap or roles")

        with building_folder(self.root) as tmp:
            cases = []
            for i, (s0, s1, role) in enumerate(layout):
                z0, z1 = z_lo + s0, z_lo + s1
                affine = vol["affine"] @ np.array(
                    [[1, 0, 0, x0], [0, 1, 0, y0], [0, 0, 1, z0], [0, 0, 0, 1]], dtype=np.float64
                )
                cid = f"mni152_slab{i:02d}"
                entry = {"id": cid, "role": role, "z": [z0, z1]}
                for key, dtype in (("image", np.float32), ("label", np.uint8), ("probs", np.float32)):
                    data = vol[key][x0:x1, y0:y1, z0:z1].astype(dtype)
                    rel = f"{key}s/{cid}.nii.gz"
                    (tmp / rel).parent.mkdir(exist_ok=True)
                    img = nib.Nifti1Image(data, affine)
                    img.header.set_xyzt_units("mm")
                    nib.save(img, tmp / rel)
                    entry[key] = rel
                cases.append(entry)
            write_json_atomic(tmp / "manifest.json", {"params": p, "cases": cases, "class_names": CLASS_NAMES})

    def cases(self) -> list[dict]:
        self.prepare()
        manifest = json.loads((self.root / "manifest.json").read_text())
        out = []
        for c in manifest["cases"]:
            out.append({**c, **{k: str(self.root / c[k]) for k in ("image", "label", "probs")}})
        return sorted(out, key=lambda c: c["id"])

    def validate(self, cases: list[dict]) -> list[str]:
        """The prepared files checked as any dataset's files are (a file damaged after its preparation, e.g. cut
        short by a full disk, is named), the soft labels' headers and sizes too."""
        problems = check_cases(cases, 1, range(len(CLASS_NAMES)), root=self.root)
        for c in cases:
            try:
                read_header(c["probs"])
            except FileProblem as e:
                problems.append(f"{c['id']}: {os.path.relpath(c['probs'], self.root)}: {e}")
        return [f"{p} (delete {self.root} to prepare the dataset again)" for p in problems]

    def split(self, cases: list[dict], seed: int) -> dict[str, list[str]]:
        """The spatial split is fixed by the slab roles (the seed plays no part)."""
        return {part: [c["id"] for c in cases if c["role"] == part] for part in SPLITS}
