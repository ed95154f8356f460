"""Test-time evaluation of a trained network, as the paper does it, logged into the run that trained it.

``evaluate_trained`` (the end of ``make train``) and ``evaluate_run`` (``make evaluate RUN=…``, for a run already
trained) do the same:

1. **Post-hoc calibration** (paper §5.2.2): temperature scaling (TS) and local temperature scaling (LTS) fitted on
   2D slices of the validation volumes only (:mod:`pipeline.posthoc`); their state is saved in
   ``runs/<name>/posthoc/`` and as MLflow artifacts.
2. **One pass over the test volumes**: the network runs once per volume (MONAI ``SupervisedEvaluator``, slice by
   slice); the same logits are scored uncalibrated (``pre``), after TS and after LTS: DSC, ASD (pre and LTS, whose
   argmax can change; TS keeps the argmax, so its DSC/ASD are those of pre), the paper's foreground ECE/CECE, NLL,
   Brier, adaptive ECE, MONAI's ``CalibrationErrorMetric`` (a different quantity, logged under its own name),
   calibration against soft reference labels on datasets that carry them (``probs``), and logit statistics (paper
   Fig. 4). Confidence maps (PNG slices, NIfTI max-probability and entropy volumes) are written on the way.
3. **Robustness to noise** (paper §5.2.4): Gaussian noise of each σ on the test images, seeded; DSC and ECE per σ.
4. **Reports**: tables, reliability diagrams (pre/TS/LTS and per class), the logit and noise plots, a markdown
   summary, ``metrics.json``, ``per_volume.csv``; all of it into the same MLflow run (metrics with a new step on
   each re-evaluation, artifacts replaced).

What runs is set by the ``evaluation`` block of the config (``configs/base.yaml``); runs whose saved config predates
a setting get :data:`DEFAULT_SETTINGS`.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from pipeline.config import apply_overrides
from pipeline.posthoc import LTS_DEFAULTS, check_lts_settings, fit_calibrators
from pipeline.registry import check_name
from pipeline.tensors import class_indices, nanmean, one_hot, plain

# The defaults of the ``evaluation`` block (configs/base.yaml holds the same values; a test keeps them equal).
DEFAULT_SETTINGS: dict = {
    "posthoc": ["ts", "lts"],
    "fit_foreground_only": False,
    "max_val_slices": 256,
    "ts": {"max_iter": 50},
    "lts": copy.deepcopy(LTS_DEFAULTS),  # checked by pipeline.posthoc.check_lts_settings
    "noise": {"sigmas": [0.0, 0.01, 0.02, 0.03, 0.04, 0.05], "seed": 0},
    "maps": {"slices": 3, "volumes": 3},
    "logits": True,
    "monai_calibration_error": True,
}
POSTHOC_METHODS = ("ts", "lts")


# ----------------------------------------------------------------------------------------------------------------
# settings
def _merge(defaults: Mapping, given: Mapping, where: str) -> dict:
    out = copy.deepcopy(dict(defaults))
    for key, value in given.items():
        check_name(str(key), defaults.keys(), f"setting of {where}")
        if isinstance(defaults[key], Mapping):
            if not isinstance(value, Mapping):
                raise ValueError(f"{where}::{key} must be a mapping like {dict(defaults[key])}, got {value!r}")
            out[key] = _merge(defaults[key], value, f"{where}::{key}")
        else:
            out[key] = value
    return out


def evaluation_settings(block: Mapping | None) -> dict:
    """The ``evaluation`` block of a config completed with :data:`DEFAULT_SETTINGS` and checked.

    Raises:
        pipeline.registry.UnknownNameError: an unknown setting (with "did you mean …").
        ValueError: a value of the wrong kind (negative budget, unknown post-hoc method, negative sigma, …).
    """
    given = dict(block or {})
    lts = check_lts_settings(given.pop("lts", None))  # before the merge: it drops settings of older versions
    s = _merge(DEFAULT_SETTINGS, given, "evaluation")
    s["lts"] = lts
    posthoc = s["posthoc"] or []
    if isinstance(posthoc, str):
        posthoc = [posthoc]
    s["posthoc"] = [check_name(str(m), POSTHOC_METHODS, "post-hoc method") for m in posthoc]
    for key, value in (("max_val_slices", s["max_val_slices"]), ("ts::max_iter", s["ts"]["max_iter"]),
                       ("maps::slices", s["maps"]["slices"]),
                       ("maps::volumes", s["maps"]["volumes"])):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"evaluation::{key} must be a whole number >= 0, got {value!r}")
    sigmas = s["noise"]["sigmas"] or []
    if not isinstance(sigmas, (list, tuple)) or any(not isinstance(v, (int, float)) or v < 0 for v in sigmas):
        raise ValueError(f"evaluation::noise::sigmas must be a list of numbers >= 0, got {sigmas!r}")
    s["noise"]["sigmas"] = [float(v) for v in sigmas]
    return s


# ----------------------------------------------------------------------------------------------------------------
# the test pass
def _onehot(index: torch.Tensor, k: int) -> torch.Tensor:
    """``1×spatial`` (or ``spatial``) class indices → ``K×spatial`` float one-hot."""
    return one_hot(index.reshape(index.shape[-3:] if index.ndim > 3 else index.shape), k, dim=0)


class EvaluationOutputs:
    """Postprocessing of one volume's output into everything the test metrics read.

    From the logits under ``pred`` (``K×X×Y×Z``) it makes ``logits``, ``prob`` (softmax), ``pred`` (one-hot argmax,
    ties to the lowest class), ``label`` (one-hot, keeping the label's meta data for the voxel spacing),
    ``label_onehot`` (the same as a plain tensor), ``label_index`` (``1×X×Y×Z``), and for each calibrator ``prob_<name>`` (and ``pred_<name>`` when the
    calibrator can change the argmax). Soft reference labels under ``probs`` in the batch, when the dataset has
    them, are checked and passed on as ``soft``; other datasets simply have no ``soft``.

    Args:
        num_classes: ``K``.
        calibrators: ``{name: module with calibrate(logits, image, slice_axis)}`` (e.g. TS, LTS).
        slice_axis: the spatial axis the 2D calibrators slice along.
    """

    ARGMAX_PRESERVING = ("ts",)

    def __init__(self, num_classes: int, calibrators: Mapping[str, torch.nn.Module] | None = None,
                 slice_axis: int = 2) -> None:
        self.k = num_classes
        self.calibrators = dict(calibrators or {})
        self.slice_axis = slice_axis

    @torch.no_grad()
    def __call__(self, data: dict) -> dict:
        from monai.data import MetaTensor

        z = plain(data["pred"]).float()
        if z.shape[0] != self.k:
            raise ValueError(f"the network returned {z.shape[0]} channels, expected {self.k} (one per class)")
        label = data["label"]
        index = class_indices(plain(label).round(), self.k)
        out = dict(data)
        out["logits"] = z
        out["prob"] = torch.softmax(z, 0)
        out["pred"] = _onehot(z.max(0).indices, self.k)  # first maximum: ties to the lowest class
        onehot = _onehot(index, self.k).to(z.device)
        out["label_onehot"] = onehot  # plain tensor: cheaper for DSC than a MetaTensor
        out["label"] = MetaTensor(onehot, meta=label.meta) if hasattr(label, "meta") else onehot
        out["label_index"] = index.reshape(1, *z.shape[1:]).to(z.device)
        image = plain(data["image"]).float().to(z.device) if "image" in data else None
        for name, cal in self.calibrators.items():
            zc = cal.calibrate(z[None], None if image is None else image[None], self.slice_axis)[0]
            out[f"prob_{name}"] = torch.softmax(zc, 0)
            if name not in self.ARGMAX_PRESERVING:
                out[f"pred_{name}"] = _onehot(zc.max(0).indices, self.k)
        if data.get("probs") is not None:
            soft = plain(data["probs"]).float().to(z.device)
            if soft.shape != z.shape:
                raise ValueError(f"soft labels 'probs' of volume {data.get('id', '?')} have shape "
                                 f"{tuple(soft.shape)}, expected {tuple(z.shape)} (one channel per class)")
            out["soft"] = soft
        return out


def _keys(*keys: str, optional: Sequence[str] = ()) -> Callable:
    """``output_transform`` reading ``keys`` from each decollated item (``None`` for absent optional keys)."""

    def transform(output):
        items = output if isinstance(output, list) else [output]
        vals = [[item[k] for item in items] for k in keys]
        for k in optional:
            got = [item.get(k) for item in items]
            vals.append(None if all(g is None for g in got) else got)
        return tuple(vals)

    return transform


class ConfidenceMapWriter:
    """Ignite handler: for the first ``n_volumes`` test volumes, the max-probability and entropy volumes as NIfTI
    (with the image's affine), and for the first ``n_slices`` volumes the slice with the most ground-truth
    foreground, kept for the confidence-map figure.

    Args:
        folder: where the NIfTI files go (``<id>_maxprob.nii.gz``, ``<id>_entropy.nii.gz``).
        slice_axis: the axis the 2D slices are taken along.
    """

    def __init__(self, folder: Path, slice_axis: int = 2, n_volumes: int = 3, n_slices: int = 3) -> None:
        self.folder, self.axis = Path(folder), slice_axis
        self.n_volumes, self.n_slices = n_volumes, n_slices
        self.rows: list[dict] = []
        self.files: list[Path] = []
        self.count = 0
        self.notes: list[str] = []

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine) -> None:
        from pipeline.io import write_nifti

        batch = engine.state.batch if isinstance(engine.state.batch, list) else [engine.state.batch]
        for item, out in zip(batch, engine.state.output):
            if self.count >= max(self.n_volumes, self.n_slices):
                return
            vid = str(item.get("id", f"volume{self.count:03d}")) if isinstance(item, dict) else f"volume{self.count:03d}"
            prob = out["prob"]
            maxprob = prob.max(0).values.cpu()
            if self.count < self.n_volumes:
                image = out.get("image")
                affine = getattr(image, "affine", None)
                if affine is None:
                    affine = np.eye(4)
                    self.notes.append(f"{vid}: the image carries no affine; maps written with the identity")
                entropy = -(prob * prob.clamp_min(1e-12).log()).sum(0).cpu()
                for name, vol in (("maxprob", maxprob), ("entropy", entropy)):
                    self.files.append(write_nifti(vol.numpy(), plain(affine).cpu().numpy(),
                                                  self.folder / f"{vid}_{name}.nii.gz"))
            if self.count < self.n_slices:
                label = out["label_index"][0].cpu()
                fg = (label != 0).sum(dim=[d for d in range(3) if d != self.axis])
                s = int(fg.argmax())
                image = plain(out["image"])[0].cpu() if "image" in out else torch.zeros_like(label, dtype=torch.float)
                self.rows.append({
                    "id": vid, "slice": s,
                    "image": image.select(self.axis, s).numpy(),
                    "label": label.select(self.axis, s).numpy(),
                    "pred": out["pred"].max(0).indices.cpu().select(self.axis, s).numpy(),
                    "maxprob": maxprob.select(self.axis, s).numpy(),
                })
            self.count += 1


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
    prefix: str = "test/",
    amp: bool = False,
    sw_batch_size: int = 32,
    regions: Sequence[Sequence[int]] | None = None,
):
    """A MONAI ``SupervisedEvaluator`` that scores the network's outputs before and after each calibrator.

    ``regions`` (sets of training classes, the dataset's ``eval_regions``) makes DSC and ASD per region.

    Metrics (names under ``prefix``; for calibrator ``c`` under ``<prefix><c>/``): ``dsc``, ``asd`` (pre and
    argmax-changing calibrators), ``ece``, ``cece``, ``nll``, ``brier``, ``ece_pooled``, ``cece_pooled``, ``aece``,
    ``soft/brier``, ``soft/kl``, ``soft/ece`` (with soft labels); for pre also ``monai_calibration_error`` and
    ``logits/distance_mean``, ``logits/distance_max``. Details per volume in ``engine.state.metric_details``.
    """
    from monai.engines import SupervisedEvaluator
    from monai.handlers import CalibrationError, from_engine

    from pipeline.analysis import LogitStatistics, VolumeExtras
    from pipeline.engines import SliceBatchInferer
    from pipeline.metrics.calibration import CalibrationMetrics
    from pipeline.metrics.segmentation import asd_handler, dice_handler

    calibrators = dict(calibrators or {})
    metrics: dict = {}
    for method in ["pre", *calibrators]:
        p = prefix if method == "pre" else f"{prefix}{method}/"
        prob = "prob" if method == "pre" else f"prob_{method}"
        pred = "pred" if method == "pre" else f"pred_{method}"
        if method == "pre" or method not in EvaluationOutputs.ARGMAX_PRESERVING:
            metrics[f"{p}dsc"] = dice_handler(from_engine([pred, "label_onehot"]), regions=regions)
            metrics[f"{p}asd"] = asd_handler(from_engine([pred, "label"]), regions=regions)
        metrics[f"{p}calibration"] = CalibrationMetrics(n_bins=n_bins, prefix=p,
                                                        output_transform=from_engine([prob, "label_index"]))
        metrics[f"{p}extras"] = VolumeExtras(n_bins=n_bins, prefix=p,
                                             output_transform=_keys(prob, "label_index", optional=["soft"]))
    if monai_calibration_error:
        metrics[f"{prefix}monai_calibration_error"] = CalibrationError(
            num_bins=n_bins, include_background=False, calibration_reduction="expected", metric_reduction="mean",
            output_transform=from_engine(["prob", "label_onehot"]), save_details=False)
    if logits:
        metrics[f"{prefix}logit_statistics"] = LogitStatistics(num_classes, prefix=prefix,
                                                               output_transform=from_engine(["logits", "label_index"]))
    key = f"{prefix}dsc"
    return SupervisedEvaluator(
        device=device,
        val_data_loader=loader,
        network=network,
        inferer=SliceBatchInferer(spatial_dim=slice_axis, sw_batch_size=sw_batch_size),
        postprocessing=EvaluationOutputs(num_classes, calibrators, slice_axis),
        key_val_metric={key: metrics.pop(key)},
        additional_metrics=metrics,
        amp=amp,
    )


def run_engine(engine) -> None:
    """``engine.run()``, with a ``ValueError`` raised inside a MONAI transform re-raised as itself (MONAI wraps it in
    a ``RuntimeError`` "applying transform …" that hides the message naming the bad value)."""
    try:
        engine.run()
    except RuntimeError as e:
        cause = e
        while cause.__cause__ is not None and isinstance(cause, RuntimeError) and "applying transform" in str(cause):
            cause = cause.__cause__
        if isinstance(cause, ValueError):
            raise cause from None
        raise


# ----------------------------------------------------------------------------------------------------------------
# results
def _as_array(details) -> np.ndarray:
    if isinstance(details, torch.Tensor):
        return details.detach().cpu().float().numpy()
    return np.asarray(details, dtype=float)


def _method_results(state, class_names: Sequence[str], p: str, seg_p: str,
                    region_names: Sequence[str] | None = None) -> dict:
    details, m = state.metric_details, state.metrics
    dsc = _as_array(details[f"{seg_p}dsc"])
    asd = _as_array(details[f"{seg_p}asd"])
    cal = details[f"{p}calibration"]
    vols = cal["volumes"]
    ece_pc = np.array([v["ece_per_class"] for v in vols], dtype=float)
    sce_pc = np.array([v["sce_per_class"] for v in vols], dtype=float)
    fg = list(class_names[1:])
    seg = list(region_names) if region_names else fg  # DSC/ASD columns: evaluation regions, else the classes
    per_class = {class_names[0]: {"dsc": math.nan, "asd": math.nan, "ece": math.nan, "sce": nanmean(sce_pc[:, 0])}}
    for j, name in enumerate(fg):
        per_class[name] = {"dsc": math.nan, "asd": math.nan, "ece": nanmean(ece_pc[:, j + 1]),
                           "sce": nanmean(sce_pc[:, j + 1])}
    for j, name in enumerate(seg):
        per_class.setdefault(name, {"ece": math.nan, "sce": math.nan})
        per_class[name].update(dsc=nanmean(dsc[:, j]), asd=nanmean(asd[:, j]))
    mean = {
        "dsc": nanmean([per_class[n]["dsc"] for n in seg]),
        "asd": nanmean([per_class[n]["asd"] for n in seg]),
        **{k: float(m[f"{p}{k}"]) for k in ("ece", "cece", "nll", "brier", "ece_pooled", "cece_pooled")},
    }
    for k in ("aece", "soft/brier", "soft/kl", "soft/ece"):
        if f"{p}{k}" in m:
            mean[k] = float(m[f"{p}{k}"])
    return {"per_class": per_class, "mean": mean, "dsc": dsc, "asd": asd, "ece_pc": ece_pc, "sce_pc": sce_pc,
            "volumes": vols, "extras": details.get(f"{p}extras", []), "stats": cal["pooled"],
            "reliability": cal["pooled"].reliability(), "skipped": int(m.get(f"{p}skipped", 0))}


def summarise(evaluator, class_names: Sequence[str], volume_ids: Sequence[str], prefix: str = "test/",
              methods: Sequence[str] = ("pre",), region_names: Sequence[str] | None = None) -> dict:
    """Turn a test evaluator's metrics and details into the results dict used by reports and MLflow.

    Per foreground class: mean over volumes of DSC, ASD, per-class ECE and SCE (``nan`` entries skipped). The
    ``mean`` entry: DSC and ASD averaged over foreground classes, and ECE, CECE, NLL, Brier, aECE as the mean over
    volumes (the paper's protocol), with the pooled ECE/CECE beside them. The top-level ``per_class``, ``mean`` and
    ``reliability`` are those of the uncalibrated network; ``methods`` holds the same for each method. With
    ``region_names`` (the dataset's evaluation regions, e.g. BraTS ET/TC/WT), DSC and ASD are per region (entries of
    their own in ``per_class``, listed in ``region_names``) and their means are over the regions.
    """
    state = evaluator.state
    out: dict = {}
    for method in methods:
        p = prefix if method == "pre" else f"{prefix}{method}/"
        seg_p = p if f"{p}dsc" in state.metric_details else prefix  # TS keeps the argmax: the DSC/ASD of pre
        out[method] = _method_results(state, class_names, p, seg_p, region_names)
    m = state.metrics
    pre = out["pre"]
    if f"{prefix}monai_calibration_error" in m:
        pre["mean"]["monai_calibration_error"] = float(m[f"{prefix}monai_calibration_error"])
    seg = list(region_names) if region_names else list(class_names[1:])
    rows = []
    for i, vid in enumerate(volume_ids):
        row = {"id": vid}
        row.update({f"dsc_{n}": float(pre["dsc"][i, j]) for j, n in enumerate(seg)})
        row.update({f"asd_{n}": float(pre["asd"][i, j]) for j, n in enumerate(seg)})
        row.update({k: pre["volumes"][i][k] for k in ("ece", "cece", "nll", "brier", "n_kept")})
        row.update({f"ece_{n}": float(pre["ece_pc"][i, j]) for j, n in enumerate(class_names)})
        row.update({f"sce_{n}": float(pre["sce_pc"][i, j]) for j, n in enumerate(class_names)})
        if pre["extras"]:
            row.update({k.replace("/", "_"): v for k, v in pre["extras"][i].items()})
        for method in methods[1:]:
            r = out[method]
            if method not in EvaluationOutputs.ARGMAX_PRESERVING:
                row[f"{method}_dsc"] = nanmean(r["dsc"][i])
                row[f"{method}_asd"] = nanmean(r["asd"][i])
            row.update({f"{method}_{k}": r["volumes"][i][k] for k in ("ece", "cece", "nll", "brier")})
            if r["extras"]:
                row.update({f"{method}_{k.replace('/', '_')}": v for k, v in r["extras"][i].items()})
        rows.append(row)

    notes = []
    n_asd_nan = int(np.isnan(pre["asd"]).sum())
    if n_asd_nan:
        notes.append(f"{n_asd_nan} (volume, class) ASD values undefined (one mask empty) and skipped")
    if pre["skipped"]:
        notes.append(f"{pre['skipped']} volume(s) without ground-truth foreground: no calibration value, skipped")
    results = {
        "class_names": list(class_names),
        "region_names": list(region_names or []),
        "n_volumes": len(volume_ids),
        "per_class": pre["per_class"],
        "mean": pre["mean"],
        "per_volume": rows,
        "reliability": pre["reliability"],
        "notes": notes,
        "methods": {k: {"per_class": v["per_class"], "mean": v["mean"], "stats": v["stats"],
                        "reliability": v["reliability"]} for k, v in out.items()},
    }
    if f"{prefix}logit_statistics" in state.metric_details:
        results["logits"] = state.metric_details[f"{prefix}logit_statistics"]
    return results


def _sigma_name(sigma: float) -> str:
    return f"{sigma:g}"


def mlflow_metrics(results: dict, prefix: str = "test/") -> dict[str, float]:
    """Flat MLflow metric names.

    ``test/dsc``, ``test/ece``, … and per class ``test/dsc/GM``, ``test/sce/CSF``; per post-hoc method
    ``test/ts/ece``, ``test/lts/dsc``, ``test/lts/ece/GM``; ``test/aece``, ``test/soft/ece``,
    ``test/monai_calibration_error``, ``test/logits/distance_mean``; per noise level ``test/noise_0.02/dsc``.
    """
    out: dict[str, float] = {}
    methods = results.get("methods") or {"pre": {"mean": results["mean"], "per_class": results["per_class"]}}
    for method, r in methods.items():
        p = prefix if method == "pre" else f"{prefix}{method}/"
        out.update({f"{p}{k}": v for k, v in r["mean"].items()})
        for name, vals in r["per_class"].items():
            for k, v in vals.items():
                if method == "pre" or method not in EvaluationOutputs.ARGMAX_PRESERVING or k not in ("dsc", "asd"):
                    out[f"{p}{k}/{name}"] = v
    if results.get("logits"):
        out[f"{prefix}logits/distance_mean"] = results["logits"]["distance_mean"]
        out[f"{prefix}logits/distance_max"] = results["logits"]["distance_max"]
    for row in results.get("noise") or []:
        for k in ("dsc", "ece", "cece"):
            out[f"{prefix}noise_{_sigma_name(row['sigma'])}/{k}"] = row[k]
    return {k: float(v) for k, v in out.items() if v is not None and math.isfinite(float(v))}


def _jsonable(obj):
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items() if k not in ("stats", "reliability", "per_volume")}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        return None if not math.isfinite(float(obj)) else float(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


# ----------------------------------------------------------------------------------------------------------------
# the whole evaluation of a trained network
def evaluate_trained(
    parser,
    network: torch.nn.Module,
    data: dict,
    run_dir: str | Path,
    tracker=None,
    *,
    step: int = 0,
    checkpoint: str | Path | None = None,
    extra_summary: Mapping | None = None,
    settings: Mapping | None = None,
    quiet: bool = False,
) -> dict:
    """Evaluate a trained ``network`` on the test volumes of ``data`` and write every report into ``run_dir`` (and
    into the MLflow run of ``tracker`` when given, metrics at ``step``).

    Args:
        parser: the run's ``ConfigParser`` (dataset, ``n_bins``, ``seed``, ``device``, ``amp``, ``evaluation``).
        network: the network with its trained weights loaded.
        data: ``pipeline.train.prepare_data(parser)``; ``val`` volumes are needed for post-hoc calibration.
        run_dir: the run folder.
        tracker: a ``pipeline.tracking.RunTracker`` (or ``None``: files only).
        step: the MLflow step of the test metrics (0 at training, then one more per re-evaluation).
        checkpoint: the weights' file, for the reports.
        extra_summary: entries added to ``metrics.json`` (e.g. the training's best validation DSC).
        settings: the ``evaluation`` settings (default: from ``parser``, completed with :data:`DEFAULT_SETTINGS`).

    Returns:
        ``{"results", "table", "posthoc_table", "noise_table", "files", "posthoc", "timings", "plot"}``.

    Raises:
        ValueError: no test volume.
    """
    from pipeline import report
    from pipeline.analysis import noise_sweep
    from pipeline.data.loading import volume_loader
    from pipeline.io import write_json_atomic, write_text_atomic

    def say(msg: str) -> None:
        if not quiet:
            print(msg, flush=True)

    run_dir = Path(run_dir)
    if settings is None:
        block = parser.get("evaluation") if "evaluation" in parser.get() else None
        settings = evaluation_settings(block)
    else:
        settings = evaluation_settings(settings)
    dataset = data["dataset"]
    class_names = list(dataset["class_names"])
    k = len(class_names)
    slice_axis = int(dataset["slice_axis"])
    in_channels = int(dataset.get("in_channels", 1))
    regions = dict(dataset.get("eval_regions") or {})  # e.g. BraTS: DSC/ASD on ET/TC/WT
    device = parser.get_parsed_content("device")
    n_bins = int(parser.get_parsed_content("n_bins"))
    seed = int(parser.get_parsed_content("seed"))
    amp = bool(parser.get_parsed_content("amp")) and torch.device(device).type == "cuda"
    names = {key: parser.get(f"{key}_name", "?") for key in ("dataset", "loss", "backbone")}
    label = f"{names['loss']} · {names['backbone']} · {names['dataset']}"
    if "test" not in data["volumes"]:
        raise ValueError(f"the '{names['dataset']}' dataset has no test volume to evaluate")
    network.eval()
    timings: dict[str, float] = {}
    notes: list[str] = []

    # 1. post-hoc calibration on the validation volumes
    t0 = time.time()
    calibrators, posthoc = {}, {}
    if settings["posthoc"]:
        if "val" not in data["volumes"]:
            notes.append("no validation volume: post-hoc calibration skipped")
        else:
            say(f"fitting post-hoc calibration ({', '.join(settings['posthoc'])}) on the validation slices ...")
            calibrators, posthoc = fit_calibrators(network, data["volumes"]["val"], settings, k, in_channels,
                                                   slice_axis, device, seed, run_dir / "posthoc", say)
    timings["posthoc_fit_s"] = time.time() - t0

    # 2. one pass over the test volumes
    t0 = time.time()
    test_ids = [c["id"] for c in data["cases"]["test"]]
    evaluator = create_test_evaluator(network, volume_loader(data["volumes"]["test"]), device, k, slice_axis, n_bins,
                                      calibrators, logits=bool(settings["logits"]),
                                      monai_calibration_error=bool(settings["monai_calibration_error"]), amp=amp,
                                      regions=list(regions.values()) or None)
    maps = ConfidenceMapWriter(run_dir / "maps", slice_axis, settings["maps"]["volumes"], settings["maps"]["slices"])
    maps.attach(evaluator)
    say(f"evaluating {len(test_ids)} test volumes ...")
    run_engine(evaluator)
    methods = ["pre", *calibrators]
    results = summarise(evaluator, class_names, test_ids, methods=methods, region_names=list(regions))
    results["notes"] = notes + results["notes"] + maps.notes
    results["distance_unit"] = str(dataset.get("distance_unit", "mm"))  # of ASD: px where images carry no spacing
    timings["test_s"] = time.time() - t0

    # 3. noise
    t0 = time.time()
    if settings["noise"]["sigmas"]:
        say(f"noise sweep (σ = {', '.join(f'{s:g}' for s in settings['noise']['sigmas'])}) ...")
        results["noise"] = noise_sweep(network, volume_loader(data["volumes"]["test"]), device, k, slice_axis,
                                       settings["noise"]["sigmas"], int(settings["noise"]["seed"]), n_bins, amp,
                                       regions=list(regions.values()) or None)
    timings["noise_s"] = time.time() - t0

    # 4. reports
    t0 = time.time()
    files: list[Path] = []
    n = results["n_volumes"]
    plot = report.reliability_diagram(results["reliability"], run_dir / "reliability.png",
                                      f"{label}: foreground voxels, {n} test volumes (pooled)",
                                      results["mean"]["ece_pooled"])
    files.append(plot)
    for method in methods[1:]:
        r = results["methods"][method]
        files.append(report.reliability_diagram(
            r["reliability"], run_dir / f"reliability_{method}.png",
            f"{label} · {report.METHOD_LABELS[method]}: foreground voxels, {n} test volumes (pooled)",
            r["mean"]["ece_pooled"]))
    files.append(report.reliability_per_class(
        {report.METHOD_LABELS[m]: results["methods"][m]["stats"] for m in methods}, class_names,
        run_dir / "reliability_per_class.png", f"{label}: per ground-truth class, {n} test volumes"))
    if maps.rows:
        files.append(report.confidence_maps(maps.rows, class_names, run_dir / "confidence_maps.png",
                                            f"{label}: test slices"))
    if results.get("logits"):
        files.append(report.logit_plot(results["logits"]["mean_logits"], class_names, run_dir / "logits.png",
                                       f"{label}: mean logits per ground-truth class (test volumes)"))
    if results.get("noise"):
        files.append(report.noise_plot(results["noise"], run_dir / "noise.png",
                                       f"{label}: Gaussian noise on the test images"))
    report.write_per_volume_csv(run_dir / "per_volume.csv", results["per_volume"])
    table = report.results_table(results)
    ptable = report.posthoc_table(results) if calibrators else ""
    ntable = report.noise_table(results["noise"]) if results.get("noise") else ""
    write_text_atomic(run_dir / "results.txt", "\n\n".join(t for t in (table, ptable, ntable) if t) + "\n")
    timings["reports_s"] = time.time() - t0

    metrics_path = run_dir / "metrics.json"
    summary = {}
    if metrics_path.is_file():  # keep what the training (or an earlier evaluation) wrote
        try:
            summary = json.loads(metrics_path.read_text())
        except json.JSONDecodeError:
            notes.append(f"{metrics_path} was not valid JSON and was replaced")
    summary.update(_jsonable({k: v for k, v in results.items() if k not in ("per_volume", "reliability")}))
    summary.update(_jsonable({"posthoc": posthoc, "evaluation_settings": settings, "evaluation_step": step,
                              "checkpoint": checkpoint, "test_seconds": timings["test_s"],
                              "evaluation_seconds": timings, **(extra_summary or {})}))
    if tracker is not None:
        summary["run_id"] = tracker.run_id
    write_json_atomic(metrics_path, summary)

    info = {"run_name": run_dir.name, "run_id": getattr(tracker, "run_id", None), **names, "checkpoint": checkpoint,
            "posthoc": posthoc, "timings": timings, "n_bins": n_bins}
    md = write_text_atomic(run_dir / "summary.md", report.summary_markdown(
        info, results, [f.name for f in files] + [f"maps/{f.name}" for f in maps.files]))

    if tracker is not None:
        metrics = mlflow_metrics(results)
        for name, d in posthoc.items():
            metrics.update({f"posthoc/{name}/{key}": d[key] for key in
                            ("temperature", "val_nll_before", "val_nll_after", "val_ece_before", "val_ece_after",
                             "best_iteration") if key in d})
        metrics.update({f"time/{key}": v for key, v in timings.items()})
        tracker.log_metrics(metrics, step=step)
        for f in [*files, run_dir / "per_volume.csv", run_dir / "results.txt", metrics_path, md]:
            tracker.log_artifact(f)
        for f in maps.files:
            tracker.log_artifact(f, "maps")
        for name, d in posthoc.items():
            if "file" in d:
                tracker.log_artifact(d["file"], "posthoc")
    return {"results": results, "table": table, "posthoc_table": ptable, "noise_table": ntable, "files": files,
            "maps": maps.files, "posthoc": posthoc, "timings": timings, "plot": plot, "summary": md,
            "calibrators": calibrators, "settings": settings}


# ----------------------------------------------------------------------------------------------------------------
# make evaluate RUN=…
def evaluate_run(run: str, overrides: Mapping | None = None, quiet: bool = False,
                 runs_root: str | Path | None = None) -> dict:
    """``make evaluate RUN=…``: rebuild a trained run's network and data from its saved config, load its best
    weights, evaluate on the test volumes and log everything into the same MLflow run.

    Args:
        run: an MLflow run id (or run name), a run folder ``runs/<name>``, or a checkpoint file (its run folder is
            the folder above ``checkpoints/``). A run folder that no MLflow run records gets a new MLflow run.
        overrides: config overrides (``{"evaluation::noise::sigmas": []}``); ``evaluation`` settings missing from an
            older run's config take their defaults.
        runs_root: where a run folder that is gone is restored from MLflow (default: ``runs/`` of the repository).

    Returns:
        what :func:`evaluate_trained` returns, plus ``run_id``, ``run_dir``, ``checkpoint``, ``how``, ``step``.
    """
    import mlflow
    from monai.bundle import ConfigParser
    from monai.utils import set_determinism

    from pipeline.data.prepare import prepare_data
    from pipeline.runs import load_weights, next_step, resolve_run
    from pipeline.tracking import RunTracker, tracking_uri

    uri = tracking_uri()
    found = resolve_run(run, uri, Path(runs_root) if runs_root else None)
    run_dir, checkpoint = Path(found["run_dir"]), Path(found["checkpoint"])
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise FileNotFoundError(f"no config.yaml in the run folder {run_dir}: cannot rebuild the network and data")
    parser = ConfigParser()
    parser.read_config(str(config))
    if "evaluation" not in parser.get():
        parser["evaluation"] = copy.deepcopy(DEFAULT_SETTINGS)
    else:
        parser["evaluation"] = evaluation_settings(parser["evaluation"])
    if (run_dir / "splits.json").is_file():
        parser["split_file"] = str(run_dir / "splits.json")  # exactly the run's split
    apply_overrides(parser, overrides, "the run's config")
    settings = evaluation_settings(parser["evaluation"])
    set_determinism(seed=int(parser.get_parsed_content("seed")))

    data = prepare_data(parser)
    network = parser.get_parsed_content("network")
    load_weights(network, checkpoint)

    if found["run_id"] is not None:
        tracker = RunTracker.resume(found["run_id"], uri)
        created = False
    else:
        names = {k: parser.get(f"{k}_name", "?") for k in ("dataset", "loss", "backbone")}
        tracker = RunTracker(parser.get("experiment_name", "mbls"), f"{run_dir.name}-eval",
                             tags={**names, "evaluated_checkpoint": str(checkpoint)})
        tracker.log_params({**names, "run_dir": str(run_dir), "checkpoint": str(checkpoint)})
        tracker.log_artifact(config)
        found["how"] += f"; created MLflow run {tracker.run_id} ({run_dir.name}-eval)"
        created = True
    client = mlflow.MlflowClient(tracking_uri=uri)
    step = next_step(client, tracker.run_id)
    if not quiet:
        print(found["how"], flush=True)
        print(f"weights: {checkpoint}", flush=True)
    out = evaluate_trained(parser, network, data, run_dir, tracker, step=step, checkpoint=checkpoint,
                           settings=settings, quiet=quiet)
    tracker.set_tags({"evaluated_checkpoint": str(checkpoint), "evaluation_step": step,
                      "evaluated_at": time.strftime("%Y-%m-%d %H:%M:%S")})
    if created:
        tracker.finish()
    out.update(run_id=tracker.run_id, run_dir=run_dir, checkpoint=checkpoint, how=found["how"], step=step,
               created_run=created)
    return out
