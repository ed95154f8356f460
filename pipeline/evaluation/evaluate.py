"""Test-time evaluation of a trained network, as the paper does it, logged into the run that trained it.

``evaluate_trained`` (the end of ``make train``; ``make evaluate RUN=…`` calls it again for a trained run):

1. **Post-hoc calibration** (paper §5.2.2): temperature scaling (TS) and local temperature scaling (LTS) fitted on
   2D slices of the validation volumes only (:mod:`pipeline.posthoc`); their state is saved in
   ``runs/<name>/posthoc/`` and as MLflow artifacts.
2. **One pass over the test volumes**: the network runs once per volume (the evaluator of
   :func:`pipeline.engines.create_evaluator`, slice by slice); the same logits are scored uncalibrated (``pre``),
   after TS and after LTS: DSC and ASD (of pre: TS and LTS divide each pixel's logits by a positive temperature,
   which keeps the argmax), the paper's
   foreground ECE/CECE, NLL, Brier, adaptive ECE, MONAI's ``CalibrationErrorMetric`` (a different quantity, logged
   under its own name), calibration against soft reference labels on datasets that carry them (``probs``), and
   logit statistics (paper Fig. 4). Confidence maps (PNG slices, NIfTI max-probability and entropy volumes) are
   written on the way.
3. **Robustness to noise** (paper §5.2.4): Gaussian noise of each σ on the test images, seeded; DSC and ECE per σ.
4. **Reports**: tables, reliability diagrams (pre/TS/LTS and per class), the logit and noise plots, a markdown
   summary, ``metrics.json``, ``per_volume.csv``; all of it into the same MLflow run (metrics with a new step on
   each re-evaluation, artifacts replaced).

What runs is set by the ``evaluation`` block of the config (:mod:`pipeline.evaluation.settings`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from pipeline import report
from pipeline.data.loading import volume_loader
from pipeline.data.prepare import PreparedData
from pipeline.engines import create_evaluator, run_engine
from pipeline.evaluation.last import LAST_PREFIX, evaluate_last_weights
from pipeline.evaluation.maps import ConfidenceMapWriter
from pipeline.evaluation.noise import noise_sweep
from pipeline.evaluation.results import jsonable, mlflow_metrics, summarise
from pipeline.evaluation.settings import evaluation_settings
from pipeline.io import write_json_atomic, write_text_atomic, write_with
from pipeline.posthoc import fit_calibrators

POSTHOC_LOGGED = ("temperature", "val_nll_before", "val_nll_after", "val_ece_before", "val_ece_after",
                  "best_iteration")


def create_test_evaluator(
    network: torch.nn.Module,
    loader,
    device: torch.device,
    num_classes: int,
    slice_axis: int = 2,
    n_bins: int = 15,
    calibrators: Mapping[str, torch.nn.Module] | None = None,
    logits: bool = True,
    monai_calibration_error: bool = True,
    amp: bool = False,
    regions: Sequence[Sequence[int]] | None = None,
):
    """The test evaluator (:func:`pipeline.engines.create_evaluator` with every test metric, prefix ``test/``):
    DSC, ASD, the calibration measures and their extras for the network and each calibrator, and optionally
    MONAI's ``CalibrationErrorMetric`` and the logit statistics."""
    return create_evaluator(network, loader, device, num_classes, slice_axis, prefix="test/", calibrators=calibrators,
                            amp=amp, n_bins=n_bins, regions=regions, surface_distance=True, extras=True,
                            logits=logits, monai_calibration_error=monai_calibration_error)


def evaluate_trained(
    parser,
    network: torch.nn.Module,
    data: PreparedData,
    run_dir: str | Path,
    tracker=None,
    *,
    step: int = 0,
    checkpoint: str | Path | None = None,
    extra_summary: Mapping | None = None,
    settings: Mapping | None = None,
    last_state: Mapping | None = None,
    quiet: bool = False,
) -> dict:
    """Evaluate a trained ``network`` on the test volumes of ``data`` and write every report into ``run_dir`` (and
    into the MLflow run of ``tracker`` when given, metrics at ``step``).

    Args:
        parser: the run's ``ConfigParser`` (dataset, ``n_bins``, ``seed``, ``device``, ``amp``, ``evaluation``).
        network: the network with its trained weights loaded.
        data: :func:`pipeline.data.prepare.prepare_data` of the run; ``val`` volumes are needed for post-hoc
            calibration.
        run_dir: the run folder.
        tracker: a :class:`pipeline.tracking.RunTracker` (or ``None``: files only).
        step: the MLflow step of the test metrics (0 at training, then one more per re-evaluation).
        checkpoint: the weights' file, for the reports.
        extra_summary: entries added to ``metrics.json`` (e.g. the training's best validation DSC).
        settings: the ``evaluation`` settings (default: the config's block, completed by
            :func:`pipeline.evaluation.settings.evaluation_settings`).
        last_state: the last training epoch's weights; with the ``last_weights`` setting they are scored on the
            test volumes too (:mod:`pipeline.evaluation.last`).

    Returns:
        ``{"results", "table", "posthoc_table", "noise_table", "files", "maps", "posthoc", "timings", "plot",
        "summary", "calibrators", "settings"}``.

    Raises:
        ValueError: no test volume.
    """

    def say(msg: str) -> None:
        if not quiet:
            print(msg, flush=True)

    run_dir = Path(run_dir)
    if settings is None:
        settings = parser.get("evaluation") if "evaluation" in parser.get() else None
    settings = evaluation_settings(settings)
    class_names, slice_axis = data.class_names, data.slice_axis
    k = len(class_names)
    regions = data.regions  # e.g. BraTS: DSC/ASD on ET/TC/WT
    device = parser.get_parsed_content("device")
    n_bins = int(parser.get_parsed_content("n_bins"))
    seed = int(parser.get_parsed_content("seed"))
    amp = bool(parser.get_parsed_content("amp")) and torch.device(device).type == "cuda"
    names = {key: parser.get(f"{key}_name", "?") for key in ("dataset", "loss", "backbone")}
    if "test" not in data.volumes:
        raise ValueError(f"the '{names['dataset']}' dataset has no test volume to evaluate")
    network.eval()
    timings: dict[str, float] = {}
    notes: list[str] = []

    # 1. post-hoc calibration on the validation volumes
    t0 = time.time()
    calibrators, posthoc = {}, {}
    if settings["posthoc"]:
        if "val" not in data.volumes:
            notes.append("no validation volume: post-hoc calibration skipped")
        else:
            say(f"fitting post-hoc calibration ({', '.join(settings['posthoc'])}) on the validation slices ...")
            calibrators, posthoc = fit_calibrators(
                network, data.volumes["val"], settings, k, int(data.dataset.get("in_channels", 1)), slice_axis,
                device, seed, run_dir / "posthoc", say)
    timings["posthoc_fit_s"] = time.time() - t0

    # 2. one pass over the test volumes
    t0 = time.time()
    test_ids = [c["id"] for c in data.cases["test"]]
    evaluator = create_test_evaluator(
        network, volume_loader(data.volumes["test"]), device, k, slice_axis, n_bins, calibrators,
        logits=bool(settings["logits"]), monai_calibration_error=bool(settings["monai_calibration_error"]), amp=amp,
        regions=list(regions.values()) or None)
    maps = ConfidenceMapWriter(run_dir / "maps", slice_axis, settings["maps"]["volumes"], settings["maps"]["slices"])
    maps.attach(evaluator)
    say(f"evaluating {len(test_ids)} test volumes ...")
    run_engine(evaluator)
    methods = ["pre", *calibrators]
    results = summarise(evaluator, class_names, test_ids, methods=methods, region_names=list(regions))
    results["notes"] = notes + results["notes"] + maps.notes
    results["distance_unit"] = str(data.dataset.get("distance_unit", "mm"))  # of ASD: px where images carry none
    timings["test_s"] = time.time() - t0

    # 3. noise
    t0 = time.time()
    if settings["noise"]["sigmas"]:
        say(f"noise sweep (σ = {', '.join(f'{s:g}' for s in settings['noise']['sigmas'])}) ...")
        results["noise"] = noise_sweep(network, volume_loader(data.volumes["test"]), device, k, slice_axis,
                                       settings["noise"]["sigmas"], int(settings["noise"]["seed"]), n_bins, amp,
                                       regions=list(regions.values()) or None)
    timings["noise_s"] = time.time() - t0

    # 3b. the last epoch's weights (checkpoint sensitivity)
    t0 = time.time()
    if settings["last_weights"] and last_state is not None:
        say("scoring the last epoch's weights on the test volumes ...")
        results["last"] = evaluate_last_weights(
            network, last_state, volume_loader(data.volumes["test"]), device, class_names, test_ids, slice_axis,
            n_bins, amp, list(regions), list(regions.values()) or None)
    timings["last_s"] = time.time() - t0

    # 4. reports
    t0 = time.time()
    label = f"{names['loss']} · {names['backbone']} · {names['dataset']}"
    files = _figures(results, methods, maps.rows, run_dir, label)
    report.write_per_volume_csv(run_dir / "per_volume.csv", results["per_volume"])
    if results.get("last"):
        report.write_per_volume_csv(run_dir / "per_volume_last.csv", results["last"]["per_volume"])
    figure_data = write_figure_data(run_dir / "figure_data.npz", results, methods, maps.rows)
    table = report.results_table(results)
    ptable = report.posthoc_table(results) if calibrators else ""
    ntable = report.noise_table(results["noise"]) if results.get("noise") else ""
    write_text_atomic(run_dir / "results.txt", "\n\n".join(t for t in (table, ptable, ntable) if t) + "\n")
    timings["reports_s"] = time.time() - t0

    metrics_path = _write_metrics_json(run_dir / "metrics.json", results, notes, {
        "posthoc": posthoc, "evaluation_settings": settings, "evaluation_step": step, "checkpoint": checkpoint,
        "test_seconds": timings["test_s"], "evaluation_seconds": timings, **(extra_summary or {}),
        **({"run_id": tracker.run_id} if tracker is not None else {})})
    info = {"run_name": run_dir.name, "run_id": getattr(tracker, "run_id", None), **names, "checkpoint": checkpoint,
            "posthoc": posthoc, "timings": timings, "n_bins": n_bins}
    md = write_text_atomic(run_dir / "summary.md", report.summary_markdown(
        info, results, [f.name for f in files] + [f"maps/{f.name}" for f in maps.files]))

    if tracker is not None:
        metrics = mlflow_metrics(results)
        for name, d in posthoc.items():
            metrics.update({f"posthoc/{name}/{key}": d[key] for key in POSTHOC_LOGGED if key in d})
        metrics.update({f"time/{key}": v for key, v in timings.items()})
        if results.get("last"):
            metrics.update({f"{LAST_PREFIX}{key}": v for key, v in results["last"]["mean"].items()})
        tracker.log_metrics(metrics, step=step)
        last_csv = [run_dir / "per_volume_last.csv"] if results.get("last") else []
        for f in [*files, run_dir / "per_volume.csv", *last_csv, figure_data, run_dir / "results.txt", metrics_path,
                  md]:
            tracker.log_artifact(f)
        for f in maps.files:
            tracker.log_artifact(f, "maps")
        for d in posthoc.values():
            if "file" in d:
                tracker.log_artifact(d["file"], "posthoc")
    return {"results": results, "table": table, "posthoc_table": ptable, "noise_table": ntable, "files": files,
            "maps": maps.files, "posthoc": posthoc, "timings": timings, "plot": files[0], "summary": md,
            "calibrators": calibrators, "settings": settings}


def _figures(results: dict, methods: list[str], map_rows: list[dict], run_dir: Path, label: str) -> list[Path]:
    """The run's PNG figures (reliability diagrams first, then per class, confidence maps, logits, noise)."""
    n = results["n_volumes"]
    class_names = results["class_names"]
    files = [report.reliability_diagram(results["reliability"], run_dir / "reliability.png",
                                        f"{label}: foreground voxels, {n} test volumes (pooled)",
                                        results["mean"]["ece_pooled"])]
    for method in methods[1:]:
        r = results["methods"][method]
        files.append(report.reliability_diagram(
            r["reliability"], run_dir / f"reliability_{method}.png",
            f"{label} · {report.METHOD_LABELS[method]}: foreground voxels, {n} test volumes (pooled)",
            r["mean"]["ece_pooled"]))
    files.append(report.reliability_per_class(
        {report.METHOD_LABELS[m]: results["methods"][m]["stats"] for m in methods}, class_names,
        run_dir / "reliability_per_class.png", f"{label}: per ground-truth class, {n} test volumes"))
    if map_rows:
        files.append(report.confidence_maps(map_rows, class_names, run_dir / "confidence_maps.png",
                                            f"{label}: test slices"))
    if results.get("logits"):
        files.append(report.logit_plot(results["logits"]["mean_logits"], class_names, run_dir / "logits.png",
                                       f"{label}: mean logits per ground-truth class (test volumes)"))
    if results.get("noise"):
        files.append(report.noise_plot(results["noise"], run_dir / "noise.png",
                                       f"{label}: Gaussian noise on the test images"))
    return files


def write_figure_data(path: Path, results: dict, methods: list[str], map_rows: list[dict]) -> Path:
    """The arrays behind a run's figures, for figures that compare runs (``pipeline.compare``): per method the
    pooled reliability curve (``reliability_<method>_{edges,count,confidence,accuracy}``), the first confidence-map
    slice (``map_{image,label,pred,maxprob}``, ``map_id``, ``map_slice``) and the mean logits per ground-truth class
    (``mean_logits``, ``K×K``); a NumPy ``.npz`` file."""
    arrays: dict[str, np.ndarray] = {}
    for method in methods:
        for key, values in results["methods"][method]["reliability"].items():
            arrays[f"reliability_{method}_{key}"] = np.asarray(values, dtype=np.float64)
    if map_rows:
        row = map_rows[0]
        arrays.update({f"map_{k}": np.asarray(row[k]) for k in ("image", "label", "pred", "maxprob")})
        arrays["map_id"], arrays["map_slice"] = np.asarray(str(row["id"])), np.asarray(int(row["slice"]))
    if results.get("logits"):
        arrays["mean_logits"] = np.asarray(results["logits"]["mean_logits"], dtype=np.float64)
    return write_with(lambda tmp: np.savez_compressed(open(tmp, "wb"), **arrays), path)


def _write_metrics_json(path: Path, results: dict, notes: list[str], extra: Mapping) -> Path:
    """``metrics.json``: what the training (or an earlier evaluation) wrote, updated with these results."""
    summary = {}
    if path.is_file():
        try:
            summary = json.loads(path.read_text())
        except json.JSONDecodeError:
            notes.append(f"{path} was not valid JSON and was replaced")
    summary.update(jsonable({k: v for k, v in results.items() if k not in ("per_volume", "reliability")}))
    summary.update(jsonable(dict(extra)))
    return write_json_atomic(path, summary)

