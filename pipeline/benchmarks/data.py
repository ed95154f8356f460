"""Data benchmark (``make bench-data DATASET=<name> [DATA_DIR=…]``): the cost of getting a dataset ready to train.

For the dataset's demo sample (written afresh into a temporary folder unless ``--data-dir`` is given), measured in
this process, one phase after the other:

1. **validate**: :meth:`DatasetSource.validate` on every case (headers, truncation, label values);
2. **cache in memory**: the config's ``preprocess`` through MONAI's ``CacheDataset`` for every case; the peak
   anonymous resident memory above the level before the phase (sampled every 5 ms; mapped file pages are not
   counted), and the bytes held by the cache;
3. **cache on disk**: the same into a :class:`~pipeline.data.loading.DiskVolumeCache` (cold: preprocess and write;
   warm: reopen the existing files), its size on disk and peak memory;
4. **slices**: reading every training slice once (no augmentation) from each cache.

Each phase runs ``--repeats`` times (default 3): times are the shortest, peak memory the largest, which keeps
timings steadier on a shared machine. Each figure is also given per GB of input, the input being the dataset's files
as stored (compressed NIfTI/PNG) and, in brackets, per GB of uncompressed voxel data. Results are printed and written
to ``bench/data-<dataset>.json``. Timings depend on the machine and on anything else running on it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from pipeline.config import load_config
from pipeline.data.demo import write_demo_data
from pipeline.data.loading import SliceDataset, volume_dataset
from pipeline.data.validation import is_nifti, mhd_geometry, read_header


def _rss() -> int:
    """Anonymous resident memory of this process, bytes (Linux ``RssAnon``: what the process itself holds; pages of
    memory-mapped files, which the kernel can drop at any time, are not counted). 0 where unavailable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


class PeakMemory:
    """Context manager: the peak anonymous resident memory above the level at entry, sampled every ``interval``
    seconds."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.peak = 0

    def __enter__(self) -> PeakMemory:
        self.base = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss() - self.base)
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss() - self.base)


def _files(cases: list[dict]) -> list[str]:
    out = []
    for c in cases:
        for key in ("image", "label"):
            v = c.get(key)
            out += [str(p) for p in (v if isinstance(v, (list, tuple)) else [v])]
    return out


def _uncompressed_bytes(paths: list[str]) -> int:
    total = 0
    for p in paths:
        h = read_header(p)
        if is_nifti(p):
            itemsize = np.dtype(nib.load(p).header.get_data_dtype()).itemsize
        elif p.lower().endswith(".mhd"):
            itemsize = mhd_geometry(Path(p))[3].itemsize
        else:
            itemsize = 1
        total += int(np.prod(h.shape)) * h.channels * itemsize
    return total


def _tensor_bytes(dataset) -> int:

    total = 0
    for i in range(len(dataset)):
        total += sum(v.numel() * v.element_size() for v in dataset[i].values() if isinstance(v, torch.Tensor))
    return total


def _read_slices(volumes, slice_axis: int) -> tuple[int, float]:

    slices = SliceDataset(volumes, slice_axis)
    t0 = time.perf_counter()
    total = 0.0
    for i in range(len(slices)):
        item = slices[i]
        total += float(item["image"].sum())  # touch every value read
    return len(slices), time.perf_counter() - t0


def _best(fn, repeats: int):
    """Run ``fn`` ``repeats`` times: its last result, the shortest time (s) and the largest peak memory (bytes)."""
    best, peak, out = math.inf, 0, None
    for _ in range(max(1, repeats)):
        out = None  # free the previous result before measuring again
        with PeakMemory() as mem:
            t0 = time.perf_counter()
            out = fn()
            best = min(best, time.perf_counter() - t0)
        peak = max(peak, mem.peak)
    return out, best, peak


def run(dataset: str, data_dir: str | None = None, out_dir: str | os.PathLike = "bench", repeats: int = 3) -> dict:
    """Measure one dataset (see the module docstring); returns the figures (times: the best of ``repeats`` runs;
    peak memory: the largest)."""

    warnings.filterwarnings("ignore")
    tmp = Path(tempfile.mkdtemp(prefix=f"bench-data-{dataset}-"))
    try:
        result: dict = {"dataset": dataset}
        if data_dir is None:
            t0 = time.perf_counter()
            data_dir = str(write_demo_data(dataset, tmp / "data"))
            result["demo_write_s"] = time.perf_counter() - t0
            result["data"] = "demo sample (default size)"
        else:
            result["data"] = str(data_dir)
        parser = load_config(dataset, overrides={"data_dir": data_dir})
        ds = parser.get_parsed_content("dataset")
        source = ds["source"]
        cases = source.cases()
        files = _files(cases)
        disk = sum(os.path.getsize(p) for p in files if os.path.isfile(p))
        raw = _uncompressed_bytes(files)
        result.update(n_cases=len(cases), input_bytes=disk, input_uncompressed_bytes=raw)
        preprocess = parser.get_parsed_content("preprocess")
        axis = int(ds["slice_axis"])

        problems, result["validate_s"], _ = _best(lambda: source.validate(cases), repeats)
        if problems:
            raise ValueError(f"{len(problems)} validation problem(s): {problems[:3]}")

        memory_cache, result["memory_cache_s"], result["memory_cache_peak_bytes"] = _best(
            lambda: volume_dataset(cases, preprocess, 0, "memory", slice_axis=axis), repeats)
        result["memory_cache_bytes"] = _tensor_bytes(memory_cache)
        (n, _), result["memory_slices_s"], _ = _best(lambda: _read_slices(memory_cache, axis), repeats)
        result["memory_slices"] = n
        memory_cache = None  # free the cache before the next phase

        dirs = iter(tmp / f"cache{i}" for i in range(repeats))
        _, result["disk_cache_cold_s"], result["disk_cache_peak_bytes"] = _best(
            lambda: volume_dataset(cases, preprocess, 0, "disk", next(dirs), axis), repeats)
        cache_dir = tmp / "cache0"
        result["disk_cache_bytes"] = sum(p.stat().st_size for p in cache_dir.glob("*.pt"))
        disk_cache, result["disk_cache_warm_s"], _ = _best(
            lambda: volume_dataset(cases, preprocess, 0, "disk", cache_dir, axis), repeats)
        (n, _), result["disk_slices_s"], result["disk_slices_peak_bytes"] = _best(
            lambda: _read_slices(disk_cache, axis), repeats)
        result["disk_slices"] = n
        disk_cache = None
        result["repeats"] = repeats
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    gb = result["input_bytes"] / 1e9
    gb_raw = result["input_uncompressed_bytes"] / 1e9
    for key in ("validate_s", "memory_cache_s", "disk_cache_cold_s", "memory_cache_peak_bytes"):
        result[f"{key}_per_input_gb"] = result[key] / gb
        result[f"{key}_per_uncompressed_gb"] = result[key] / gb_raw
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"data-{dataset}.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def report(r: dict) -> str:
    """The printed table of :func:`run`'s figures."""
    mb = 1e6
    gb, gb_raw = r["input_bytes"] / 1e9, r["input_uncompressed_bytes"] / 1e9

    def per(value: float, unit: str) -> str:
        return f"{value / gb:9.1f} {unit}/GB ({value / gb_raw:.1f} per uncompressed GB)"

    lines = [
        f"dataset {r['dataset']}: {r['n_cases']} cases, {r['data']}",
        f"input: {r['input_bytes'] / mb:.1f} MB on disk, {r['input_uncompressed_bytes'] / mb:.1f} MB uncompressed",
        f"{'validate':<22}{r['validate_s']:8.2f} s   {per(r['validate_s'], 's')}",
        f"{'cache in memory':<22}{r['memory_cache_s']:8.2f} s   {per(r['memory_cache_s'], 's')}",
        f"{'  peak memory':<22}{r['memory_cache_peak_bytes'] / mb:8.0f} MB  "
        f"{per(r['memory_cache_peak_bytes'] / 1e9, 'GB')}; cache holds {r['memory_cache_bytes'] / mb:.0f} MB",
        f"{'cache on disk (cold)':<22}{r['disk_cache_cold_s']:8.2f} s   {per(r['disk_cache_cold_s'], 's')}",
        f"{'  peak memory':<22}{r['disk_cache_peak_bytes'] / mb:8.0f} MB; files {r['disk_cache_bytes'] / mb:.0f} MB",
        f"{'cache on disk (warm)':<22}{r['disk_cache_warm_s']:8.2f} s",
        f"{'slices from memory':<22}{r['memory_slices_s']:8.2f} s   {r['memory_slices']} slices",
        f"{'slices from disk':<22}{r['disk_slices_s']:8.2f} s   {r['disk_slices']} slices, "
        f"peak memory {r['disk_slices_peak_bytes'] / mb:.0f} MB",
    ]
    if "demo_write_s" in r:
        lines.append(f"{'(demo sample written':<22}{r['demo_write_s']:8.2f} s)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.benchmarks.data", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", required=True, help="configs/dataset/<name>.yaml")
    ap.add_argument("--data-dir", default=None, help="the data to measure (default: a fresh demo sample)")
    ap.add_argument("--out", default="bench", help="folder of the JSON result (default: bench)")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each phase; the best time counts (default: 3)")
    args = ap.parse_args(argv)
    print(report(run(args.dataset, args.data_dir, args.out, args.repeats)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
