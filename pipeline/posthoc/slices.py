"""Validation slices for fitting post-hoc calibrators: the frozen network's logits with their images and labels."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.tensors import check_slice_axis, plain


@dataclass
class SliceSet:
    """2D validation slices grouped by volume (slices of one volume share their size).

    Attributes:
        logits: per volume ``S×K×H×W`` float32 (the frozen network's outputs).
        images: per volume ``S×C×H×W`` float32 (the network's inputs).
        labels: per volume ``S×H×W`` int64.
    """

    logits: list[torch.Tensor] = field(default_factory=list)
    images: list[torch.Tensor] = field(default_factory=list)
    labels: list[torch.Tensor] = field(default_factory=list)

    @property
    def n_slices(self) -> int:
        return sum(len(z) for z in self.logits)

    @property
    def n_voxels(self) -> int:
        return sum(y.numel() for y in self.labels)

    def to(self, device) -> SliceSet:
        return SliceSet(*([t.to(device) for t in ts] for ts in (self.logits, self.images, self.labels)))


@torch.no_grad()
def collect_slices(
    network: nn.Module,
    volumes: Iterable[dict],
    slice_axis: int = 2,
    device: torch.device | str = "cpu",
    max_slices: int | None = None,
    seed: int = 0,
    sw_batch_size: int = 32,
) -> SliceSet:
    """Run the frozen ``network`` over every 2D slice of the given volumes and keep logits, images and labels.

    Args:
        network: a 2D network ``B×C×H×W → B×K×H×W`` (put in eval mode here).
        volumes: dicts with ``image`` ``C×X×Y×Z`` and ``label`` ``1×X×Y×Z`` (e.g. a cached volume dataset, or a
            loader of batch size 1, whose items then carry a leading batch axis of 1).
        slice_axis: the spatial axis (0, 1 or 2) to slice along.
        max_slices: keep at most this many slices in all, a seeded uniform draw (default: all).
        seed: seed of that draw.

    Raises:
        ValueError: no volume, a volume that is not ``C×X×Y×Z``, or labels of another size than the image.
    """
    check_slice_axis(slice_axis)
    device = torch.device(device)
    network.eval()
    blocks = []
    for i, item in enumerate(volumes):
        image, label = plain(item["image"]), plain(item["label"])
        if image.ndim == 5:
            image, label = image[0], label[0]
        if image.ndim != 4:
            raise ValueError(f"volume {i}: expected an image C×X×Y×Z, got shape {tuple(image.shape)}")
        if label.shape[-3:] != image.shape[-3:]:
            raise ValueError(f"volume {i}: label shape {tuple(label.shape)} does not match image {tuple(image.shape)}")
        x = image.movedim(slice_axis + 1, 0).float()  # S×C×H×W
        y = label.reshape(-1, *label.shape[-3:])[0].movedim(slice_axis, 0).round().long()  # S×H×W
        blocks.append((x, y))
    if not blocks:
        raise ValueError("no validation volume to collect slices from")
    index = [(b, s) for b, (x, _) in enumerate(blocks) for s in range(len(x))]
    if max_slices is not None and len(index) > max_slices:
        g = torch.Generator().manual_seed(seed)
        keep = sorted(torch.randperm(len(index), generator=g)[:max_slices].tolist())
        index = [index[k] for k in keep]
    out = SliceSet()
    for b, (x, y) in enumerate(blocks):
        chosen = [s for bb, s in index if bb == b]
        if not chosen:
            continue
        xs, ys = x[chosen], y[chosen]
        zs = torch.cat([network(xs[k : k + sw_batch_size].to(device)).float().cpu()
                        for k in range(0, len(xs), sw_batch_size)])
        out.logits.append(zs)
        out.images.append(xs.cpu())
        out.labels.append(ys.cpu())
    return out


def summed_nll(logits: torch.Tensor, labels: torch.Tensor, foreground_only: bool) -> tuple[torch.Tensor, int]:
    """Summed NLL and the number of voxels counted (``B×K×H×W`` logits, ``B×H×W`` labels)."""
    loss = F.cross_entropy(logits, labels, reduction="none")
    if foreground_only:
        keep = labels != 0
        return loss[keep].sum(), int(keep.sum())
    return loss.sum(), loss.numel()
