"""``configs/metadata.json`` of a bundle: what the shipped model is, how good it is, what it needs.

* ``eval_metrics``: the run's test metrics of the network *with the calibration the bundle carries*, read from its
  MLflow run (``test/<metric>`` without calibration, ``test/<ts|lts>/<metric>`` with one; the latest evaluation),
  or from the run's ``metrics.json`` when no MLflow run records it.
* ``required_packages_version``: every package that the configs and scripts import or that the components they
  name need (NIfTI reading, Ignite engines, MONAI's command line), with the installed versions.
* ``version`` and ``changelog``: 0.1.0 at the first export; a re-export over an existing bundle of the same name
  bumps the patch number and keeps the earlier entries.
* ``network_data_format``: the 2D network's input (one slice of the preprocessed image) and the outputs the
  inference config writes, with the value ranges of what is written.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Iterable, Mapping
from importlib.metadata import PackageNotFoundError, packages_distributions, version
from pathlib import Path
from typing import Any

import mlflow

from pipeline.tracking import tracking_uri

#: the schema MONAI's model zoo checks metadata against; bundles are verified offline against
#: ``bundles/metadata_schema.json``, the part of it that these bundles fill
SCHEMA_URL = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
EVAL_KEYS = ("dsc", "asd", "ece", "cece", "nll", "brier")
CALIBRATION_TEXT = {"none": "no post-hoc calibration", "ts": "temperature scaling (TS)",
                    "lts": "local temperature scaling (LTS)"}
#: packages every bundle needs without importing them by name: NIfTI IO (LoadImaged / SaveImaged), MONAI's engines
#: (Ignite) and MONAI's bundle command line (``python -m monai.bundle`` uses fire)
ALWAYS_NEEDED = ("nibabel", "pytorch-ignite", "fire")
#: components of the configs that need a package MONAI imports only when they are used
NEEDED_BY_COMPONENT = {"PILReader": "pillow", "ITKReader": "itk", "TransformerBlock": "einops"}
#: packages with their own metadata fields (``monai_version``, ``pytorch_version``, ``numpy_version``)
OWN_FIELDS = {"monai": "monai", "torch": "torch", "numpy": "numpy"}


def installed_version(dist: str) -> str:
    """The installed version of a distribution (``+cpu``-style local suffixes dropped), ``unknown`` if absent."""
    try:
        return version(dist).split("+")[0]
    except PackageNotFoundError:
        return "unknown"


def shipped_metrics(run_dir: str | Path, run_id: str | None, calibration: str, uri: str | None = None
                    ) -> tuple[dict[str, float], str]:
    """Test metrics of the run's network with ``calibration`` (``none``, ``ts``, ``lts``) and where they came from.

    Returns:
        ``({"dsc", "asd", "ece", "cece", "nll", "brier"} (those present), source)``.

    Raises:
        ValueError: neither the MLflow run nor ``metrics.json`` holds test metrics for that calibration.
    """
    prefix = "test/" if calibration == "none" else f"test/{calibration}/"
    if run_id is not None:
        logged = mlflow.MlflowClient(tracking_uri=uri or tracking_uri()).get_run(run_id).data.metrics
        found = {k: float(logged[prefix + k]) for k in EVAL_KEYS if prefix + k in logged}
        if "dsc" in found:
            return found, f"MLflow run {run_id} (metrics {prefix}*)"
    path = Path(run_dir) / "metrics.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    method = "pre" if calibration == "none" else calibration
    mean = (results.get("methods") or {}).get(method, {}).get("mean")
    if mean is None and calibration == "none":
        mean = results.get("mean")
    if not mean or mean.get("dsc") is None:
        raise ValueError(f"no test metrics for calibration '{calibration}' in {path} or in MLflow run {run_id}: "
                         "evaluate the run first (make evaluate RUN=…)")
    found = {k: float(mean[k]) for k in EVAL_KEYS if mean.get(k) is not None}
    return found, f"the run's metrics.json (methods.{method})"


def _config_modules(config: Any, out: set[str]) -> None:
    if isinstance(config, Mapping):
        for k, v in config.items():
            if k == "_target_" and isinstance(v, str) and "." in v:
                out.add(v.split(".")[0])
            _config_modules(v, out)
    elif isinstance(config, list):
        for v in config:
            _config_modules(v, out)
    elif isinstance(config, str) and config.startswith("$"):  # "$import a.b", "$from a.b import c"
        out.update(re.findall(r"(?:^|;)\s*(?:import|from)\s+([A-Za-z_]\w*)", config[1:]))


def required_packages(configs: Iterable[Any], script_modules: Iterable[str] = (), extra: Iterable[str] = ()
                      ) -> dict[str, str]:
    """``{distribution: version}`` of every package a bundle needs, except those of :data:`OWN_FIELDS`.

    Args:
        configs: the bundle's configs (their ``$import`` statements and ``_target_`` module paths are read).
        script_modules: top-level modules the bundle's scripts import.
        extra: further distribution names (e.g. from :data:`pipeline.export.scripts.EXTRA_REQUIREMENTS`).
    """
    modules: set[str] = set(script_modules)
    text = ""
    for config in configs:
        _config_modules(config, modules)
        text += json.dumps(config)
    modules -= set(sys.stdlib_module_names) | {"scripts", "__future__"}
    dists = packages_distributions()
    names = set(ALWAYS_NEEDED) | set(extra)
    names |= {dist for component, dist in NEEDED_BY_COMPONENT.items() if component in text}
    for module in modules:
        names.add((dists.get(module) or [module])[0])
    names -= set(OWN_FIELDS.values())
    return {name: installed_version(name) for name in sorted(names, key=str.lower)}


def next_version(previous: Mapping | None, note: str) -> tuple[str, dict[str, str]]:
    """``(version, changelog)``: ``0.1.0`` for a new bundle, else the previous version with the patch number + 1
    and ``note`` added on top of the previous changelog."""
    if not previous or not re.fullmatch(r"\d+\.\d+\.\d+", str(previous.get("version", ""))):
        return "0.1.0", {"0.1.0": note}
    major, minor, patch = (int(p) for p in str(previous["version"]).split("."))
    new = f"{major}.{minor}.{patch + 1}"
    return new, {new: note, **dict(previous.get("changelog") or {})}


def _tensor(fmt: str, channels: int, value_range: list, channel_def: Mapping, dtype: str = "float32", **more) -> dict:
    return {"type": "image", "format": fmt, **more, "num_channels": int(channels), "spatial_shape": ["*", "*"],
            "dtype": dtype, "value_range": list(value_range), "is_patch_data": False,
            "channel_def": {str(k): str(v) for k, v in channel_def.items()}}


def network_data_format(in_channels: int, class_names: list[str], input_range: list, modality: str,
                        spacing: list | None = None) -> dict:
    """Inputs and outputs of the shipped model as the bundle's tools see them.

    ``pred`` is what ``models/model.ts`` returns for a slice: calibrated **logits**, one channel per class,
    unbounded (the inference config applies the softmax); ``probabilities`` (``<image>_prob.nii.gz``),
    ``segmentation``, ``confidence`` and ``entropy`` are the files written per image, with the value ranges they
    can take (entropy in nats, at most ``log K``). ``spacing``: the voxel spacing the network was trained at, which
    the configs resample images to.
    """
    k = len(class_names)
    classes = dict(enumerate(class_names))
    image = _tensor("magnitude", in_channels, input_range, {i: f"image channel {i}" for i in range(in_channels)},
                    modality=modality)
    if spacing:
        image["pixdim"] = [float(v) for v in spacing]
    return {
        "inputs": {"image": image},
        "outputs": {
            "pred": _tensor("logits", k, [], classes),
            "probabilities": _tensor("probabilities", k, [0, 1], classes),
            "segmentation": _tensor("labels", 1, [0, k - 1], {0: "class index: " + ", ".join(
                f"{i} {c}" for i, c in classes.items())}, dtype="uint8"),
            "confidence": _tensor("probability", 1, [1.0 / k, 1], {0: "max-probability (confidence)"}),
            "entropy": _tensor("entropy", 1, [0, math.log(k)], {0: "entropy of the class probabilities (nats)"}),
        },
    }


def metadata(*, name: str, info: Mapping, metrics: Mapping[str, float], metrics_source: str, packages: Mapping,
             version_info: tuple[str, Mapping], input_range: list) -> dict:
    """The content of ``configs/metadata.json``.

    Args:
        name: the bundle's name.
        info: what the bundle holds: ``dataset``, ``task`` (what is segmented), ``data_source``, ``modality``,
            ``class_names``, ``in_channels``, ``slice_axis``, ``loss``, ``loss_params``, ``backbone``, ``calibration``,
            ``calibration_detail``, ``run_name``, ``run_id``, ``distance_unit``.
        metrics: the shipped model's test metrics (:func:`shipped_metrics`).
        metrics_source: where they come from.
        packages: :func:`required_packages`.
        version_info: :func:`next_version`.
        input_range: the network input's intensity range (``[]`` when the preprocessing does not fix one).
    """
    import monai
    import numpy
    import torch

    classes = list(info["class_names"])
    calibration = CALIBRATION_TEXT[info["calibration"]]
    params = ", ".join(f"{k}={v}" for k, v in info["loss_params"].items())
    loss = f"{info['loss']}" + (f" ({params})" if params else "")
    return {
        "schema": SCHEMA_URL,
        "version": version_info[0],
        "changelog": dict(version_info[1]),
        "monai_version": monai.__version__.split("+")[0],
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": numpy.__version__,
        "required_packages_version": dict(packages),
        "name": name,
        "task": f"{info['task']} segmentation ({', '.join(classes[1:])}), calibrated with {calibration}"
                if info["calibration"] != "none" else
                f"{info['task']} segmentation ({', '.join(classes[1:])}), without post-hoc calibration",
        "description": (f"2D {info['backbone']} trained with the {loss} loss on the '{info['dataset']}' dataset, "
                        f"applied slice by slice along axis {info['slice_axis']} of 3D volumes. The shipped model "
                        f"(models/model.ts) carries {calibration}{info['calibration_detail']}; models/model.pt holds "
                        "the uncalibrated network's weights (what configs/train.json retrains). eval_metrics: mean "
                        f"over the run's test volumes of that calibrated model, from {metrics_source}; ASD in "
                        f"{info['distance_unit']}, ECE/CECE over ground-truth foreground voxels (15 bins), as "
                        "configs/evaluate.json reports them (test_mean_dice, test_foreground_ece, test_cece)."),
        "authors": "MbLS pipeline",
        "copyright": "Copyright (c) the MbLS pipeline authors",
        "data_source": info["data_source"],
        "data_type": "nibabel",
        "image_classes": f"{info['in_channels']} channel(s), intensities as after the run's preprocessing",
        "label_classes": ", ".join(f"{i}: {c}" for i, c in enumerate(classes)),
        "pred_classes": ", ".join(f"{i}: {c}" for i, c in enumerate(classes)),
        "eval_metrics": {k: float(v) for k, v in metrics.items()},
        "intended_use": "Research only; not for clinical use.",
        "references": [
            "Murugesan B, Liu B, Galdran A, Ben Ayed I, Dolz J. Calibrating segmentation networks with margin-based "
            "label smoothing. Medical Image Analysis, 2024.",
            "Guo C, Pleiss G, Sun Y, Weinberger KQ. On calibration of modern neural networks. ICML 2017.",
            "Ding Z, Han X, Liu P, Niethammer M. Local temperature scaling for probability calibration. ICCV 2021.",
        ],
        "network_data_format": network_data_format(info["in_channels"], classes, input_range, info["modality"],
                                                   (info.get("profile") or {}).get("spacing")),
        "mbls_run": {"run_name": info["run_name"], "mlflow_run_id": info["run_id"] or "",
                     "calibration": info["calibration"], "calibration_choice": info.get("calibration_reason", ""),
                     "dataset": info["dataset"], "loss": info["loss"], "backbone": info["backbone"],
                     "training_images": dict(info.get("profile") or {})},
    }
