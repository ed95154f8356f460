"""Dataset sources: each reads one dataset's on-disk layout into a list of cases and proposes a split.

A *case* is a dict of file paths for MONAI's ``LoadImaged``: ``image`` (a path, or a list of paths for stacked
modalities), ``label``, optionally ``probs`` (soft reference labels, ``K`` channels), and ``id``. Everything after
the source (transforms, caching, slicing, training) is the same for every dataset; the dataset's config selects
its source and preprocessing.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from pathlib import Path

SPLITS = ("train", "val", "test")


class DatasetNotFoundError(FileNotFoundError):
    """The dataset folder is missing or does not hold the expected layout; the message says what and where."""


class InvalidDatasetError(ValueError):
    """The dataset holds bad cases; the message lists every problem found, one per line, naming each case."""


class DatasetSource(ABC):
    """Reads a dataset folder into cases.

    Args:
        root: the dataset folder.
    """

    #: a short name, the same as the dataset's config file name
    name: str = ""
    #: where the dataset is published (shown when the data are missing)
    url: str = ""
    #: the expected layout as a short tree (shown when the data are missing)
    layout: str = ""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    @abstractmethod
    def cases(self) -> list[dict]:
        """All cases of the dataset, sorted by ``id``. Raises :class:`DatasetNotFoundError` when absent."""

    @abstractmethod
    def split(self, cases: list[dict], seed: int) -> dict[str, list[str]]:
        """Case ids per split (``train``, ``val``, ``test``), deterministic for a given seed."""

    def validate(self, cases: list[dict]) -> list[str]:
        """Problems found in the cases (empty when all is well): one message per problem, naming the case."""
        return []

    def not_found(self, detail: str) -> DatasetNotFoundError:
        """The error for a folder without this dataset: what was searched, the layout expected, where the dataset
        is published, and how to write a demo sample."""
        lines = [f"no {self.name or type(self).__name__} data in {self.root}: {detail}."]
        if self.layout:
            tree = self.layout.strip("\n").splitlines()
            lines += ["Expected layout (DATA_DIR is the top folder):", *("    " + t for t in tree)]
        if self.url:
            lines.append(f"The dataset is published at {self.url} (download it there, then extract it).")
        lines.append(
            f"Point DATA_DIR at the extracted folder (make train DATASET={self.name} DATA_DIR=/path/to/it), or write "
            f"a small synthetic sample in this layout with: make demo-data DATASET={self.name}"
        )
        return DatasetNotFoundError("\n".join(lines))


def load_split_file(path: str | os.PathLike, cases: list[dict]) -> dict[str, list[str]]:
    """Read a user's split file (``{"train": [ids], "val": [ids], "test": [ids]}``) and check it against the cases.

    Raises:
        FileNotFoundError: no such file.
        ValueError: malformed content, unknown case ids, a case in two splits, or an empty train/test split.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split file not found: {path}")
    try:
        split = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"split file {path} is not valid JSON: {e}") from e
    if not isinstance(split, dict) or any(k not in split for k in SPLITS):
        raise ValueError(f"split file {path} must be a JSON object with keys {list(SPLITS)}")
    known = {c["id"] for c in cases}
    seen: dict[str, str] = {}
    for part in SPLITS:
        for cid in split[part]:
            if cid not in known:
                raise ValueError(f"split file {path}: case '{cid}' in '{part}' is not in the dataset")
            if cid in seen:
                raise ValueError(f"split file {path}: case '{cid}' is in both '{seen[cid]}' and '{part}'")
            seen[cid] = part
    for part in ("train", "test"):
        if not split[part]:
            raise ValueError(f"split file {path}: the '{part}' split is empty")
    return {part: list(split[part]) for part in SPLITS}
