"""Robustness to noise (paper §5.2.4, Fig. 5): Gaussian noise of each σ added to the preprocessed test images,
seeded per (seed, σ, volume id); DSC and foreground ECE/CECE per σ, scored by the same evaluator as the test."""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import torch
from monai.engines.utils import PrepareBatch

from pipeline.engines import create_evaluator


def noise_seed(seed: int, sigma: float, key: str) -> int:
    """The seed of the noise added to one volume: a stable hash of (seed, sigma, volume id)."""
    return zlib.crc32(f"{int(seed)}/{float(sigma):.6g}/{key}".encode())


class GaussianNoiseBatch(PrepareBatch):
    """MONAI ``prepare_batch``: ``image + N(0, sigma²)`` noise, seeded per volume, and the label.

    The noise of a volume depends only on ``(seed, sigma, its id)`` (the batch's ``id`` entries; the running batch
    position when there are none), so a sweep gives the same images in any order and on any device.

    Args:
        sigma: the standard deviation (in the units of the preprocessed image, e.g. [0, 1]); 0 adds nothing.
        seed: the base seed (default 0).
    """

    def __init__(self, sigma: float, seed: int = 0) -> None:
        if not sigma >= 0:
            raise ValueError(f"sigma must be >= 0, got {sigma}")
        self.sigma, self.seed, self.position = float(sigma), int(seed), 0

    def noisy(self, image: torch.Tensor, ids: Sequence | None) -> torch.Tensor:
        """``image`` (``B×C×spatial``) plus this sigma's noise for each item."""
        x = image.as_tensor() if hasattr(image, "as_tensor") else image
        if self.sigma == 0:
            self.position += len(x)
            return x
        out = []
        for i in range(len(x)):
            key = str(ids[i]) if ids is not None else f"#{self.position}"
            g = torch.Generator().manual_seed(noise_seed(self.seed, self.sigma, key))
            noise = torch.randn(x[i].shape, generator=g, dtype=torch.float32) * self.sigma
            out.append(x[i] + noise.to(x.device, x.dtype))
            self.position += 1
        return torch.stack(out)

    def __call__(self, batchdata: dict, device=None, non_blocking: bool = False, **kwargs):
        ids = batchdata.get("id")
        if isinstance(ids, str):
            ids = [ids]
        image = self.noisy(batchdata["image"], ids).to(device=device, non_blocking=non_blocking)
        label = batchdata["label"].to(device=device, non_blocking=non_blocking)
        return image, label


def noise_sweep(
    network: torch.nn.Module,
    loader,
    device: torch.device,
    num_classes: int,
    slice_axis: int = 2,
    sigmas: Sequence[float] = (0.0, 0.01, 0.02, 0.03, 0.04, 0.05),
    seed: int = 0,
    n_bins: int = 15,
    amp: bool = False,
    regions: Sequence[Sequence[int]] | None = None,
) -> list[dict]:
    """DSC and foreground ECE of ``network`` on the volumes of ``loader`` with Gaussian noise of each ``sigma``
    added to the images (paper §5.2.4, Fig. 5). Metrics as in the main evaluation: mean over volumes (and
    foreground classes for DSC, or the evaluation ``regions`` when given, e.g. BraTS ET/TC/WT).

    Returns:
        one row per sigma: ``{"sigma", "dsc", "ece", "cece"}``.
    """
    rows = []
    for sigma in sigmas:
        evaluator = create_evaluator(network, loader, device, num_classes, slice_axis, prefix="",
                                     prepare_batch=GaussianNoiseBatch(sigma, seed), amp=amp, n_bins=n_bins,
                                     regions=regions)
        evaluator.run()
        m = evaluator.state.metrics
        rows.append({"sigma": float(sigma), "dsc": float(m["dsc"]), "ece": float(m["ece"]), "cece": float(m["cece"])})
    return rows
