"""How many pixels CRaC's two boundary tests disagree on, on a dataset's real label maps.

``python -m pipeline.benchmarks.boundaries [--dataset mni] [--data-dir DIR]``: every case's label volume, after the
dataset's preprocessing, is cut into the 2D slices the training sees (along the dataset's ``slice_axis``); on each
slice the exact test (window max ≠ window min) and the released code's ``Σ_j (mean(u) − u_j) ≠ 0`` in float32
(:func:`pipeline.losses.neighbours.boundary_mask`) classify every pixel as boundary or interior. Printed: the
pixels, the boundary pixels of each test, and the pixels they disagree on (both directions), also for 3D windows.
"""

from __future__ import annotations

import argparse
import sys

import torch
from monai.transforms import Compose

from pipeline.config import load_config
from pipeline.losses.neighbours import boundary_mask
from pipeline.tensors import plain


def count(parser) -> dict[str, int]:
    """The counts of the module docstring for the cases of ``parser``'s dataset (2D: ``*_2d``; 3D: ``*_3d``)."""
    dataset = parser.get_parsed_content("dataset")
    source = dataset["source"]
    if hasattr(source, "prepare"):
        source.prepare()
    axis = int(dataset.get("slice_axis", 2))
    preprocess = Compose(parser.get_parsed_content("preprocess"))
    totals = {f"{k}_{d}": 0 for d in ("2d", "3d") for k in ("pixels", "exact", "released", "exact_only",
                                                             "released_only")}
    for case in source.cases():
        item = preprocess({"image": case["image"], "label": case["label"]})
        labels = plain(item["label"])[0].round().long()  # X×Y×Z
        for dims, batch in (("2d", labels.movedim(axis, 0)), ("3d", labels[None])):
            exact, released = boundary_mask(batch), boundary_mask(batch, test="released")
            totals[f"pixels_{dims}"] += exact.numel()
            totals[f"exact_{dims}"] += int(exact.sum())
            totals[f"released_{dims}"] += int(released.sum())
            totals[f"exact_only_{dims}"] += int((exact & ~released).sum())
            totals[f"released_only_{dims}"] += int((released & ~exact).sum())
    return totals


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.benchmarks.boundaries", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="mni", help="a configs/dataset name (default mni)")
    ap.add_argument("--data-dir", help="the dataset's folder (default the config's data_dir)")
    args = ap.parse_args(argv)
    parser = load_config(args.dataset, "ce", "unet", {"data_dir": args.data_dir} if args.data_dir else None)
    t = count(parser)
    print(f"dataset {args.dataset}, torch {torch.__version__}, float32 on the CPU")
    print("| windows | pixels | boundary (exact) | boundary (released) | exact only | released only |")
    print("|---|---|---|---|---|---|")
    for d, label in (("2d", "3×3 on training slices"), ("3d", "3×3×3 on volumes")):
        share = t[f"exact_only_{d}"] / max(t[f"exact_{d}"], 1)
        print(f"| {label} | {t[f'pixels_{d}']} | {t[f'exact_{d}']} | {t[f'released_{d}']} | "
              f"{t[f'exact_only_{d}']} ({100 * share:.1f} % of the boundary) | {t[f'released_only_{d}']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
