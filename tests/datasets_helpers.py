"""Tiny demo samples of the seven benchmarks, in their official layouts, for the dataset tests."""

from __future__ import annotations

from pathlib import Path

from pipeline.data.demo import write_demo_data

# per dataset: demo size (cases, grid) and the config overrides that fit the preparation to it
TINY = {
    "acdc": {"n": 3, "shape": (24, 24, 4), "over": {"dataset::spatial_size": [16, 16, -1]}},
    "brats": {"n": 3, "shape": (24, 24, 12), "over": {"dataset::spatial_size": [24, 24, -1]}},
    "mrbrains": {"n": 3, "shape": (24, 24, 6), "over": {"dataset::spatial_size": [24, 24, -1]}},
    "flare": {"n": 3, "shape": (24, 24, 8), "over": {"dataset::pixdim": [16.0, 16.0, 30.0], "dataset::slab": 6,
                                                     "dataset::spatial_size": [24, 24, 6]}},
    "promise": {"n": 3, "shape": (24, 24, 6),
                "over": {"dataset::pixdim": [-1, -1, -1], "dataset::spatial_size": [24, 24, -1]}},
    "hippocampus": {"n": 3, "shape": (12, 16, 10), "over": {"dataset::spatial_size": [16, 16, 10]}},
    "busi": {"n": 3, "shape": (40, 32), "over": {"dataset::spatial_size": [16, 16]}},
}


def write_tiny(name: str, root: Path, **options) -> Path:
    """The tiny demo sample of ``name`` written into ``root`` (a new folder)."""
    t = TINY[name]
    return write_demo_data(name, root, n_cases=t["n"], shape=t["shape"], seed=1, **options)
