"""``make export``: a trained run as a MONAI bundle that runs without this project.

``bundles/<name>/`` (model-zoo layout)::

    configs/inference.json evaluate.json train.json datalist.json logging.conf metadata.json
    models/model.pt      the uncalibrated network's state dict (what train.json trains)
    models/model.ts      TorchScript: padding + backbone + the run's post-hoc calibration (none, TS or LTS), saved
                         without source paths
    large_files.yml      sha256 of both weight files
    scripts/             code the configs name (input checks, the paper's metrics, padding wrapper, backbones MONAI
                         lacks, the loss)
    docs/README.md       model card; docs/reliability.png, the shipped model's reliability diagram;
                         docs/data_license.txt, the training data and their licence
    data/                with ``with_data``: the run's cases in the datalist's layout
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
from pipeline.export.torchscript import save_portable, shipped_model
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


def default_bundle_name(parser, run_name: str | None = None) -> str:
    """``<dataset>_<task>_<loss>_<backbone>[_<run name>]`` in lower case (``mni_brain_tissue_mbls_unet_brain_ce``);
    the task is the dataset config's ``task`` (default ``segmentation``). With the run's name, the default of
    ``make export`` never replaces the shipped bundle (``bundles/mni_brain_tissue_mbls_unet``, named explicitly)."""
    task = (parser.get("dataset") or {}).get("task") or "segmentation"
    text = "_".join(str(p) for p in (parser.get("dataset_name"), task, parser.get("loss_name"),
                                     parser.get("backbone_name"), *([run_name] if run_name else [])))
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def _posthoc_record(run_dir: Path) -> dict:
    path = run_dir / "metrics.json"
    try:
        return dict(json.loads(path.read_text()).get("posthoc") or {})
    except (OSError, ValueError, AttributeError):
        return {}


def auto_calibration(run_dir: Path) -> tuple[str, str]:
    """The calibration ``auto`` picks and why: among the run's fitted calibrators (``posthoc/<ts|lts>.pt``), the one
    with the lowest validation ECE (the paper's foreground ECE on the validation volumes, as the run's evaluation
    recorded it in ``metrics.json``), or ``none`` when no calibrator lowered it.

    Returns:
        ``(kind, reason)``, e.g. ``("none", "auto: no calibration, none lowered the validation ECE 0.0930
        (TS 0.1490)")``.
    """
    record = _posthoc_record(run_dir)
    fitted = {k: record.get(k, {}) for k in ("ts", "lts") if (run_dir / "posthoc" / f"{k}.pt").is_file()}
    scored = {k: d for k, d in fitted.items() if d.get("val_ece_after") is not None
              and d.get("val_ece_before") is not None}
    if not scored:
        if "ts" in fitted:
            return "ts", "auto: TS, the run records no validation ECE to choose by"
        return "none", "auto: no calibration, the run has no fitted calibrator"
    before = float(next(iter(scored.values()))["val_ece_before"])
    listed = ", ".join(f"{k.upper()} {float(d['val_ece_after']):.4f}" for k, d in scored.items())
    best = min(scored, key=lambda k: float(scored[k]["val_ece_after"]))
    if float(scored[best]["val_ece_after"]) >= before:
        return "none", f"auto: no calibration, none lowered the validation ECE {before:.4f} ({listed})"
    return best, f"auto: {best.upper()}, the lowest validation ECE ({before:.4f} uncalibrated; {listed})"


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
        calibration = auto_calibration(run_dir)[0]
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


def _slices_per_volume(params: dict, profile: dict) -> int:
    """Training slices per volume: from the run's MLflow parameters, else the training images' headers."""
    try:
        return max(1, round(int(params["n_train_slices"]) / max(1, int(params["n_train_volumes"]))))
    except (KeyError, ValueError):
        return int(profile.get("slices_per_volume") or DEFAULT_SLICES_PER_VOLUME)


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


def _hyper(parser, params: dict, profile: dict) -> dict:
    value = parser.get_parsed_content
    return {"seed": int(value("seed")), "epochs": int(value("epochs")), "val_interval": int(value("val_interval")),
            "batch_size": int(value("batch_size")), "learning_rate": float(value("lr")),
            "lr_gamma": float(value("lr_gamma")), "slices_per_volume": _slices_per_volume(params, profile),
            "num_workers": 0}


def export_bundle(run: str, name: str | None = None, out_root: str | os.PathLike | None = None,
                  calibration: str = "auto", overwrite: bool = False, log_to_mlflow: bool = True,
                  data_dir: str | os.PathLike | None = None, with_data: bool = False) -> dict:
    """Write the bundle of ``run`` (what ``make evaluate RUN=`` accepts: an MLflow run id or name, a run folder or
    a checkpoint).

    Args:
        name: the bundle's folder name (default :func:`default_bundle_name` with the run's name).
        out_root: where bundles go (default ``bundles/``).
        calibration: ``auto`` (:func:`auto_calibration`), ``none``, ``ts`` or ``lts``.
        overwrite: replace an existing bundle of that name (its version's patch number grows by one).
        log_to_mlflow: log the bundle and the model into the run's MLflow run (when one records the run).
        data_dir: also copy the run's cases there, in the layout of ``configs/datalist.json``.
        with_data: copy the run's cases into the bundle's own ``data/`` (the configs' default ``dataset_dir``), so
            that inference, evaluation and retraining run as they are.

    Returns:
        ``{"bundle", "name", "calibration", "calibration_reason", "compiled" (how the calibration became
        TorchScript), "version", "metrics_source", "mlflow" (None or
        :func:`pipeline.export.mlflow_logging.log_bundle`'s result), "data_dir", "profile" (the training images'
        spacing and intensity range, :func:`pipeline.export.dataset.training_profile`)}``.

    Raises:
        FileExistsError: the bundle exists and ``overwrite`` is false.
        FileNotFoundError: no such run, or no fitted calibrator of the asked kind.
        ValueError: a component that cannot be vendored, or test metrics missing for the calibration.
    """
    found = resolve_run(run)
    run_dir, run_id = Path(found["run_dir"]), found["run_id"]
    parser = ConfigParser()
    parser.read_config(str(run_dir / "config.yaml"))
    name = name or default_bundle_name(parser, run_dir.name)
    dest = Path(out_root or BUNDLES_DIR) / name
    if dest.exists() and not overwrite:
        raise FileExistsError(f"bundle {dest} exists; pass --overwrite to replace it")
    old_meta = dest / "configs" / "metadata.json"
    previous = json.loads(old_meta.read_text()) if old_meta.is_file() else None

    network = parser.get_parsed_content("network_def")
    load_weights(network, found["checkpoint"])
    network.eval()
    reason = auto_calibration(run_dir)[1] if calibration == "auto" else f"asked for: {calibration}"
    calibrator, kind, detail = load_calibrator(run_dir, calibration, network)
    dataset_cfg = parser.get_parsed_content("dataset")
    class_names = [str(c) for c in dataset_cfg["class_names"]]
    in_channels, slice_axis = int(parser.get_parsed_content("in_channels")), int(dataset_cfg["slice_axis"])
    model_ts, compiled = shipped_model(network, calibrator, in_channels, len(class_names))
    metrics, metrics_source = metadata.shipped_metrics(run_dir, run_id, kind)
    params = {}
    if run_id is not None:
        params = mlflow.MlflowClient(tracking_uri=tracking_uri()).get_run(run_id).data.params

    split, cases = _run_cases(parser, run_dir)
    layout = dataset.case_layout(split, cases)
    profile = dataset.training_profile(layout, slice_axis=slice_axis) if cases is not None else {
        "spacing": None, "intensity_range": None, "n_images": 0, "slices_per_volume": None}

    def guarded(steps):
        return transforms.guarded_preprocessing(steps, in_channels, profile["intensity_range"], profile["spacing"])

    run_image_steps, dropped = transforms.image_preprocessing(parser)
    image_steps = guarded(run_image_steps)
    labelled_steps = guarded(transforms.labelled_preprocessing(parser)[0])
    random_steps = transforms.slice_sampling(slice_axis) + transforms.augmentation(parser)
    network_def = transforms.plain_value(parser, parser.get("network_def"), "network_def")
    files: dict[str, Path] = {}
    built = {
        "inference": configs.inference_config(image_steps, slice_axis),
        "evaluate": configs.evaluate_config(labelled_steps, class_names, slice_axis, int(parser.get("n_bins", 15))),
        "train": configs.train_config(labelled_steps, random_steps, network_def, scripts.loss_config(parser),
                                      len(class_names), slice_axis, _hyper(parser, params, profile)),
    }
    built = {k: scripts.vendor_targets(v, files, k) for k, v in built.items()}
    own = scripts.bundle_modules(built)

    loss_params = {k: v for k, v in built["train"]["loss"].items() if k != "_target_"}
    source = dataset_cfg.get("source")
    info = {"dataset": parser.get("dataset_name"), "task": dataset_cfg.get("task") or parser.get("dataset_name"),
            "data_source": dataset_cfg.get("data_source") or f"the '{parser.get('dataset_name')}' dataset of the "
            "MbLS pipeline", "modality": dataset_cfg.get("modality") or "unknown", "class_names": class_names,
            "in_channels": in_channels, "slice_axis": slice_axis, "loss": parser.get("loss_name"),
            "loss_params": loss_params, "backbone": parser.get("backbone_name"), "calibration": kind,
            "calibration_detail": detail, "calibration_reason": reason, "run_name": run_dir.name, "run_id": run_id,
            "distance_unit": dataset_cfg.get("distance_unit", "mm"), "profile": profile,
            "per_image_normalisation": transforms.normalises_per_image(run_image_steps),
            "checked_range": None if transforms.normalises_per_image(run_image_steps) else profile["intensity_range"],
            "data_license": getattr(source, "data_license", None), "with_data": bool(with_data),
            "n_cases": {k: len(v) for k, v in layout.items()}}
    script_modules = set().union(*(scripts.imported_modules(p) for p in files.values())) if files else set()
    for module in own:
        script_modules |= scripts.imported_modules(scripts.BUNDLE_SCRIPTS / module)
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
        save_portable(model_ts, tmp / configs.MODEL_TS)
        large = [{"path": rel, "hash_val": sha256(tmp / rel), "hash_type": "sha256"}
                 for rel in (configs.MODEL_PT, configs.MODEL_TS)]
        (tmp / "large_files.yml").write_text(json.dumps({"large_files": large}, indent=4) + "\n")
        shutil.copyfile(configs.TEMPLATES / "LICENSE", tmp / "LICENSE")
        (tmp / "docs" / "data_license.txt").write_text(card.data_license(info))
        if diagram.is_file():
            shutil.copyfile(diagram, tmp / "docs" / "reliability.png")
        written = scripts.write_scripts(tmp / "scripts", files, own)
        if with_data:
            dataset.write_bundle_dataset(layout, tmp / "data")
        (tmp / "docs" / "README.md").write_text(card.model_card(
            meta, info, image_steps=image_steps, dropped=dropped, train=built["train"],
            has_diagram=diagram.is_file(), scripts=[f for f in written if f != "__init__.py"]))
        scripts.check_self_contained(tmp)

    logged = None
    if log_to_mlflow and run_id is not None:
        # the file as written (no source paths), not the in-memory module
        logged = log_bundle(run_id, dest, torch.jit.load(str(dest / configs.MODEL_TS)), in_channels)
    if data_dir is not None:
        dataset.write_bundle_dataset(layout, data_dir)
    return {"bundle": dest, "name": name, "calibration": kind, "calibration_reason": reason, "compiled": compiled,
            "version": meta["version"], "metrics_source": metrics_source, "mlflow": logged,
            "data_dir": None if data_dir is None else Path(data_dir), "profile": profile}
