"""Shared pieces of the sources that read an official dataset archive: tolerant file lookup, the common
validation and the split by the paper's counts.

Tolerance where real archives vary: names compare case-insensitively, ``.nii`` and ``.nii.gz`` are both accepted,
hidden files (``.DS_Store``, macOS ``._*`` resource forks) and extra files are ignored, and the folder given may be
the dataset's own top folder or one that holds it (searched two levels deep).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from pipeline.data.sources import DatasetSource
from pipeline.data.splits import leave_one_out, split_cases
from pipeline.data.validation import check_cases

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def visible(p: Path) -> bool:
    """Not a hidden file or folder (``.DS_Store``, ``._name`` resource forks) nor a ``__MACOSX`` folder."""
    return not p.name.startswith(".") and p.name != "__MACOSX"


def list_dir(folder: Path) -> dict[str, Path]:
    """Visible entries of ``folder`` by lower-case name (empty when the folder is missing)."""
    if not folder.is_dir():
        return {}
    return {p.name.lower(): p for p in sorted(folder.iterdir()) if visible(p)}


def subdir(folder: Path, name: str) -> Path | None:
    """The sub-folder ``name`` of ``folder``, compared case-insensitively."""
    p = list_dir(folder).get(name.lower())
    return p if p is not None and p.is_dir() else None


def nifti_stem(name: str) -> str | None:
    """``"a_b.nii.gz"`` → ``"a_b"``, ``"A.NII"`` → ``"A"``; ``None`` for other files."""
    low = name.lower()
    for suffix in NIFTI_SUFFIXES:
        if low.endswith(suffix):
            return name[: -len(suffix)]
    return None


def niftis(folder: Path) -> dict[str, Path]:
    """NIfTI files of ``folder`` by lower-case stem (``.nii.gz`` preferred when both exist)."""
    out: dict[str, Path] = {}
    for p in list_dir(folder).values():
        stem = nifti_stem(p.name)
        if stem is not None and p.is_file() and (stem.lower() not in out or p.name.lower().endswith(".gz")):
            out[stem.lower()] = p
    return out


def find_dir(root: Path, test: Callable[[Path], bool], depth: int = 2) -> Path | None:
    """``root`` itself if ``test(root)``, else the first (sorted) visible sub-folder up to ``depth`` levels down."""
    level = [root]
    for _ in range(depth + 1):
        nxt = []
        for d in level:
            if d.is_dir() and test(d):
                return d
            nxt += [p for p in list_dir(d).values() if p.is_dir()]
        level = nxt
    return None


class FileDatasetSource(DatasetSource):
    """A dataset read from its official archive layout.

    Validation is :func:`pipeline.data.validation.check_cases` with the dataset's number of image channels and
    label values; the split is :func:`pipeline.data.splits.split_cases` with the paper's counts, or a
    leave-one-out fold.

    Args:
        root: the extracted dataset folder (or a folder holding it).
        split_counts: subjects for train, val and test (the paper's; proportional when there are fewer or more).
        label_values: the values label files may hold (default: the dataset's).
        stratify: a case key to stratify the split by (e.g. ``group``), or ``None``.
        fold: a leave-one-out fold index (test = that subject, val = the next) instead of ``split_counts``.
        affine_atol: tolerance when comparing image and label affines (mm).
    """

    #: image channels (modalities) per case
    channels: int = 1
    #: values the label files hold
    default_label_values: tuple[int, ...] = (0, 1)
    #: cases (subjects) of the demo sample: enough for every split of ``split_counts`` to be non-empty
    demo_cases: int = 10

    def __init__(
        self,
        root: str | os.PathLike,
        split_counts: Sequence[int] = (70, 10, 20),
        label_values: Sequence[float] | None = None,
        stratify: str | None = None,
        fold: int | None = None,
        affine_atol: float = 1e-3,
    ) -> None:
        super().__init__(root)
        self.split_counts = [int(c) for c in split_counts]
        self.label_values = tuple(label_values if label_values is not None else self.default_label_values)
        self.stratify = stratify
        self.fold = fold
        self.affine_atol = float(affine_atol)

    def split(self, cases: list[dict], seed: int) -> dict[str, list[str]]:
        if self.fold is not None:
            return leave_one_out(cases, int(self.fold))
        return split_cases(cases, self.split_counts, seed, self.stratify)

    def validate(self, cases: list[dict]) -> list[str]:
        return check_cases(cases, self.channels, self.label_values, self.affine_atol, root=self.root)

    @classmethod
    def write_demo(cls, root: Path, n_cases: int | None = None, shape: Sequence[int] | None = None,
                   seed: int = 0) -> None:
        """Write a synthetic sample in the official layout into the empty folder ``root``.

        Args:
            root: an empty folder; what it holds afterwards is what ``DATA_DIR`` points at.
            n_cases: number of cases (default: the dataset's demo size, enough for every split).
            shape: the volume grid (default: the dataset's demo grid).
            seed: seed of the random anatomy and noise.
        """
        raise NotImplementedError(f"{cls.__name__} has no demo writer")
