"""From a run's config to validated, split and cached volumes: the data every engine of a run reads."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from pipeline.data.loading import available_memory, choose_cache, estimate_cache_bytes, volume_dataset
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


def prepare_data(parser) -> PreparedData:
    """Read, validate and split the dataset of a config; build the cached volume datasets.

    Validation runs on every case before anything is cached or trained. The split is the user's split file when
    ``split_file`` is set, else the source's deterministic split (seed ``dataset::split_seed`` when the dataset
    sets one, else ``seed``). The cache is chosen by ``cache`` (``memory``, ``disk`` or ``auto``: memory when the
    estimated size fits in ``cache_memory_fraction`` of the available memory; see :mod:`pipeline.data.loading`).

    Returns:
        a :class:`PreparedData`.

    Raises:
        pipeline.data.sources.DatasetNotFoundError: no data where the config points.
        pipeline.data.sources.InvalidDatasetError: every problem found in the data, one per line.
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
    split_file = parser.get_parsed_content("split_file")
    seed = int(parser.get_parsed_content("seed"))
    split_seed = int(dataset.get("split_seed", seed))
    if split_file:
        split, origin = load_split_file(split_file, cases), f"split file {split_file}"
    else:
        split, origin = source.split(cases, split_seed), f"dataset (seed {split_seed})"
    by_id = {c["id"]: c for c in cases}
    parts = {k: [by_id[i] for i in split.get(k, [])] for k in SPLITS}
    preprocess = parser.get_parsed_content("preprocess")
    workers = int(parser.get_parsed_content("num_workers"))
    mode = str(parser.get("cache", "memory"))
    estimate = None
    if mode == "auto":
        used = [c for part in parts.values() for c in part]
        estimate = estimate_cache_bytes(used, preprocess)
        fraction = float(parser.get_parsed_content("cache_memory_fraction")) if "cache_memory_fraction" in parser \
            else 0.5
        mode = choose_cache(mode, estimate, available_memory(), fraction)
        log.info("cache: %s (estimated %.2f GB)", mode, estimate / 1e9)
    cache_dir = parser.get_parsed_content("cache_dir") if mode == "disk" else None
    slice_axis = int(dataset.get("slice_axis", 2))
    key = _preprocess_key(parser) if mode == "disk" else ""
    volumes = {k: volume_dataset(v, preprocess, workers, mode, cache_dir, slice_axis, key)
               for k, v in parts.items() if v}
    return PreparedData(dataset, parts, split, volumes, origin, mode, estimate)
