"""Checks of the images a bundle reads: every refusal names the file and says what was expected.

A bundle's configs read images with :class:`ReadImaged` (MONAI's ``LoadImaged``; a file that cannot be read, e.g.
a truncated one, is named in the error) and check them with :class:`CheckImaged` right after
``EnsureChannelFirstd``: the number of channels, the number of spatial dimensions, finite values, and (when the
export recorded it) an intensity range that the network's training images share. :func:`find_images` lists the
images to segment and refuses an empty or missing folder. All refusals are :class:`BundleInputError` (a
``ValueError``).

>>> find_images("/nonexistent")
Traceback (most recent call last):
...
inputs.BundleInputError: /nonexistent: no such folder (expected NIfTI images *.nii or *.nii.gz to segment)
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.transforms import LoadImaged, MapTransform

PATTERNS = ("*.nii", "*.nii.gz")
#: the percentiles an image's intensity range is read at (robust to a few outlying voxels)
PERCENTILES = (0.5, 99.5)


class BundleInputError(ValueError):
    """An input the bundle refuses: an image it cannot segment as it was trained to, or a model file it cannot check
    (the message names the file)."""


def find_images(folder: str, patterns: Sequence[str] = PATTERNS) -> list[str]:
    """The image files in ``folder`` matching ``patterns``, sorted.

    Raises:
        BundleInputError: the folder does not exist or holds no such file.
    """
    if not os.path.isdir(folder):
        raise BundleInputError(f"{folder}: no such folder (expected NIfTI images {' or '.join(patterns)} to segment)")
    files = sorted({f for p in patterns for f in glob.glob(os.path.join(folder, p))})
    if not files:
        raise BundleInputError(f"{folder}: no image to segment (expected files {' or '.join(patterns)})")
    return files


def listed_sha256(bundle_root: str, path: str) -> str:
    """The sha256 that the bundle's ``large_files.yml`` (JSON-formatted YAML) lists for ``path``.

    Raises:
        BundleInputError: no such entry (the message says how to use a model file of one's own).
    """
    listed = os.path.join(bundle_root, "large_files.yml")
    with open(listed) as f:
        entries = json.load(f)["large_files"]
    for entry in entries:
        if entry.get("path") == path and entry.get("hash_type", "sha256").lower() == "sha256":
            return str(entry["hash_val"])
    raise BundleInputError(f"{os.path.join(bundle_root, path)}: no sha256 for it in {listed}, so it cannot be checked "
                          "before loading; for a model file you made yourself (e.g. ckpt_export of retrained "
                          "weights) pass its sha256 with --model_sha256 $(sha256sum <file> | cut -c1-64)")


def _root_cause(e: BaseException) -> BaseException:
    while e.__cause__ is not None or e.__context__ is not None:
        e = e.__cause__ or e.__context__
    return e


class ReadImaged(LoadImaged):
    """MONAI's ``LoadImaged``; a file it cannot read is named, with the cause, in an :class:`BundleInputError`."""

    def __call__(self, data, reader=None):
        try:
            return super().__call__(data, reader)
        except Exception as e:  # noqa: BLE001 - any reader failure: the same refusal, naming the file
            files = ", ".join(str(data[k]) for k in self.keys if isinstance(data, Mapping) and k in data)
            cause = _root_cause(e)
            raise BundleInputError(f"{files}: cannot be read as an image ({type(cause).__name__}: {cause}); is the "
                                  "file complete (not truncated) and a NIfTI image?") from e


def _name(image) -> str:
    meta = getattr(image, "meta", None) or {}
    return str(meta.get("filename_or_obj", "<image>"))


class CheckImaged(MapTransform):
    """Refuse images the network cannot segment correctly; the image is returned unchanged.

    Args:
        keys: the image keys (channel-first ``C×spatial`` tensors, after ``EnsureChannelFirstd``).
        channels: the channels the network reads.
        spatial_dims: the spatial dimensions expected (3: a volume).
        training_range: ``[low, high]``: the range of the 0.5th and 99.5th intensity percentiles of the network's
            training images (``None``: intensities are not checked). An image's own percentiles must lie in it,
            widened by ``margin`` times its width on each side, so that an image scaled otherwise (e.g. ×1000) is
            refused rather than saturated by the preprocessing's clipping.
        margin: that widening, as a fraction of the range's width.
    """

    def __init__(self, keys, channels: int, spatial_dims: int = 3, training_range: Sequence[float] | None = None,
                 margin: float = 0.5, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.channels, self.spatial_dims = int(channels), int(spatial_dims)
        self.training_range = None if training_range is None else [float(v) for v in training_range]
        self.margin = float(margin)

    @property
    def accepted_range(self) -> list[float] | None:
        """``[low, high]`` the image's percentiles must lie in (``None``: not checked)."""
        if self.training_range is None:
            return None
        lo, hi = self.training_range
        return [lo - self.margin * (hi - lo), hi + self.margin * (hi - lo)]

    def check(self, image) -> None:
        name, shape = _name(image), tuple(image.shape)
        if len(shape) - 1 != self.spatial_dims:
            raise BundleInputError(f"{name}: a {len(shape) - 1}D image (channel-first shape {shape}), expected a "
                                  f"{self.spatial_dims}D volume with {self.channels} channel(s)")
        if shape[0] != self.channels:
            raise BundleInputError(f"{name}: {shape[0]} channel(s) (channel-first shape {shape}), expected "
                                  f"{self.channels} (several channels are a 4D NIfTI, channels last)")
        values = torch.as_tensor(image)
        finite = torch.isfinite(values)
        if not bool(finite.all()):
            bad = (~finite).nonzero()[0].tolist()
            raise BundleInputError(f"{name}: {int((~finite).sum())} voxel(s) are NaN or infinite (the first at "
                                  f"channel-first index {tuple(bad)}), expected finite intensities; replace them "
                                  "before inference")
        if self.accepted_range is not None:
            low, high = np.percentile(values.detach().cpu().double().numpy(), PERCENTILES)
            lo, hi = self.accepted_range
            if low < lo or high > hi:
                raise BundleInputError(
                    f"{name}: intensities from {low:.4g} to {high:.4g} (percentiles {PERCENTILES[0]}-"
                    f"{PERCENTILES[1]}), expected within [{lo:.4g}, {hi:.4g}] (the network's training images range "
                    f"over [{self.training_range[0]:.4g}, {self.training_range[1]:.4g}]); rescale the image to "
                    "that range")

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            self.check(d[key])
        return d
