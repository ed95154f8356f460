"""BUSI: Breast Ultrasound Images (Al-Dhabyani et al. 2020), 2D B-mode PNGs with lesion masks.

Layout (as ``Dataset_BUSI.zip`` unpacks; ``DATA_DIR`` is ``Dataset_BUSI_with_GT`` or a folder holding it)::

    Dataset_BUSI_with_GT/
      benign/benign (1).png, benign (1)_mask.png, benign (1)_mask_1.png (a second lesion), …   (437)
      malignant/malignant (1).png, malignant (1)_mask.png, …                                  (210)
      normal/normal (1).png, normal (1)_mask.png, …                                           (133; not used)

Images of varying size, often stored as RGB (one grey channel is used); masks 0/255. Paper: benign and malignant
only (647 images), resized to 256×256, two classes (background, lesion; a case's masks are merged), split
445 / 65 / 137 (stratified here by class).

Orientation: MONAI's ``PILReader`` returns arrays indexed ``[x, y]`` (width first, the transpose of the PNG's rows):
axis 0 runs across the probe (left–right), axis 1 down into the tissue (depth). Image and masks are read the same
way, so they stay aligned; the base config's left-right flip (``spatial_axis: 0``) mirrors across the probe, never
top-to-bottom (an ultrasound image is never upside down).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.data.files import FileDatasetSource, find_dir, list_dir, subdir

CLASSES = ("benign", "malignant")
_MASK = re.compile(r"^(.*)_mask(?:_\d+)?\.png$", re.IGNORECASE)


def _has_classes(d: Path) -> bool:
    return any(subdir(d, c) is not None for c in (*CLASSES, "normal"))


class BUSISource(FileDatasetSource):
    """BUSI: one grey channel per image; the label is the union of the image's masks (values 0/255).

    Each image is one case: a one-slice volume after preprocessing (``AddSliceAxisd``), so that 2D training and
    per-volume evaluation are the same as for the 3D datasets.

    Args:
        root: ``Dataset_BUSI_with_GT`` (or a folder holding it).
        classes: the class folders to read (default benign and malignant, as the paper; add ``normal`` for all).
        split_counts, label_values, stratify, fold, affine_atol: see
            :class:`pipeline.data.files.FileDatasetSource` (default split 445/65/137, stratified by ``class``).
    """

    name = "busi"
    url = "https://scholar.cu.edu.eg/?q=afahmy/pages/dataset (Dataset_BUSI.zip; also on Kaggle)"
    layout = """
Dataset_BUSI_with_GT/
  benign/     benign (1).png   benign (1)_mask.png   [benign (1)_mask_1.png] ...
  malignant/  malignant (1).png   malignant (1)_mask.png ...
  normal/     (not used)
"""
    default_label_values = (0, 255)
    demo_cases = 20

    def __init__(self, root, classes: Sequence[str] = CLASSES, split_counts: Sequence[int] = (445, 65, 137),
                 stratify: str | None = "class", **kwargs) -> None:
        super().__init__(root, split_counts, stratify=stratify, **kwargs)
        self.classes = [c.lower() for c in classes]

    def cases(self) -> list[dict]:
        top = find_dir(self.root, _has_classes)
        if top is None:
            raise self.not_found("no benign/ or malignant/ folder of PNG files found (searched two levels down)")
        cases = []
        for cls in self.classes:
            folder = subdir(top, cls)
            if folder is None:
                continue
            images: dict[str, Path] = {}
            masks: dict[str, list[Path]] = {}
            for p in list_dir(folder).values():
                if not p.name.lower().endswith(".png"):
                    continue
                m = _MASK.match(p.name)
                if m:
                    masks.setdefault(m.group(1).lower(), []).append(p)
                else:
                    images[p.stem.lower()] = p
            for key in sorted(set(images) | set(masks)):
                image = images.get(key)
                stem = image.stem if image is not None else _MASK.match(masks[key][0].name).group(1)
                found = sorted(masks.get(key, []), key=lambda p: (len(p.name), p.name.lower()))
                cases.append({
                    "id": stem, "class": cls,
                    "image": str(image if image is not None else folder / f"{stem}.png"),
                    "label": [str(p) for p in found] or [str(folder / f"{stem}_mask.png")],
                })
        if not cases:
            raise self.not_found(f"{top} holds no images in {', '.join(self.classes)}/")
        return sorted(cases, key=lambda c: c["id"])

    @classmethod
    def write_demo(cls, root: Path, n_cases: int | None = None, shape: Sequence[int] | None = None,
                   seed: int = 0) -> None:
        """``n_cases`` images (default 20: 12 benign, 8 malignant, plus 3 normal that are not read) of about
        ``shape`` (width × height, default 560×460; each image varies a little): B-mode speckle over skin,
        subcutaneous fat, echogenic glandular tissue and pectoral muscle, darker with depth, with a hypoechoic
        lesion (benign: oval, smooth, posterior enhancement; malignant: irregular, taller than wide, posterior
        shadowing). Some benign images get a second lesion in a ``_mask_1`` file. Images RGB, masks grey 0/255."""
        from PIL import Image

        rng = np.random.default_rng(seed)
        n = int(n_cases or cls.demo_cases)
        n_mal = max(1, round(n * 0.4))
        w0, h0 = (int(s) for s in (shape or (560, 460))[:2])
        top = root / "Dataset_BUSI_with_GT"
        counters = {"benign": 0, "malignant": 0, "normal": 0}
        kinds = ["benign"] * (n - n_mal) + ["malignant"] * n_mal + ["normal"] * max(1, n // 7)
        for kind in kinds:
            counters[kind] += 1
            name = f"{kind} ({counters[kind]})"
            var = 0.1 if w0 >= 64 else 0.0
            w, h = int(w0 * rng.uniform(1 - var, 1 + var)), int(h0 * rng.uniform(1 - var, 1 + var))
            image, masks = _ultrasound(w, h, kind, rng)
            folder = top / kind
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.repeat(image[..., None], 3, -1), "RGB").save(folder / f"{name}.png")
            for k, m in enumerate(masks):
                suffix = "_mask" if k == 0 else f"_mask_{k}"
                Image.fromarray(m, "L").save(folder / f"{name}{suffix}.png")


def _ultrasound(w: int, h: int, kind: str, rng) -> tuple[np.ndarray, list[np.ndarray]]:
    """A B-mode image (H×W uint8) and its lesion masks (H×W, 0/255)."""
    from scipy.ndimage import gaussian_filter

    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    depth = yy / h
    skin = 0.04 + 0.01 * np.sin(xx / w * np.pi * rng.uniform(1, 3))
    fat = skin + rng.uniform(0.12, 0.2) + 0.04 * np.sin(xx / w * np.pi * 2 + rng.uniform(0, 6))
    gland = fat + rng.uniform(0.35, 0.45)
    echo = np.where(depth < skin, 0.9, np.where(depth < fat, 0.35, np.where(depth < gland, 0.7, 0.45)))
    echo = echo * (1 + 0.25 * gaussian_filter(rng.standard_normal((h, w)), 8) * 3)
    masks = []
    lesions = [kind] if kind != "normal" else []
    if kind == "benign" and rng.uniform() < 0.25:
        lesions.append("benign-small")
    shadow = np.ones((h, w), np.float32)
    for k, lesion in enumerate(lesions):
        cx, cy = rng.uniform(0.3, 0.7) * w, rng.uniform(fat.mean() + 0.12, gland.mean() - 0.05) * h
        if k == 1:
            cx = (cx + 0.35 * w) % (0.8 * w) + 0.1 * w
        rx = rng.uniform(0.08, 0.16) * w * (0.5 if lesion == "benign-small" else 1.0)
        ry = rx * (rng.uniform(0.5, 0.75) if lesion != "malignant" else rng.uniform(0.9, 1.3))
        ang = np.arctan2(yy - cy, xx - cx)
        rough = 0.05 if lesion != "malignant" else 0.14
        edge = 1 + rough * (np.sin(ang * rng.integers(4, 8) + rng.uniform(0, 6)) + 0.4 * np.sin(ang * 13))
        inside = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 < edge**2
        echo = np.where(inside, 0.12 if lesion != "malignant" else 0.08, echo)
        below = (yy > cy) & (np.abs(xx - cx) < rx * 0.8)
        shadow = np.where(below, 1.35 if lesion != "malignant" else 0.55, shadow)
        masks.append(np.where(inside, 255, 0).astype(np.uint8))
    if not masks:
        masks.append(np.zeros((h, w), np.uint8))
    echo = echo * gaussian_filter(shadow, 6)
    speckle = gaussian_filter(rng.rayleigh(1.0, (h, w)), 0.8) / 1.1
    gain = np.exp(-1.2 * depth)
    img = np.clip(echo * speckle * gain * 200, 0, 255)
    img[:, : int(0.02 * w)] = 0
    img[:, w - int(0.02 * w):] = 0
    return img.astype(np.uint8), masks
