"""Confidence maps of the test volumes: max-probability and entropy volumes as NIfTI, and slices for the figure."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from ignite.engine import Events

from pipeline.io import write_nifti
from pipeline.tensors import plain


class ConfidenceMapWriter:
    """Ignite handler: for the first ``n_volumes`` test volumes, the max-probability and entropy volumes as NIfTI
    (with the image's affine), and for the first ``n_slices`` volumes the slice with the most ground-truth
    foreground, kept for the confidence-map figure.

    Args:
        folder: where the NIfTI files go (``<id>_maxprob.nii.gz``, ``<id>_entropy.nii.gz``).
        slice_axis: the axis the 2D slices are taken along.
    """

    def __init__(self, folder: Path, slice_axis: int = 2, n_volumes: int = 3, n_slices: int = 3) -> None:
        self.folder, self.axis = Path(folder), slice_axis
        self.n_volumes, self.n_slices = n_volumes, n_slices
        self.rows: list[dict] = []
        self.files: list[Path] = []
        self.count = 0
        self.notes: list[str] = []

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine) -> None:
        batch = engine.state.batch if isinstance(engine.state.batch, list) else [engine.state.batch]
        for item, out in zip(batch, engine.state.output):
            if self.count >= max(self.n_volumes, self.n_slices):
                return
            vid = f"volume{self.count:03d}"
            vid = str(item.get("id", vid)) if isinstance(item, dict) else vid
            prob = out["prob"]
            maxprob = prob.max(0).values.cpu()
            if self.count < self.n_volumes:
                image = out.get("image")
                affine = getattr(image, "affine", None)
                if affine is None:
                    affine = np.eye(4)
                    self.notes.append(f"{vid}: the image carries no affine; maps written with the identity")
                entropy = -(prob * prob.clamp_min(1e-12).log()).sum(0).cpu()
                for name, vol in (("maxprob", maxprob), ("entropy", entropy)):
                    self.files.append(write_nifti(vol.numpy(), plain(affine).cpu().numpy(),
                                                  self.folder / f"{vid}_{name}.nii.gz"))
            if self.count < self.n_slices:
                label = out["label_index"][0].cpu()
                fg = (label != 0).sum(dim=[d for d in range(3) if d != self.axis])
                s = int(fg.argmax())
                image = plain(out["image"])[0].cpu() if "image" in out else torch.zeros_like(label, dtype=torch.float)
                self.rows.append({
                    "id": vid, "slice": s,
                    "image": image.select(self.axis, s).numpy(),
                    "label": label.select(self.axis, s).numpy(),
                    "pred": out["pred"].max(0).indices.cpu().select(self.axis, s).numpy(),
                    "maxprob": maxprob.select(self.axis, s).numpy(),
                })
            self.count += 1
