"""Export a trained run as a MONAI bundle: ``bundles/<name>/`` with ``configs/metadata.json``,
``configs/inference.yaml``, ``models/model.pt`` and ``docs/README.md`` (a model card with the run's test metrics).

The bundle's network is the run's backbone wrapped in :class:`pipeline.networks.PadToMultiple`, and, when chosen,
in the run's fitted post-hoc calibrator (:class:`pipeline.posthoc.TemperatureScaling` or
:class:`pipeline.posthoc.LocalTemperatureScaling`), so the probabilities it writes are the calibrated ones. Its
inference config reads NIfTI images from ``input_dir``, applies the run's *image* preprocessing, runs the 2D
network slice by slice, inverts the preprocessing and writes a segmentation (``*_seg.nii.gz``) and the class
probabilities (``*_prob.nii.gz``). It needs this project's ``pipeline`` package importable (the bundle's networks
and calibrators are defined there), e.g. run from the repository root:

    python -m monai.bundle run --bundle_root bundles/<name> --config_file bundles/<name>/configs/inference.yaml \
        --meta_file bundles/<name>/configs/metadata.json --input_dir /path/to/images --output_dir /path/to/out

Preprocessing steps that need the label (e.g. a crop placed with the ground truth) cannot run at inference time:
they are left out and listed in the bundle's README.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from pipeline.config import REPO_ROOT
from pipeline.io import building_folder
from pipeline.posthoc import TEMPERATURE_NETS, check_lts_model
from pipeline.runs import load_weights, resolve_run

BUNDLES_DIR = REPO_ROOT / "bundles"
#: the fields this project's bundles fill: a subset of MONAI's model-zoo metadata schema, shipped so that
#: ``monai.bundle verify_metadata --filepath bundles/metadata_schema.json`` works offline
SCHEMA_FILE = BUNDLES_DIR / "metadata_schema.json"
SCHEMA_URL = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
CALIBRATIONS = ("auto", "none", "ts", "lts")
_INPUT_ONLY = {"image"}
_PER_KEY = ("mode", "padding_mode", "dtype", "align_corners")  # MONAI dict-transform settings given one per key


def _plain(parser, value: Any, where: str) -> Any:
    """``value`` with every ``@ref``/``$expr`` replaced by its parsed plain value (numbers, strings, lists)."""
    if isinstance(value, Mapping):
        return {k: _plain(parser, v, f"{where}::{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(parser, v, f"{where}::{i}") for i, v in enumerate(value)]
    if isinstance(value, str) and value[:1] in ("@", "$") and not value.startswith("$import"):
        parsed = parser.get_parsed_content(where)
        if isinstance(parsed, torch.dtype):
            return f"$torch.{str(parsed).split('.')[-1]}"
        if not isinstance(parsed, (int, float, str, bool, list, tuple, type(None))):
            raise ValueError(f"cannot export '{where}': it resolves to a {type(parsed).__name__}, not a plain value")
        return list(parsed) if isinstance(parsed, tuple) else parsed
    return value


def image_preprocessing(parser) -> tuple[list[dict], list[str]]:
    """The run's preprocessing restricted to the ``image`` key; returns (transforms, names of the dropped steps)."""
    kept, dropped = [], []
    for i, step in enumerate(parser.get("preprocess") or []):
        step = dict(step)
        name = str(step.get("_target_", "?"))
        keys = step.get("keys")
        keys = [keys] if isinstance(keys, str) else list(keys or [])
        refs = [k for k, v in step.items() if k not in ("keys", "_target_") and v in ("label", "probs")]
        if not set(keys) & _INPUT_ONLY or refs:
            dropped.append(name + (f" (uses {', '.join(refs)})" if refs else " (label only)"))
            continue
        step = _plain(parser, step, f"preprocess::{i}")
        step["keys"] = ["image"]
        for k in _PER_KEY:  # per-key settings (e.g. a mode per key) keep the entry of `image`
            if isinstance(step.get(k), list) and len(keys) > 1 and len(step[k]) == len(keys):
                step[k] = step[k][keys.index("image")]
        step.pop("allow_missing_keys", None)
        kept.append(step)
    return kept, dropped


def _network_config(parser, calibrator: dict | None) -> dict:
    net = {
        "_target_": "pipeline.networks.PadToMultiple",
        "net": _plain(parser, parser.get("backbone"), "backbone"),
        "divisor": _plain(parser, parser.get("backbone_divisor"), "backbone_divisor"),
    }
    if calibrator is None:
        return net
    if calibrator["kind"] == "ts":
        return {"_target_": "pipeline.posthoc.TemperatureScaling", "network": net,
                "temperature": float(calibrator["temperature"])}
    tnet = TEMPERATURE_NETS[check_lts_model(calibrator)].__name__
    return {"_target_": "pipeline.posthoc.LocalTemperatureScaling", "network": net,
            "temperature_net": {"_target_": f"pipeline.posthoc.{tnet}", **calibrator["config"]}}


def _load_calibrator(run_dir: Path, calibration: str) -> dict | None:
    if calibration not in CALIBRATIONS:
        raise ValueError(f"calibration must be one of {', '.join(CALIBRATIONS)}, got '{calibration}'")
    if calibration == "none":
        return None
    if calibration == "auto":
        calibration = "ts" if (run_dir / "posthoc" / "ts.pt").is_file() else "none"
        if calibration == "none":
            return None
    path = run_dir / "posthoc" / f"{calibration}.pt"
    if not path.is_file():
        raise FileNotFoundError(f"no fitted {calibration.upper()} calibrator at {path}: evaluate the run with "
                                f"post-hoc calibration first (make evaluate RUN={run_dir})")
    return torch.load(path, map_location="cpu", weights_only=True)


def inference_config(parser, calibrator: dict | None) -> tuple[dict, list[str]]:
    """The bundle's ``inference.yaml`` content and the preprocessing steps that were left out."""
    dataset = parser.get("dataset")
    axis = int(_plain(parser, dataset["slice_axis"], "dataset::slice_axis"))
    pre, dropped = image_preprocessing(parser)
    post = [
        {"_target_": "Activationsd", "keys": "pred", "softmax": True},
        {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
         "nearest_interp": False, "to_tensor": True},
        {"_target_": "CopyItemsd", "keys": "pred", "names": "prob"},
        {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
        {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "seg",
         "output_dtype": "$numpy.uint8", "resample": False, "separate_folder": False, "print_log": False},
        {"_target_": "SaveImaged", "keys": "prob", "output_dir": "@output_dir", "output_postfix": "prob",
         "resample": False, "separate_folder": False, "print_log": False},
    ]
    config = {
        "imports": ["$import glob", "$import os", "$import numpy", "$import torch", "$import pipeline"],
        "bundle_root": ".",
        "input_dir": "$os.path.join(@bundle_root, 'input')",
        "output_dir": "$os.path.join(@bundle_root, 'predictions')",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "network_def": _network_config(parser, calibrator),
        "network": "$@network_def.to(@device)",
        "datalist": "$[{'image': f} for f in sorted(glob.glob(os.path.join(@input_dir, '*.nii*')))]",
        "preprocessing": {"_target_": "Compose", "transforms": pre},
        "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 0},
        "inferer": {"_target_": "pipeline.engines.SliceBatchInferer", "spatial_dim": axis},
        "postprocessing": {"_target_": "Compose", "transforms": post},
        "handlers": [{"_target_": "CheckpointLoader", "load_path": "$os.path.join(@bundle_root, 'models', 'model.pt')",
                      "load_dict": {"model": "@network"}, "map_location": "@device"}],
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
                      "val_handlers": "@handlers"},
        "initialize": [],
        "run": ["$@evaluator.run()"],
    }
    return config, dropped


def metadata(parser, name: str, results: Mapping, calibrator: dict | None) -> dict:
    import monai
    import numpy

    class_names = [str(c) for c in parser.get("dataset")["class_names"]]
    in_channels = int(parser.get_parsed_content("in_channels"))
    mean = results.get("mean", {})
    calib = "none" if calibrator is None else calibrator["kind"]
    return {
        "schema": SCHEMA_URL,
        "version": "0.1.0",
        "changelog": {"0.1.0": f"exported from run {name}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": numpy.__version__,
        "required_packages_version": {"pytorch-ignite": _version("pytorch-ignite"), "nibabel": _version("nibabel")},
        "name": name,
        "task": f"{parser.get('dataset_name')} segmentation ({', '.join(class_names[1:])}), calibrated",
        "description": (f"2D {parser.get('backbone_name')} trained with the {parser.get('loss_name')} loss, applied "
                        f"slice by slice to 3D volumes; post-hoc calibration: {calib}."),
        "authors": "MbLS pipeline",
        "copyright": "Copyright (c) the MbLS pipeline authors",
        "data_source": f"dataset '{parser.get('dataset_name')}' of the MbLS pipeline",
        "data_type": "nifti",
        "image_classes": f"{in_channels} channel(s), intensities scaled by the run's preprocessing",
        "label_classes": ", ".join(f"{i}: {c}" for i, c in enumerate(class_names)),
        "pred_classes": ", ".join(f"{i}: {c}" for i, c in enumerate(class_names)),
        "eval_metrics": {k: float(mean[k]) for k in ("dsc", "asd", "ece", "cece") if k in mean},
        "intended_use": "Research only; not for clinical use.",
        "references": ["Murugesan et al., Calibrating Segmentation Networks with Margin-based Label Smoothing, "
                       "Medical Image Analysis, 2024"],
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": "magnitude", "modality": "MR or CT",
                                 "num_channels": in_channels, "spatial_shape": ["*", "*"], "dtype": "float32",
                                 "value_range": [0, 1], "is_patch_data": False,
                                 "channel_def": {str(i): f"channel {i}" for i in range(in_channels)}}},
            "outputs": {"pred": {"type": "image", "format": "segmentation", "num_channels": len(class_names),
                                 "spatial_shape": ["*", "*"], "dtype": "float32", "value_range": [0, 1],
                                 "is_patch_data": False,
                                 "channel_def": {str(i): c for i, c in enumerate(class_names)}}},
        },
    }


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"


def _model_card(name: str, parser, results: Mapping, dropped: list[str], calibrator: dict | None, run: dict) -> str:
    mean = results.get("mean", {})
    rows = "\n".join(f"| {k} | {float(mean[k]):.4f} |" for k in ("dsc", "asd", "ece", "cece", "nll", "brier")
                     if k in mean)
    calib = "none" if calibrator is None else (
        f"temperature scaling, T = {calibrator['temperature']:.4f}" if calibrator["kind"] == "ts"
        else "local temperature scaling (per-pixel temperature network)")
    dropped_text = ("\n".join(f"- {d}" for d in dropped) if dropped else "- none")
    return f"""# {name}

A MONAI bundle exported by the MbLS pipeline from run `{run['run_dir'].name}` (MLflow run `{run.get('run_id')}`).

- dataset: `{parser.get('dataset_name')}`, classes: {', '.join(str(c) for c in parser.get('dataset')['class_names'])}
- loss: `{parser.get('loss_name')}`, backbone: `{parser.get('backbone_name')}` (2D, applied slice by slice)
- post-hoc calibration in the exported network: {calib}

## Test metrics of the run (uncalibrated network, mean over test volumes)

| metric | value |
|---|---|
{rows}

## Inference

Needs the MbLS pipeline's `pipeline` package importable (run from its repository root):

```bash
python -m monai.bundle run --bundle_root bundles/{name} --config_file bundles/{name}/configs/inference.yaml \\
    --meta_file bundles/{name}/configs/metadata.json --input_dir /path/to/images --output_dir /path/to/predictions
```

Inputs: NIfTI images (`*.nii`, `*.nii.gz`) in `input_dir`, one file per volume with the run's number of channels.
Outputs: `<image>_seg.nii.gz` (class indices) and `<image>_prob.nii.gz` (class probabilities) in `output_dir`.

Preprocessing steps of the run left out of the bundle because they need the label:
{dropped_text}

Research only; not for clinical use.
"""


def export_bundle(run: str, name: str | None = None, out_root: str | os.PathLike | None = None,
                  calibration: str = "auto", overwrite: bool = False) -> Path:
    """Write the bundle of ``run`` (an MLflow run id or name, a run folder, or a checkpoint).

    Args:
        run: what ``make evaluate RUN=`` accepts.
        name: the bundle folder's name (default: the run folder's name).
        out_root: where bundles go (default ``bundles/``).
        calibration: ``auto`` (TS when the run has a fitted one, else none), ``none``, ``ts`` or ``lts``.
        overwrite: replace an existing bundle of that name (atomically); otherwise an existing one is an error.

    Returns:
        The bundle folder.

    Raises:
        FileExistsError: the bundle exists and ``overwrite`` is false.
        FileNotFoundError: no such run, or no fitted calibrator of the asked kind.
    """
    from monai.bundle import ConfigParser


    found = resolve_run(run)
    run_dir = Path(found["run_dir"])
    name = name or run_dir.name
    dest = Path(out_root or BUNDLES_DIR) / name
    if dest.exists() and not overwrite:
        raise FileExistsError(f"bundle {dest} exists; pass --overwrite to replace it")
    parser = ConfigParser()
    parser.read_config(str(run_dir / "config.yaml"))
    calibrator = _load_calibrator(run_dir, calibration)
    config, dropped = inference_config(parser, calibrator)

    # build the network exactly as the bundle will, load the run's weights (and the calibrator's), save its state
    bundle_parser = ConfigParser({"imports": config["imports"], "network_def": config["network_def"]})
    network = bundle_parser.get_parsed_content("network_def")
    base = network if calibrator is None else network.network
    load_weights(base, found["checkpoint"])
    if calibrator is not None:
        network.load_calibrator_state(calibrator)
    metrics_file = run_dir / "metrics.json"
    results = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}

    with building_folder(dest) as tmp:
        (tmp / "configs").mkdir()
        (tmp / "models").mkdir()
        (tmp / "docs").mkdir()
        ConfigParser.export_config_file(config, str(tmp / "configs" / "inference.yaml"), fmt="yaml", sort_keys=False)
        (tmp / "configs" / "metadata.json").write_text(
            json.dumps(metadata(parser, name, results, calibrator), indent=2) + "\n")
        torch.save(network.state_dict(), tmp / "models" / "model.pt")
        (tmp / "docs" / "README.md").write_text(_model_card(name, parser, results, dropped, calibrator, found))
    return dest
