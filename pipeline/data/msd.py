"""The Medical Segmentation Decathlon layout (``TaskNN_Name/{dataset.json, imagesTr/, labelsTr/}``), shared by
Hippocampus (Task04) and the PROMISE prostate set (Task05).

Cases are the union of the training pairs listed in ``dataset.json`` and the files found in ``imagesTr/`` and
``labelsTr/`` (so that an image without a label, or the reverse, is reported rather than skipped). A listed
``.nii.gz`` that exists as ``.nii`` (or in other letter case) is found; macOS ``._*`` files are ignored. A path in
``dataset.json`` must stay inside the task folder (``../…`` or an absolute path is refused, naming it): a dataset
received from elsewhere cannot make the pipeline read files outside it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from pipeline.data.demo import save_nifti
from pipeline.data.files import find_dir, list_dir, nifti_stem, niftis, subdir


def _is_task(d: Path, prefix: str) -> bool:
    images = subdir(d, "imagesTr")
    if images is None:
        return False
    return any(s.startswith(prefix) for s in niftis(images)) or (d / "dataset.json").is_file()


def find_task(root: Path, prefix: str) -> Path | None:
    """The MSD task folder at or under ``root`` whose ``imagesTr`` holds ``<prefix>*.nii[.gz]`` files."""
    return find_dir(root, lambda d: _is_task(d, prefix.lower()))


def listed_path(listing: Path, index: int, key: str, value) -> str:
    """``value``, the ``key`` of the ``index``-th ``training`` entry of ``listing`` (a ``dataset.json``), checked: a
    relative path that stays inside the listing's folder once ``.`` and ``..`` are resolved (symbolic links are not
    followed: a dataset may link its files from elsewhere).

    Raises:
        ValueError: naming the file, the entry and the path, when it is not a string or leaves the folder.
    """
    where = f"{listing}: training[{index}].{key}"
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where} must be a path inside the dataset folder, got {value!r}")
    folder = os.path.normpath(listing.parent.absolute())
    target = os.path.normpath(os.path.join(folder, value))
    if os.path.isabs(value) or not target.startswith(folder + os.sep):
        raise ValueError(f"{where} is {value!r}, a path outside the dataset folder {folder}: dataset.json may only "
                         "list files inside its own folder (e.g. ./imagesTr/<case>.nii.gz)")
    return value


def decathlon_cases(task: Path) -> list[dict]:
    """Cases ``{"id", "image", "label"}`` of an MSD task folder, sorted by id.

    Raises:
        ValueError: ``dataset.json`` exists but is not valid JSON, or lists a path outside the task folder.
    """
    images_dir = subdir(task, "imagesTr") or task / "imagesTr"
    labels_dir = subdir(task, "labelsTr") or task / "labelsTr"
    images, labels = niftis(images_dir), niftis(labels_dir)
    pairs: dict[str, dict] = {}
    listing = list_dir(task).get("dataset.json")
    if listing is not None:
        try:
            meta = json.loads(listing.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{listing} is not valid JSON: {e}") from e
        for i, entry in enumerate(meta.get("training", []) if isinstance(meta, dict) else []):
            if not isinstance(entry, dict) or "image" not in entry:
                continue
            image = listed_path(listing, i, "image", entry["image"])
            label = listed_path(listing, i, "label", entry["label"]) if entry.get("label") is not None else None
            stem = nifti_stem(Path(image).name) or Path(image).name
            pairs[stem.lower()] = {"image": image, "label": label}
    for stem in set(images) | set(labels):
        pairs.setdefault(stem, {})
    cases = []
    for key, entry in pairs.items():
        image = images.get(key) or (task / entry["image"] if entry.get("image") else images_dir / f"{key}.nii.gz")
        label_key = nifti_stem(Path(entry["label"]).name).lower() if entry.get("label") else key
        label = labels.get(label_key) or (task / entry["label"] if entry.get("label") else labels_dir / image.name)
        cid = nifti_stem(Path(image).name) or key
        cases.append({"id": cid, "image": str(Path(image).resolve()), "label": str(Path(label).resolve())})
    return sorted(cases, key=lambda c: c["id"])


def write_decathlon(task: Path, name: str, volumes: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]],
                    labels: dict[str, str], modality: dict[str, str], description: str) -> None:
    """Write an MSD task folder: ``imagesTr/<id>.nii.gz``, ``labelsTr/<id>.nii.gz`` and ``dataset.json``.

    Args:
        volumes: ``(id, image X×Y×Z[×C], label X×Y×Z, affine 4×4)`` per case.
    """
    training = []
    for cid, image, label, affine in volumes:
        save_nifti(image, affine, task / "imagesTr" / f"{cid}.nii.gz")
        save_nifti(label, affine, task / "labelsTr" / f"{cid}.nii.gz", dtype=np.uint8)
        training.append({"image": f"./imagesTr/{cid}.nii.gz", "label": f"./labelsTr/{cid}.nii.gz"})
    (task / "imagesTs").mkdir(exist_ok=True)
    meta = {
        "name": name, "description": description, "reference": "synthetic demo sample (not real data)",
        "licence": "CC-BY-SA 4.0", "release": "demo", "tensorImageSize": "4D" if len(modality) > 1 else "3D",
        "modality": modality, "labels": labels, "numTraining": len(training), "numTest": 0,
        "training": training, "test": [],
    }
    (task / "dataset.json").write_text(json.dumps(meta, indent=4) + "\n")
