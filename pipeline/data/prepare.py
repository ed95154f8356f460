"""From a run's config to validated, split and cached volumes: the data every engine of a run reads."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline.data.loading import (
    NonFiniteImageError,
    available_memory,
    choose_cache,
    estimate_cache_bytes,
    raise_non_finite,
    volume_dataset,
)
from pipeline.data.sources import SPLITS, InvalidDatasetError, load_split_file

log = logging.getLogger("pipeline")


@dataclass
class PreparedData:
    """The data of a run: the dataset config, the cases and ids of each split, and the cached volume datasets.

    Attributes:
        dataset: the parsed ``dataset`` block (class names, channels, slice axis, evaluation regions, …).
        cases: ``{split: [case dict]}`` for ``train``, ``val``, ``test``.
        split: ``{split: [case ids]}`` (what ``splits.json`` holds).
        volumes: ``{split: cached volume dataset}`` for the non-empty splits.
        split_origin: ``"split file <path>"`` or ``"dataset (seed n)"``.
        cache: ``"memory"`` or ``"disk"``.
        cache_estimate_bytes: the ``cache: auto`` estimate, or ``None``.
    """

    dataset: dict
    cases: dict
    split: dict
    volumes: dict
    split_origin: str
    cache: str
    cache_estimate_bytes: int | None = None

    @property
    def class_names(self) -> list[str]:
        return list(self.dataset["class_names"])

    @property
    def slice_axis(self) -> int:
        return int(self.dataset.get("slice_axis", 2))

    @property
    def regions(self) -> dict:
        """The evaluation regions (``{name: [training classes]}``, e.g. BraTS ET/TC/WT); empty for most datasets."""
        return dict(self.dataset.get("eval_regions") or {})


def _preprocess_key(parser) -> str:
    """A text describing the resolved preprocessing (part of the disk cache's file hashes)."""
    comps = parser.get_parsed_content("preprocess", instantiate=False)
    conf = [c.get_config() if hasattr(c, "get_config") else c for c in comps]
    return json.dumps(conf, sort_keys=True, default=str)


def _split(parser, dataset: dict, source, cases: list[dict]) -> tuple[dict, str]:
    split_file = parser.get_parsed_content("split_file")
    split_seed = int(dataset.get("split_seed", parser.get_parsed_content("seed")))
    if split_file:
        return load_split_file(split_file, cases), f"split file {split_file}"
    return source.split(cases, split_seed), f"dataset (seed {split_seed})"


def split_cases(parser) -> tuple[list[dict], dict]:
    """The cases of a config's dataset and their split (``split_file`` when set, else the source's seeded split with
    ``dataset::split_seed``, default ``seed``), without validating or reading the images.

    Returns:
        ``(cases, {split: [ids]})``.
    """
    dataset = parser.get_parsed_content("dataset")
    cases = dataset["source"].cases()
    return cases, _split(parser, dataset, dataset["source"], cases)[0]


def _file_signature(path: str) -> list:
    """Name, size and the sha256 of the first 64 KiB of a file: cheap, and changes with the data."""
    p = Path(path)
    with open(p, "rb") as f:
        head = hashlib.sha256(f.read(1 << 16)).hexdigest()
    return [p.name, p.stat().st_size, head]


def data_fingerprint(parser) -> str:
    """A short hash of a config's data: every case of every split with its files' signatures (name, size, head).

    The same files in the same split give the same fingerprint on any machine (the folder they sit in plays no
    part); a changed, added or moved case changes it.
    """
    cases, split = split_cases(parser)
    by_id = {c["id"]: c for c in cases}
    entries = []
    for part in SPLITS:
        for cid in split.get(part, []):
            files = {}
            for key, value in sorted(by_id[cid].items()):
                paths = [value] if isinstance(value, str) else value if isinstance(value, list) else []
                sig = [_file_signature(v) for v in paths if isinstance(v, str) and Path(v).is_file()]
                if sig:
                    files[key] = sig
            entries.append([part, cid, files])
    return hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()[:16]


def prepare_data(parser, share: Callable[[str, list[dict]], list[dict]] | None = None,
                 processes_per_node: int = 1) -> PreparedData:
    """Read, validate and split the dataset of a config; build the cached volume datasets.

    Validation runs on every case before anything is cached or trained. The split is the user's split file when
    ``split_file`` is set, else the source's deterministic split (seed ``dataset::split_seed`` when the dataset
    sets one, else ``seed``). The cache is chosen by ``cache`` (``memory``, ``disk`` or ``auto``: memory when the
    estimated size fits in ``cache_memory_fraction`` of the available memory; see :mod:`pipeline.data.loading`).

    Args:
        parser: the run's config.
        share: ``(split, cases) -> the cases this process caches`` in a multi-process run
            (:meth:`pipeline.distributed.DistributedRun.share`); default all. ``cases`` and ``split`` always hold
            the whole split; ``volumes`` only what this process caches.
        processes_per_node: the processes sharing this machine's memory: ``cache: auto`` compares this process's
            estimate with ``cache_memory_fraction`` of its share (the available memory divided by them).

    Returns:
        a :class:`PreparedData`.

    Raises:
        pipeline.data.sources.DatasetNotFoundError: no data where the config points.
        pipeline.data.sources.InvalidDatasetError: every problem found in the data, one per line.
        pipeline.data.loading.NonFiniteImageError: every image with NaN or infinite values after preprocessing.
    """
    dataset = parser.get_parsed_content("dataset")
    source = dataset["source"]
    cases = source.cases()
    problems = source.validate(cases)
    if problems:
        raise InvalidDatasetError(
            f"{len(problems)} problem(s) in the {parser['dataset_name']} dataset at {source.root}; nothing was "
            "trained:\n  - " + "\n  - ".join(problems)
        )
    split, origin = _split(parser, dataset, source, cases)
    by_id = {c["id"]: c for c in cases}
    parts = {k: [by_id[i] for i in split.get(k, [])] for k in SPLITS}
    cached = {k: share(k, v) if share is not None else v for k, v in parts.items()}
    preprocess = parser.get_parsed_content("preprocess")
    workers = int(parser.get_parsed_content("num_workers"))
    mode = str(parser.get("cache", "memory"))
    estimate = None
    if mode == "auto":
        used = [c for part in cached.values() for c in part]
        estimate = estimate_cache_bytes(used, preprocess)
        fraction = float(parser.get_parsed_content("cache_memory_fraction")) if "cache_memory_fraction" in parser \
            else 0.5
        mode = choose_cache(mode, estimate, available_memory() // max(1, int(processes_per_node)), fraction)
        log.info("cache: %s (estimated %.2f GB)", mode, estimate / 1e9)
    cache_dir = parser.get_parsed_content("cache_dir") if mode == "disk" else None
    slice_axis = int(dataset.get("slice_axis", 2))
    key = _preprocess_key(parser) if mode == "disk" else ""
    volumes, bad = {}, []
    for k, v in cached.items():
        if v:
            try:
                volumes[k] = volume_dataset(v, preprocess, workers, mode, cache_dir, slice_axis, key)
            except NonFiniteImageError as e:  # go on: every bad image of every split is named at once
                bad += e.problems
    raise_non_finite(bad)
    return PreparedData(dataset, parts, split, volumes, origin, mode, estimate)
