"""``make export``: a trained run as a MONAI bundle that runs without this project.

``bundles/<name>/`` (model-zoo layout)::

    configs/inference.json evaluate.json train.json datalist.json logging.conf metadata.json
    models/model.pt      the uncalibrated network's state dict (what train.json trains)
    models/model.ts      TorchScript: padding + backbone + the run's post-hoc calibration (none, TS or LTS)
    large_files.yml      sha256 of both weight files
    scripts/             code train.json names (padding wrapper, backbones MONAI lacks, the loss), when needed
    docs/README.md       model card; docs/reliability.png, the shipped model's reliability diagram
    LICENSE

The bundle is built in a temporary folder and swapped in whole; nothing in it may import ``pipeline``. With an
MLflow run, the bundle is logged as its artifact and the TorchScript model as its logged model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

import mlflow
import torch
from monai.bundle import ConfigParser

from pipeline.config import REPO_ROOT
from pipeline.export import card, configs, dataset, metadata, scripts, transforms
from pipeline.export.mlflow_logging import log_bundle
from pipeline.export.torchscript import shipped_model
from pipeline.io import building_folder
from pipeline.posthoc import LocalTemperatureScaling, TemperatureScaling
from pipeline.runs import load_weights, resolve_run
from pipeline.tracking import tracking_uri

log = logging.getLogger("pipeline")

BUNDLES_DIR = REPO_ROOT / "bundles"
#: the part of MONAI's metadata schema these bundles fill, kept here so that verification needs no download
SCHEMA_FILE = BUNDLES_DIR / "metadata_schema.json"
CALIBRATIONS = ("auto", "none", "ts", "lts")
DEFAULT_SLICES_PER_VOLUME = 8


def sha256(path: str | os.PathLike) -> str:
    """The sha256 hex digest of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def default_bundle_name(parser) -> str:
    """``<dataset>_<task>_<loss>_<backbone>`` in lower case (``mni_brain_tissue_mbls_unet``); the task is the
    dataset config's ``task`` (default ``segmentation``)."""
    task = (parser.get("dataset") or {}).get("task") or "segmentation"
    text = "_".join(str(p) for p in (parser.get("dataset_name"), task, parser.get("loss_name"),
                                     parser.get("backbone_name")))
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def load_calibrator(run_dir: Path, calibration: str, network: torch.nn.Module) -> tuple:
    """The run's fitted calibrator around ``network``: ``(module or None, kind, detail text)``.

    ``auto`` takes TS when the run has a fitted one, else none.

    Raises:
        ValueError: an unknown calibration.
        FileNotFoundError: no fitted calibrator of that kind in ``run_dir/posthoc``.
    """
    if calibration not in CALIBRATIONS:
        raise ValueError(f"calibration must be one of {', '.join(CALIBRATIONS)}, got '{calibration}'")
    if calibration == "auto":
        calibration = "ts" if (run_dir / "posthoc" / "ts.pt").is_file() else "none"
    if calibration == "none":
        return None, "none", ""
    path = run_dir / "posthoc" / f"{calibration}.pt"
    if not path.is_file():
        raise FileNotFoundError(f"no fitted {calibration.upper()} calibrator at {path}: evaluate the run with "
                                f"post-hoc calibration first (make evaluate RUN={run_dir})")
    cls = {"ts": TemperatureScaling, "lts": LocalTemperatureScaling}[calibration]
    module = cls.load_calibrator(network, path).eval()
    if calibration == "ts":
        return module, "ts", f", T = {module.temperature:.4f}"
    own = sum(p.numel() for n, p in module.named_parameters() if not n.startswith("network."))
    return module, "lts", f" (a temperature network of {own} parameters)"


def _slices_per_volume(params: dict) -> int:
    try:
        return max(1, round(int(params["n_train_slices"]) / max(1, int(params["n_train_volumes"]))))
    except (KeyError, ValueError):
        return DEFAULT_SLICES_PER_VOLUME


def _run_cases(parser, run_dir: Path) -> tuple[dict, dict | None]:
    """The run's split and, when the dataset can be read here, its cases by id."""
    split = json.loads((run_dir / "splits.json").read_text()) if (run_dir / "splits.json").is_file() else None
    try:
        source = parser.get_parsed_content("dataset")["source"]
        cases = {c["id"]: c for c in source.cases()}
    except Exception as e:  # noqa: BLE001 - any unreadable dataset: the datalist falls back to .nii.gz names
        log.warning("the run's dataset cannot be read (%s): configs/datalist.json uses <id>.nii.gz file names", e)
        cases = None
    if split is None:
        if cases is None:
            raise FileNotFoundError(f"no splits.json in {run_dir} and the dataset cannot be read: no datalist")
        split = source.split(list(cases.values()), int(parser.get_parsed_content("seed")))
    return split, cases


def _hyper(parser, params: dict) -> dict:
    value = parser.get_parsed_content
    return {"seed": int(value("seed")), "epochs": int(value("epochs")), "val_interval": int(value("val_interval")),
            "batch_size": int(value("batch_size")), "learning_rate": float(value("lr")),
            "lr_gamma": float(value("lr_gamma")), "slices_per_volume": _slices_per_volume(params), "num_workers": 0}


def export_bundle(run: str, name: str | None = None, out_root: str | os.PathLike | None = None,
                  calibration: str = "auto", overwrite: bool = False, log_to_mlflow: bool = True,
                  data_dir: str | os.PathLike | None = None) -> dict:
    """Write the bundle of ``run`` (what ``make evaluate RUN=`` accepts: an MLflow run id or name, a run folder or
    a checkpoint).

    Args:
        name: the bundle's folder name (default :func:`default_bundle_name`).
        out_root: where bundles go (default ``bundles/``).
        calibration: ``auto`` (TS when the run has a fitted one, else none), ``none``, ``ts`` or ``lts``.
        overwrite: replace an existing bundle of that name (its version's patch number grows by one).
        log_to_mlflow: log the bundle and the model into the run's MLflow run (when one records the run).
        data_dir: also copy the run's cases there, in the layout of ``configs/datalist.json``.

    Returns:
        ``{"bundle", "name", "calibration", "compiled" (how the calibration became TorchScript), "version",
        "metrics_source", "mlflow" (None or :func:`pipeline.export.mlflow_logging.log_bundle`'s result),
        "data_dir"}``.

    Raises:
        FileExistsError: the bundle exists and ``overwrite`` is false.
        FileNotFoundError: no such run, or no fitted calibrator of the asked kind.
        ValueError: a component that cannot be vendored, or test metrics missing for the calibration.
    """
    found = resolve_run(run)
    run_dir, run_id = Path(found["run_dir"]), found["run_id"]
    parser = ConfigParser()
    parser.read_config(str(run_dir / "config.yaml"))
    name = name or default_bundle_name(parser)
    dest = Path(out_root or BUNDLES_DIR) / name
    if dest.exists() and not overwrite:
        raise FileExistsError(f"bundle {dest} exists; pass --overwrite to replace it")
    old_meta = dest / "configs" / "metadata.json"
    previous = json.loads(old_meta.read_text()) if old_meta.is_file() else None

    network = parser.get_parsed_content("network_def")
    load_weights(network, found["checkpoint"])
    network.eval()
    calibrator, kind, detail = load_calibrator(run_dir, calibration, network)
    dataset_cfg = parser.get_parsed_content("dataset")
    class_names = [str(c) for c in dataset_cfg["class_names"]]
    in_channels, slice_axis = int(parser.get_parsed_content("in_channels")), int(dataset_cfg["slice_axis"])
    model_ts, compiled = shipped_model(network, calibrator, in_channels, len(class_names))
    metrics, metrics_source = metadata.shipped_metrics(run_dir, run_id, kind)
    params = {}
    if run_id is not None:
        params = mlflow.MlflowClient(tracking_uri=tracking_uri()).get_run(run_id).data.params

    image_steps, dropped = transforms.image_preprocessing(parser)
    labelled_steps, _ = transforms.labelled_preprocessing(parser)
    random_steps = transforms.slice_sampling(slice_axis) + transforms.augmentation(parser)
    network_def = transforms.plain_value(parser, parser.get("network_def"), "network_def")
    files: dict[str, Path] = {}
    built = {
        "inference": configs.inference_config(image_steps, slice_axis),
        "evaluate": configs.evaluate_config(labelled_steps, len(class_names), int(parser.get("n_bins", 15))),
        "train": configs.train_config(labelled_steps, random_steps, network_def, scripts.loss_config(parser),
                                      len(class_names), slice_axis, _hyper(parser, params)),
    }
    built = {k: scripts.vendor_targets(v, files, k) for k, v in built.items()}
    split, cases = _run_cases(parser, run_dir)
    layout = dataset.case_layout(split, cases)

    loss_params = {k: v for k, v in built["train"]["loss"].items() if k != "_target_"}
    info = {"dataset": parser.get("dataset_name"), "task": dataset_cfg.get("task") or parser.get("dataset_name"),
            "data_source": dataset_cfg.get("data_source") or f"the '{parser.get('dataset_name')}' dataset of the "
            "MbLS pipeline", "modality": dataset_cfg.get("modality") or "unknown", "class_names": class_names,
            "in_channels": in_channels, "slice_axis": slice_axis, "loss": parser.get("loss_name"),
            "loss_params": loss_params, "backbone": parser.get("backbone_name"), "calibration": kind,
            "calibration_detail": detail, "run_name": run_dir.name, "run_id": run_id,
            "distance_unit": dataset_cfg.get("distance_unit", "mm")}
    with_losses = scripts.uses_scripts(built, "losses")
    script_modules = set().union(*(scripts.imported_modules(p) for p in files.values())) if files else set()
    if with_losses:
        script_modules |= scripts.imported_modules(scripts.BUNDLE_SCRIPTS / "losses.py")
    extra = [d for f in files for d in scripts.EXTRA_REQUIREMENTS.get(f, ())]
    packages = metadata.required_packages(built.values(), script_modules, extra)
    note = (f"exported from run {run_dir.name}" + (f" (MLflow run {run_id})" if run_id else "")
            + f" with {metadata.CALIBRATION_TEXT[kind]}")
    meta = metadata.metadata(name=name, info=info, metrics=metrics, metrics_source=metrics_source,
                             packages=packages, version_info=metadata.next_version(previous, note),
                             input_range=transforms.input_value_range(image_steps))

    diagram = run_dir / ("reliability.png" if kind == "none" else f"reliability_{kind}.png")
    with building_folder(dest) as tmp:
        for sub in ("configs", "models", "docs"):
            (tmp / sub).mkdir()
        for key, content in built.items():
            (tmp / "configs" / f"{key}.json").write_text(json.dumps(content, indent=4) + "\n")
        (tmp / "configs" / "datalist.json").write_text(json.dumps(dataset.datalist(layout), indent=4) + "\n")
        (tmp / "configs" / "logging.conf").write_text(configs.logging_conf())
        (tmp / "configs" / "metadata.json").write_text(json.dumps(meta, indent=4) + "\n")
        torch.save(network.state_dict(), tmp / configs.MODEL_PT)
        torch.jit.save(model_ts, str(tmp / configs.MODEL_TS))
        large = [{"path": rel, "url": "", "hash_val": sha256(tmp / rel), "hash_type": "sha256"}
                 for rel in (configs.MODEL_PT, configs.MODEL_TS)]
        (tmp / "large_files.yml").write_text(json.dumps({"large_files": large}, indent=4) + "\n")
        shutil.copyfile(configs.TEMPLATES / "LICENSE", tmp / "LICENSE")
        if diagram.is_file():
            shutil.copyfile(diagram, tmp / "docs" / "reliability.png")
        written = scripts.write_scripts(tmp / "scripts", files, with_losses)
        (tmp / "docs" / "README.md").write_text(card.model_card(
            meta, info, image_steps=image_steps, dropped=dropped, train=built["train"],
            has_diagram=diagram.is_file(), scripts=[f for f in written if f != "__init__.py"]))
        scripts.check_self_contained(tmp)

    logged = None
    if log_to_mlflow and run_id is not None:
        logged = log_bundle(run_id, dest, model_ts, in_channels)
    if data_dir is not None:
        dataset.write_bundle_dataset(layout, data_dir)
    return {"bundle": dest, "name": name, "calibration": kind, "compiled": compiled, "version": meta["version"],
            "metrics_source": metrics_source, "mlflow": logged, "data_dir": None if data_dir is None else
            Path(data_dir)}
