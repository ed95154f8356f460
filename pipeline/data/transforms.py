"""Preprocessing transforms the MONAI library lacks (MONAI dictionary-transform style), named in dataset configs."""

from __future__ import annotations

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, SpatialCrop


class CropSlabToForegroundd(MapTransform):
    """Crop ``size`` slices along ``axis``, centred on the extent of the non-zero voxels of ``source_key``.

    Used for the FLARE crop (paper: 30 slices around the abdominal organs): the other axes are left to the next
    transform. When the foreground is longer than ``size`` the window is centred on it; when the volume is shorter
    than ``size`` it is kept whole (pad afterwards). A volume without foreground is cropped around its centre. The
    affine follows the crop (MONAI ``SpatialCrop``).

    Args:
        keys: the keys to crop (image and label).
        source_key: the key whose non-zero voxels locate the slab (e.g. ``label``).
        axis: the spatial axis (0, 1 or 2).
        size: slices in the slab.
    """

    def __init__(self, keys: KeysCollection, source_key: str = "label", axis: int = 2, size: int = 30,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if axis not in (0, 1, 2) or int(size) < 1:
            raise ValueError(f"axis must be 0, 1 or 2 and size >= 1, got axis={axis}, size={size}")
        self.source_key, self.axis, self.size = source_key, axis, int(size)

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        src = d[self.source_key]
        n = src.shape[self.axis + 1]
        other = [i for i in range(src.ndim) if i != self.axis + 1]
        present = torch.nonzero(torch.as_tensor(src).amax(dim=other) > 0).flatten()
        centre = (int(present[0]) + int(present[-1]) + 1) / 2 if len(present) else n / 2
        start = int(min(max(round(centre - self.size / 2), 0), max(n - self.size, 0)))
        end = min(start + self.size, n)
        starts, ends = [0, 0, 0], list(src.shape[1:])
        starts[self.axis], ends[self.axis] = start, end
        crop = SpatialCrop(roi_start=starts, roi_end=ends)
        for key in self.key_iterator(d):
            d[key] = crop(d[key])
        return d


class MergeMasksd(MapTransform):
    """The union of several binary masks stacked as channels (``N×spatial`` → ``1×spatial``, values 0/1).

    BUSI stores some lesions as several mask files (``… _mask.png``, ``… _mask_1.png``); the label is their union.
    A voxel is foreground when any mask exceeds ``threshold`` (BUSI masks are 0/255).

    Args:
        keys: the mask key(s).
        threshold: values above it are foreground (default 127).
    """

    def __init__(self, keys: KeysCollection, threshold: float = 127.0, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.threshold = float(threshold)

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            x = d[key]
            union = (x > self.threshold).amax(dim=0, keepdim=True).to(torch.float32)
            d[key] = union
        return d


class AddSliceAxisd(MapTransform):
    """Make a 2D image ``C×X×Y`` a one-slice volume ``C×X×Y×1`` with a 3D affine (slice thickness ``thickness``).

    A 2D dataset (BUSI) then goes through the same 2D-slice training and per-volume evaluation as the 3D ones;
    surface distances on one-slice volumes are measured in 2D (:mod:`pipeline.metrics.segmentation`).

    Args:
        keys: the keys to extend.
        thickness: the spacing given to the new axis (default 1).
    """

    def __init__(self, keys: KeysCollection, thickness: float = 1.0, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.thickness = float(thickness)

    def __call__(self, data: dict) -> dict:
        from monai.data import MetaTensor

        d = dict(data)
        for key in self.key_iterator(d):
            x = d[key]
            if x.ndim != 3:
                raise ValueError(f"'{key}' must be a 2D image C×X×Y, got shape {tuple(x.shape)}")
            out = x.unsqueeze(-1)
            if isinstance(x, MetaTensor):
                a2 = torch.as_tensor(x.affine, dtype=torch.float64)
                a3 = torch.eye(4, dtype=torch.float64)
                a3[:2, :2], a3[:2, 3] = a2[:2, :2], a2[:2, 2]
                a3[2, 2] = self.thickness
                meta = {k: v for k, v in x.meta.items() if k not in ("affine", "original_affine")}
                meta["spatial_shape"] = [*list(x.shape[1:]), 1]
                out = MetaTensor(out.as_tensor(), affine=a3, meta=meta)
            d[key] = out
        return d


__all__ = ["CropSlabToForegroundd", "MergeMasksd", "AddSliceAxisd"]
