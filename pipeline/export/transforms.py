"""A run's transforms as plain config entries for a bundle: references resolved, keys restricted.

A run's ``preprocess`` transforms act on the dataset's keys (``image``, ``label`` and sometimes others, e.g. soft
labels ``probs``). A bundle needs them restricted: inference reads images only, evaluation and training read image
and label files. Steps that act only on keys a bundle does not read, or that take a parameter from such a key
(e.g. a crop placed with the ground truth, at inference), are left out and listed. ``@references`` are replaced
by their values, so that each bundle config stands alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

#: MONAI dictionary-transform settings given one per key (a list as long as ``keys``)
PER_KEY = ("mode", "padding_mode", "dtype", "align_corners")


def plain_value(parser, value: Any, where: str) -> Any:
    """``value`` (a config entry at id ``where``) with every ``@reference`` resolved to its parsed value.

    ``$expressions`` that use no reference (``$torch.float32``, ``$lambda im: …``) stay as they are: they mean the
    same in a bundle config. Nested components (``_target_`` dicts) are resolved entry by entry, and a reference to
    a component or a list (``net: "@backbone"``) is replaced by that entry's config, resolved in turn.

    Raises:
        ValueError: a reference that resolves to something other than a number, string, bool, list or ``None``.
    """
    if isinstance(value, Mapping):
        return {k: plain_value(parser, v, f"{where}::{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [plain_value(parser, v, f"{where}::{i}") for i, v in enumerate(value)]
    if isinstance(value, str) and value.startswith("@") and isinstance(parser.get(value[1:]), (Mapping, list)):
        return plain_value(parser, parser.get(value[1:]), value[1:])  # a component: its config, not its object
    if isinstance(value, str) and (value.startswith("@") or (value.startswith("$") and "@" in value)):
        parsed = parser.get_parsed_content(where)
        if isinstance(parsed, torch.dtype):
            return f"$torch.{str(parsed).split('.')[-1]}"
        if isinstance(parsed, tuple):
            parsed = list(parsed)
        if not isinstance(parsed, (int, float, str, bool, list, type(None))):
            raise ValueError(f"cannot export '{where}' ({value}): it resolves to a {type(parsed).__name__}, not a "
                             "plain value")
        return parsed
    return value


def _keys(step: Mapping) -> list[str]:
    keys = step.get("keys")
    return [keys] if isinstance(keys, str) else [str(k) for k in (keys or [])]


def dataset_keys(steps: Iterable[Mapping]) -> set[str]:
    """Every key that some step of ``steps`` acts on."""
    return {k for step in steps for k in _keys(step)}


def restricted_preprocessing(parser, keep: Sequence[str], key: str = "preprocess") -> tuple[list[dict], list[str]]:
    """The transforms at ``key`` of a run's config restricted to the dataset keys ``keep``.

    A step keeps the kept keys among its ``keys`` (and their entries of per-key settings such as ``mode``); a step
    with none of them, or with a parameter naming another dataset key (``source_key: label`` at inference), is
    dropped. ``allow_missing_keys`` is removed: a bundle's data always hold the kept keys.

    Returns:
        ``(steps, dropped)``: the plain transform configs and, for each dropped step, its name and the reason.
    """
    steps = list(parser.get(key) or [])
    others = dataset_keys(steps) - set(keep)
    kept, dropped = [], []
    for i, raw in enumerate(steps):
        step = dict(raw)
        name = str(step.get("_target_", "?"))
        keys = _keys(step)
        mine = [k for k in keys if k in keep]
        refs = [p for p, v in step.items() if p not in ("keys", "_target_") and isinstance(v, str) and v in others]
        if not mine:
            dropped.append(f"{name} ({', '.join(keys) or 'no keys'} only)")
            continue
        if refs:
            dropped.append(f"{name} (uses {', '.join(refs)})")
            continue
        step = plain_value(parser, step, f"{key}::{i}")
        for p in PER_KEY:
            if isinstance(step.get(p), list) and len(step[p]) == len(keys) and len(keys) > 1:
                picked = [step[p][keys.index(k)] for k in mine]
                step[p] = picked[0] if len(picked) == 1 else picked
        step["keys"] = mine
        step.pop("allow_missing_keys", None)
        kept.append(step)
    return kept, dropped


def image_preprocessing(parser) -> tuple[list[dict], list[str]]:
    """The run's preprocessing of the ``image`` key alone (inference); returns ``(steps, dropped step names)``."""
    return restricted_preprocessing(parser, ("image",))


def labelled_preprocessing(parser) -> tuple[list[dict], list[str]]:
    """The run's preprocessing of ``image`` and ``label`` (evaluation and training); ``(steps, dropped)``."""
    return restricted_preprocessing(parser, ("image", "label"))


def augmentation(parser) -> list[dict]:
    """The run's random 2D transforms of training slices (``augment``), restricted to ``image`` and ``label``."""
    steps, _ = restricted_preprocessing(parser, ("image", "label"), key="augment")
    return steps


def slice_sampling(slice_axis: int) -> list[dict]:
    """A random 2D slice of a ``C×X×Y×Z`` volume along ``slice_axis``: a whole-slice crop of thickness 1 (MONAI
    ``RandSpatialCropd``), then the slice axis squeezed out (``SqueezeDimd``)."""
    roi = [-1, -1, -1]
    roi[slice_axis] = 1
    return [
        {"_target_": "RandSpatialCropd", "keys": ["image", "label"], "roi_size": roi, "random_size": False},
        {"_target_": "SqueezeDimd", "keys": ["image", "label"], "dim": slice_axis + 1},
    ]


def input_value_range(steps: Sequence[Mapping]) -> list[float]:
    """The intensity range the network's input is scaled to by ``steps``, ``[]`` when the steps do not fix one.

    Read from the last intensity scaling step: ``ScaleIntensityRanged`` with ``clip`` gives ``[b_min, b_max]``,
    ``ScaleIntensityd`` gives ``[minv, maxv]`` (MONAI's defaults 0 and 1).
    """
    for step in reversed(list(steps)):
        name = str(step.get("_target_", "")).split(".")[-1]
        if name == "ScaleIntensityRanged":
            if step.get("clip") and step.get("b_min") is not None and step.get("b_max") is not None:
                return sorted([float(step["b_min"]), float(step["b_max"])])
            return []
        if name == "ScaleIntensityd":
            low, high = step.get("minv", 0.0), step.get("maxv", 1.0)
            return [] if low is None or high is None else [float(low), float(high)]
        if name in ("NormalizeIntensityd", "ScaleIntensityRangePercentilesd", "HistogramNormalized"):
            return []
    return []


def _target_name(step: Mapping) -> str:
    return str(step.get("_target_", "")).split(".")[-1]


#: intensity steps that rescale each image by its own statistics: an input's overall scale does not matter
PER_IMAGE_NORMALISATION = ("ScaleIntensityd", "NormalizeIntensityd", "ScaleIntensityRangePercentilesd",
                           "HistogramNormalized")


def normalises_per_image(steps: Sequence[Mapping]) -> bool:
    """Whether ``steps`` rescale each image's intensities by its own statistics (min-max, z-score, percentiles),
    so that an image scaled otherwise (×1000) gives the same network input; a fixed window
    (``ScaleIntensityRanged``) or no scaling does not."""
    return any(_target_name(s) in PER_IMAGE_NORMALISATION for s in steps)


def guarded_preprocessing(steps: Sequence[Mapping], channels: int, training_range: Sequence[float] | None = None,
                          spacing: Sequence[float] | None = None) -> list[dict]:
    """A bundle's preprocessing ``steps`` with its input checks and the resampling to the training spacing.

    * ``LoadImaged`` becomes ``scripts.inputs.ReadImaged`` (a file that cannot be read is named in the error);
    * ``scripts.inputs.CheckImaged`` follows the first ``EnsureChannelFirstd`` (else the load): ``channels``
      channels, a 3D volume, finite values, intensities within ``training_range`` (with its margin) when given
      and the steps do not normalise each image by itself (:func:`normalises_per_image`);
    * with ``spacing`` (the one voxel spacing of the training images, RAS order) and no ``Spacingd`` of the run's
      own, ``Spacingd`` to it follows the first ``Orientationd`` (else the check): bilinear for the image, nearest
      for a label. Inference inverts it (``Invertd``), so outputs come back in the input's geometry.
    """
    if normalises_per_image(steps):
        training_range = None
    out, checked, resampled = [], False, spacing is None or any(_target_name(s) == "Spacingd" for s in steps)
    after_check = not any(_target_name(s) == "Orientationd" for s in steps)
    has_channel_first = any(_target_name(s) == "EnsureChannelFirstd" for s in steps)
    for raw in steps:
        step, name = dict(raw), _target_name(raw)
        if name == "LoadImaged":
            step["_target_"] = "scripts.inputs.ReadImaged"
        out.append(step)
        keys = _keys(step)
        if not checked and "image" in keys and (name == "EnsureChannelFirstd" or (
                name == "LoadImaged" and not has_channel_first)):
            out.append({"_target_": "scripts.inputs.CheckImaged", "keys": ["image"], "channels": int(channels),
                        "spatial_dims": 3, "training_range": None if training_range is None else
                        [float(v) for v in training_range]})
            checked = True
        if checked and not resampled and (name == "Orientationd" or after_check):
            kept = [k for k in ("image", "label") if k in keys]
            modes = ["bilinear" if k == "image" else "nearest" for k in kept]
            out.append({"_target_": "Spacingd", "keys": kept, "pixdim": [float(v) for v in spacing],
                        "mode": modes[0] if len(modes) == 1 else modes})
            resampled = True
    return out
