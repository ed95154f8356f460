"""From cases to batches: cached 3D volumes, 2D training slices taken from them, and data loaders.

Volumes pass once through the dataset's deterministic ``preprocess`` transforms and are cached, either

* in memory: MONAI's ``CacheDataset`` (``cache: memory``), or
* on disk: :class:`DiskVolumeCache` (``cache: disk``), one file per preprocessed volume, stored slice-major and
  memory-mapped, so that a training slice reads only that slice's bytes (MONAI's ``PersistentDataset`` returns
  whole volumes: one full load per slice).

``cache: auto`` (the default) picks memory when the estimated cache fits in ``cache_memory_fraction`` of the
memory available now, else disk (:func:`choose_cache`). Training draws 2D slices along the dataset's
``slice_axis`` from the cached volumes and applies the random 2D ``augment`` transforms to each; evaluation takes
whole volumes, one per batch.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from monai.data import CacheDataset, DataLoader, MetaTensor, list_data_collate
from monai.transforms import Compose, Transform
from torch.utils.data import Dataset, RandomSampler

from pipeline.data.validation import FileProblem, read_header
from pipeline.io import save_torch_atomic
from pipeline.registry import check_name
from pipeline.tensors import check_slice_axis, plain

TRAIN_KEYS = ("image", "label")
CACHE_MODES = ("memory", "disk", "auto")
_DISK_FORMAT = 1


class NonFiniteImageError(ValueError):
    """Images with NaN or infinite values after preprocessing; the message names every such case.

    Args:
        problems: one line per bad image (:func:`non_finite_problems`), kept as :attr:`problems`.
    """

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__(self.problems[0] if len(self.problems) == 1 else
                         f"{len(self.problems)} images hold NaN or infinite values after preprocessing:\n  "
                         + "\n  ".join(self.problems))


def non_finite_problems(data: dict, keys: Sequence[str] = ("image",)) -> list[str]:
    """One line per tensor of ``data`` under ``keys`` that holds NaN or infinite values (empty when all finite)."""
    problems = []
    for k in keys:
        t = data.get(k)
        if isinstance(t, torch.Tensor):
            n = int((~torch.isfinite(plain(t))).sum())
            if n:
                problems.append(
                    f"case {data.get('id', '?')}: {n} NaN or infinite value(s) in '{k}' after preprocessing "
                    f"({getattr(data[k], 'meta', {}).get('filename_or_obj', 'file unknown')})")
    return problems


def raise_non_finite(problems: Sequence[str]) -> None:
    """Raise :class:`NonFiniteImageError` listing every problem at once (nothing when ``problems`` is empty)."""
    if problems:
        raise NonFiniteImageError(problems)


class SliceMajord(Transform):
    """Lay each tensor out in memory with ``slice_axis`` outermost, keeping its shape, values and meta data.

    A ``C×X×Y×Z`` volume stored this way gives each slice along the axis as one contiguous block, so that taking a
    training slice copies a block instead of gathering values spread over the whole volume (for a BraTS volume,
    about fifty times faster). Shapes and indexing are unchanged; only the strides differ.
    """

    def __init__(self, slice_axis: int = 2) -> None:
        self.dim = check_slice_axis(slice_axis) + 1

    def __call__(self, data: dict) -> dict:
        out = dict(data)
        for k, v in data.items():
            if isinstance(v, torch.Tensor) and v.ndim == 4:
                t = plain(v).movedim(self.dim, 0).contiguous().movedim(0, self.dim)
                out[k] = MetaTensor(t, meta=v.meta, applied_operations=list(v.applied_operations)) \
                    if isinstance(v, MetaTensor) else t
        return out


def _compose(preprocess: Sequence[Callable] | Callable) -> Compose:
    return preprocess if isinstance(preprocess, Compose) else Compose(list(preprocess))


def available_memory() -> int:
    """Bytes of memory available now (Linux ``MemAvailable``; elsewhere free physical pages)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def _tensor_bytes(item: dict) -> int:
    return sum(v.numel() * v.element_size() for v in item.values() if isinstance(v, torch.Tensor))


def _input_voxels(case: dict) -> int:
    total = 0
    for key in ("image", "label"):
        paths = case.get(key)
        for p in paths if isinstance(paths, (list, tuple)) else [paths]:
            try:
                h = read_header(p)
            except FileProblem:
                continue
            total += int(np.prod(h.shape)) * h.channels
    return total


def estimate_cache_bytes(cases: Sequence[dict], preprocess) -> int:
    """Memory the preprocessed volumes of ``cases`` would take: the first case is preprocessed and measured, the
    others are scaled from it by their voxel counts read from the file headers."""
    if not cases:
        return 0
    first = _compose(preprocess)(dict(cases[0]))
    per_voxel = _tensor_bytes(first) / max(_input_voxels(cases[0]), 1)
    return int(per_voxel * sum(_input_voxels(c) for c in cases))


def choose_cache(mode: str, estimate: int, available: int, fraction: float = 0.5) -> str:
    """``memory`` or ``disk`` for ``mode``: as given, or for ``auto`` memory when ``estimate <= fraction *
    available``.

    >>> choose_cache("auto", 2 << 30, 8 << 30)
    'memory'
    >>> choose_cache("auto", 6 << 30, 8 << 30)
    'disk'
    """
    mode = check_name(str(mode), CACHE_MODES, "cache mode")
    if mode != "auto":
        return mode
    return "memory" if estimate <= fraction * available else "disk"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:60]


class DiskVolumeCache(Dataset):
    """Preprocessed volumes cached on disk, memory-mapped on use.

    Each case is preprocessed once into ``cache_dir/<id>-<hash>.pt`` (written to a temporary file, then renamed);
    the hash covers the case's files (path, size, modification time), ``key`` (a description of the transforms)
    and the slice axis, so changed data or preprocessing make new files. Tensors are stored slice-major
    (``S×C×H×W`` for slices along ``slice_axis``) so that one slice is one contiguous block; files are opened with
    ``torch.load(mmap=True)`` and kept open for the most recent ``max_open`` volumes.

    Items are the same dicts as a ``CacheDataset`` gives (``C×X×Y×Z`` MetaTensors with the affine), built as views
    of the mapped file. :meth:`get_slice` returns one 2D slice without touching the rest of the volume.

    Args:
        cases: the case dicts.
        transform: the deterministic preprocessing.
        cache_dir: the folder of the cache files (created when missing).
        slice_axis: the spatial axis training slices are taken along.
        key: a text describing the transforms (part of each file's hash).
        num_workers: threads preparing missing files.
        max_open: how many mapped files to keep open.
    """

    def __init__(
        self,
        cases: Sequence[dict],
        transform: Callable,
        cache_dir: str | os.PathLike,
        slice_axis: int = 2,
        key: str = "",
        num_workers: int = 0,
        max_open: int = 32,
    ) -> None:
        check_slice_axis(slice_axis)
        self.cases = list(cases)
        self.transform = transform
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.slice_axis = slice_axis
        self.max_open = max_open
        self._open: OrderedDict[int, dict] = OrderedDict()
        self.paths = [self.cache_dir / f"{_safe(str(c.get('id', i)))}-{self._hash(c, key)}.pt"
                      for i, c in enumerate(self.cases)]
        todo = [i for i, p in enumerate(self.paths) if not p.is_file()]
        if num_workers and len(todo) > 1:
            with ThreadPoolExecutor(num_workers) as pool:
                problems = list(pool.map(self._prepare, todo))
        else:
            problems = [self._prepare(i) for i in todo]
        raise_non_finite([p for found in problems for p in found])  # every bad case named at once
        self.index = [torch.load(p, mmap=True, weights_only=True)["index"] for p in self.paths]

    def _hash(self, case: dict, key: str) -> str:
        files = []
        for v in case.values():
            for p in v if isinstance(v, (list, tuple)) else [v]:
                if isinstance(p, str) and os.path.isfile(p):
                    st = os.stat(p)
                    files.append([p, st.st_size, st.st_mtime_ns])
        text = json.dumps({"case": case, "files": files, "key": key, "axis": self.slice_axis,
                           "format": _DISK_FORMAT}, sort_keys=True, default=str)
        return hashlib.sha1(text.encode()).hexdigest()[:16]

    def _prepare(self, i: int) -> list[str]:
        """Preprocess case ``i`` into its file; returns its NaN/Inf problems instead (and writes nothing)."""
        item = self.transform(dict(self.cases[i]))
        problems = non_finite_problems(item)
        if problems:
            return problems
        axis = self.slice_axis + 1
        tensors, meta, other = {}, {}, {}
        for k, v in item.items():
            if isinstance(v, torch.Tensor):
                t = v.as_tensor() if isinstance(v, MetaTensor) else v
                if k == "label" and t.numel() and t.min() >= 0 and t.max() < 256 and torch.equal(t, t.round()):
                    t = t.to(torch.uint8)
                tensors[k] = t.movedim(axis, 0).contiguous()
                if isinstance(v, MetaTensor):
                    meta[k] = {"affine": v.affine.clone(), "filename_or_obj": str(v.meta.get("filename_or_obj", ""))}
            elif isinstance(v, (str, int, float, bool)) or v is None:
                other[k] = v
        label = tensors.get("label")
        nonempty = [] if label is None else label.reshape(label.shape[0], -1).amax(1).gt(0).tolist()
        index = {"n_slices": int(next(iter(tensors.values())).shape[0]), "nonempty": nonempty}
        save_torch_atomic({"tensors": tensors, "meta": meta, "other": other, "index": index}, self.paths[i])
        return []

    def _load(self, i: int) -> dict:
        if i in self._open:
            self._open.move_to_end(i)
            return self._open[i]
        obj = torch.load(self.paths[i], mmap=True, weights_only=True)
        self._open[i] = obj
        while len(self._open) > self.max_open:
            self._open.popitem(last=False)
        return obj

    def __getstate__(self) -> dict:  # worker processes open their own maps
        state = dict(self.__dict__)
        state["_open"] = OrderedDict()
        return state

    def __len__(self) -> int:
        return len(self.cases)

    def n_slices(self, i: int) -> int:
        return self.index[i]["n_slices"]

    def nonempty(self, i: int) -> list[bool]:
        """Per slice: whether its label holds any foreground."""
        return self.index[i]["nonempty"]

    def get_slice(self, i: int, s: int, keys: Sequence[str] = TRAIN_KEYS) -> dict:
        """Slice ``s`` of volume ``i`` along the slice axis: ``{key: C×H×W float32}``, read from the mapped file."""
        tensors = self._load(i)["tensors"]
        return {k: tensors[k][s].to(torch.float32, copy=True) for k in keys}  # read now, never a view of the map

    def __getitem__(self, i: int) -> dict:
        obj = self._load(i)
        axis = self.slice_axis + 1
        out = dict(obj["other"])
        for k, t in obj["tensors"].items():
            vol = t.movedim(0, axis)
            vol = vol.float() if k == "label" else vol
            m = obj["meta"].get(k)
            out[k] = MetaTensor(vol, affine=m["affine"], meta={"filename_or_obj": m["filename_or_obj"]}) if m else vol
        return out


def volume_dataset(
    cases: Sequence[dict],
    preprocess: Sequence[Callable] | Callable,
    num_workers: int = 0,
    cache: str = "memory",
    cache_dir: str | os.PathLike | None = None,
    slice_axis: int = 2,
    key: str = "",
) -> Dataset:
    """The preprocessed volumes of ``cases``, cached in memory (``CacheDataset``, ``copy_cache=False``: consumers
    must not mutate; laid out slice-major along ``slice_axis`` by :class:`SliceMajord`) or on disk
    (:class:`DiskVolumeCache` in ``cache_dir``). Images with NaN or infinite values stop the preparation with one
    :class:`NonFiniteImageError` naming every such case."""
    transform = _compose(preprocess)
    if cache == "disk":
        if cache_dir is None:
            raise ValueError("cache='disk' needs a cache_dir")
        return DiskVolumeCache(cases, transform, cache_dir, slice_axis, key, num_workers)
    if cache != "memory":
        raise ValueError(f"cache must be 'memory' or 'disk' here, got {cache!r}")
    ds = CacheDataset(
        data=list(cases), transform=Compose([*transform.transforms, SliceMajord(slice_axis)]), cache_rate=1.0,
        num_workers=num_workers or None, copy_cache=False, as_contiguous=False, progress=False,
    )
    raise_non_finite([p for i in range(len(ds)) for p in non_finite_problems(ds[i])])
    return ds


class SliceDataset(Dataset):
    """2D slices along ``slice_axis`` of the volumes of a cached volume dataset, with random 2D transforms.

    Each item is ``{"image": C×H×W, "label": 1×H×W}`` as plain tensors (the volume's 3D affine does not apply to a
    slice), plus ``id`` and ``slice``. With a :class:`DiskVolumeCache` (slice-major, memory-mapped, same slice
    axis) each item reads only its slice.

    Args:
        volumes: a dataset of dicts with ``image`` ``C×X×Y×Z`` and ``label`` ``1×X×Y×Z``.
        slice_axis: the spatial axis (0, 1 or 2) along which to slice.
        transform: random 2D transforms applied to each slice (e.g. flips, affine, intensity).
        skip_empty: drop slices whose label is background only.
    """

    def __init__(
        self, volumes: Dataset, slice_axis: int = 2, transform: Callable | None = None, skip_empty: bool = False
    ) -> None:
        self.volumes = volumes
        self.axis = check_slice_axis(slice_axis) + 1  # skip the channel axis
        self.transform = transform
        self.sliced = isinstance(volumes, DiskVolumeCache) and volumes.slice_axis == slice_axis
        self.index: list[tuple[int, int]] = []
        for v in range(len(volumes)):
            if self.sliced:
                keep = volumes.nonempty(v) if skip_empty else [True] * volumes.n_slices(v)
                self.index.extend((v, s) for s, k in enumerate(keep) if k)
                continue
            label = volumes[v]["label"]
            n = label.shape[self.axis]
            if skip_empty:
                reduce_dims = [d for d in range(label.ndim) if d != self.axis]
                keep = torch.as_tensor(label).amax(dim=reduce_dims) > 0
                self.index.extend((v, int(s)) for s in torch.nonzero(keep).flatten())
            else:
                self.index.extend((v, s) for s in range(n))

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        v, s = self.index[i]
        if self.sliced:
            item = self.volumes.get_slice(v, s)
            vid = self.volumes.cases[v].get("id", str(v))
        else:
            vol = self.volumes[v]
            item = {k: plain(vol[k]).select(self.axis, s).clone() for k in TRAIN_KEYS}
            vid = vol.get("id", str(v))
        if self.transform is not None:
            item = self.transform(item)
        item = {k: plain(t) for k, t in item.items()}
        item["id"] = vid
        item["slice"] = s
        return item


class EpochStartSampler(RandomSampler):
    """PyTorch's ``RandomSampler`` (the same indices from the same generator), drawing all of an epoch's random
    numbers when the epoch's first batch is drawn.

    ``RandomSampler`` makes a last, empty draw from its generator lazily, after the epoch's last index; when the
    number of items is a multiple of the batch size that draw falls after the epoch ended (at the next epoch's
    start), after ``last.pt`` saved the generator. Drawn at once, the generator saved at an epoch's end is the one
    the next epoch starts from, so a resumed run shuffles as an uninterrupted one; an uninterrupted run draws the
    same numbers in the same order as with ``RandomSampler``.
    """

    def __iter__(self):
        return iter(list(super().__iter__()))


def train_loader(
    volumes: Dataset,
    slice_axis: int,
    augment: Sequence[Callable] | Callable | None,
    batch_size: int,
    num_workers: int = 0,
    skip_empty: bool = False,
    seed: int = 0,
) -> DataLoader:
    """Shuffled batches of augmented 2D slices (the generator is seeded for reproducible order)."""
    transform = None if augment is None else (augment if isinstance(augment, Compose) else Compose(list(augment)))
    if transform is not None:
        transform.set_random_state(seed=seed)
    slices = SliceDataset(volumes, slice_axis, transform, skip_empty)
    if len(slices) == 0:
        raise ValueError("no training slice: the training split is empty or every slice was skipped")
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(slices, batch_size=batch_size, sampler=EpochStartSampler(slices, generator=generator),
                      num_workers=num_workers, drop_last=False, generator=generator)


def volume_loader(volumes: Dataset, num_workers: int = 0) -> DataLoader:
    """One whole volume per batch, in order."""
    return DataLoader(volumes, batch_size=1, shuffle=False, num_workers=num_workers, collate_fn=list_data_collate)
