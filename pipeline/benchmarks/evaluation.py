"""Benchmark of the test evaluation: the cost of evaluating one test volume against the cost of running the network
over it, and the cost of the extra analyses (post-hoc fitting, noise sweep, reports).

``make bench-evaluation [RUN=<MLflow run id, run folder or checkpoint>]`` runs
``python -m pipeline.benchmarks.evaluation [--run RUN]``. Without a run it uses the default configuration (mni, ce,
unet) with freshly initialised weights, which predict noisier masks than a trained network (more surface for ASD).

Target: evaluating one test volume of the default dataset (network + every default metric, pre/TS/LTS) costs no
more than 2× the network alone. Times are medians over ``--repeats`` runs after one warm-up run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from monai.bundle import ConfigParser
from monai.engines import SupervisedEvaluator
from monai.metrics import CalibrationErrorMetric, DiceMetric
from monai.transforms import Decollated

from pipeline.config import load_config
from pipeline.data.loading import volume_loader
from pipeline.data.prepare import prepare_data
from pipeline.engines import EvaluationOutputs, SliceBatchInferer, run_engine
from pipeline.evaluation import create_test_evaluator, evaluate_trained, evaluation_settings
from pipeline.evaluation.noise import noise_sweep
from pipeline.metrics.calibration import calibration_statistics
from pipeline.metrics.extras import adaptive_ece, soft_label_calibration
from pipeline.metrics.logits import logit_sums
from pipeline.metrics.segmentation import average_surface_distance, spacing_of
from pipeline.posthoc import LocalTemperatureScaling, ReferenceTemperatureNet, TemperatureScaling, fit_calibrators
from pipeline.runs import load_weights, resolve_run
from pipeline.tensors import plain


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _setup(run: str | None):
    if run:
        found = resolve_run(run)
        parser = ConfigParser()
        parser.read_config(str(Path(found["run_dir"]) / "config.yaml"))
        if (Path(found["run_dir"]) / "splits.json").is_file():
            parser["split_file"] = str(Path(found["run_dir"]) / "splits.json")
        network = parser.get_parsed_content("network")
        load_weights(network, found["checkpoint"])
        what = f"trained weights {found['checkpoint']}"
    else:
        torch.manual_seed(0)
        parser = load_config("mni", "ce", "unet")
        network = parser.get_parsed_content("network")
        what = "freshly initialised weights (pass RUN=… for a trained network)"
    return parser, network.eval(), what


def _breakdown(network, volumes, inferer, k: int, axis: int, n_bins: int, calibrators: dict, repeats: int) -> dict:
    """Median time (s) of each step of the evaluation of one volume, run alone."""
    loader = volume_loader(volumes)
    out: dict[str, float] = {}
    out["load and collate the volume"] = _median_time(lambda: next(iter(loader)), repeats)
    batch = next(iter(loader))
    with torch.no_grad():
        z = inferer(batch["image"], network)
    dec = Decollated(keys=None, detach=True)
    item = {"image": batch["image"], "label": batch["label"], "pred": z}
    out["decollate batch and output"] = _median_time(lambda: (dec(dict(batch)), dec(dict(item))), repeats)
    merged = {**dec(dict(batch))[0], **dec(dict(item))[0]}
    post = EvaluationOutputs(k, {}, axis)
    out["postprocessing (softmax, one-hot)"] = _median_time(lambda: post(dict(merged)), repeats)
    o = post(dict(merged))
    y = o["label_index"]
    spacing = spacing_of(o["label"], o["label"].ndim - 1)
    dice = DiceMetric(include_background=False, reduction="mean", ignore_empty=False)
    monai_ce = CalibrationErrorMetric(n_bins, include_background=False)
    steps = {
        "DSC (MONAI DiceMetric)": lambda: dice(y_pred=[o["pred"]], y=[o["label_onehot"]]),
        "ASD (all classes)": lambda: average_surface_distance(o["pred"][None], o["label_onehot"][None], spacing),
        "ECE/CECE/NLL/Brier (calibration_statistics)": lambda: calibration_statistics(o["prob"], y, n_bins),
        "adaptive ECE": lambda: adaptive_ece(o["prob"], y, n_bins),
        "MONAI CalibrationErrorMetric": lambda: monai_ce(y_pred=[o["prob"]], y=[o["label_onehot"]]),
        "logit statistics": lambda: logit_sums(o["logits"], y),
    }
    if "soft" in o:
        steps["soft-label Brier/KL/ECE"] = lambda: soft_label_calibration(o["prob"], o["soft"], y, n_bins)
    for name, fn in steps.items():
        out[name] = _median_time(fn, repeats)
    image = plain(o["image"])[None]
    for name, cal in calibrators.items():
        with torch.no_grad():
            out[f"{name.upper()} applied to the logits"] = _median_time(
                lambda cal=cal: cal.calibrate(o["logits"][None], image, axis), repeats)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.benchmarks.evaluation", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default=None, help="MLflow run id, run folder or checkpoint (default: untrained)")
    ap.add_argument("--repeats", type=int, default=7, help="timed repetitions (default 7)")
    ap.add_argument("--no-analyses", action="store_true", help="skip timing the post-hoc fitting, noise, reports")
    args = ap.parse_args(argv)

    parser, network, what = _setup(args.run)
    data = prepare_data(parser)
    dataset = data.dataset
    k, axis = len(data.class_names), data.slice_axis
    n_bins = int(parser.get_parsed_content("n_bins"))
    device = parser.get_parsed_content("device")
    network.to(device)
    test = data.volumes["test"]
    one = [test[0]]
    image = one[0]["image"][None].to(device)
    inferer = SliceBatchInferer(spatial_dim=axis)

    def network_only():
        with torch.no_grad():
            out = inferer(image, network)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    def engine_time(make_engine):
        """Seconds of running the engine that ``make_engine()`` builds (its construction not counted)."""
        def fn():
            ev = make_engine()
            t0 = time.perf_counter()
            run_engine(ev)
            return time.perf_counter() - t0

        return fn

    def evaluate(calibrators):
        return engine_time(lambda: create_test_evaluator(network, volume_loader(one), device, k, axis, n_bins,
                                                         calibrators))

    def bare_evaluator():  # the engine alone: load, infer, decollate; no post-processing, no metric
        return SupervisedEvaluator(device=device, val_data_loader=volume_loader(one), network=network,
                                   inferer=inferer)

    def median_run(fn) -> float:
        fn()
        return statistics.median(fn() for _ in range(args.repeats))

    ts = TemperatureScaling(network, 1.1).to(device).eval()
    tnet = ReferenceTemperatureNet(k, int(dataset.get("in_channels", 1)))
    lts = LocalTemperatureScaling(network, tnet).to(device).eval()
    t_net = _median_time(network_only, args.repeats)
    t_bare = median_run(engine_time(bare_evaluator))
    t_pre = median_run(evaluate({}))
    t_all = median_run(evaluate({"ts": ts, "lts": lts}))
    shape = "×".join(str(s) for s in one[0]["image"].shape[1:])
    print(f"evaluation benchmark: dataset {parser['dataset_name']}, backbone {parser['backbone_name']}, {what}")
    print(f"device {device}, torch threads {torch.get_num_threads()}, one test volume {one[0].get('id', '?')} "
          f"({shape} voxels), median of {args.repeats} runs")
    print(f"  network over the volume (slice by slice)           {1000 * t_net:8.1f} ms")
    for name, t in (("MONAI evaluator alone (no post-processing, metric)", t_bare),
                    ("evaluation of the volume, pre only", t_pre),
                    ("evaluation of the volume, pre + TS + LTS (default)", t_all)):
        print(f"  {name:<50} {1000 * t:8.1f} ms  ({t / t_net:.2f}× network)")
    ok = t_all <= 2 * t_net
    print(f"  target: evaluation ≤ 2× network: {'met' if ok else 'NOT met'}")
    print("  where the time goes (each step alone on the same volume, median):")
    for name, ms in _breakdown(network, one, inferer, k, axis, n_bins, {"ts": ts, "lts": lts}, args.repeats).items():
        print(f"    {name:<44} {1000 * ms:6.2f} ms")

    if not args.no_analyses:
        settings = evaluation_settings(parser.get("evaluation") if "evaluation" in parser.get() else None)
        print(f"extra analyses on all {len(test)} test / {len(data.volumes.get('val', []))} validation volumes, "
              "default settings (one run each):")
        t0 = time.perf_counter()
        _, info = fit_calibrators(network, data.volumes["val"], settings, k, int(dataset.get("in_channels", 1)),
                                  axis, device, say=lambda _: None)
        t_fit = time.perf_counter() - t0
        for name, d in info.items():
            print(f"  fit {name.upper():<4} {d['seconds']:6.2f} s")
        t0 = time.perf_counter()
        noise_sweep(network, volume_loader(test), device, k, axis, settings["noise"]["sigmas"],
                    int(settings["noise"]["seed"]), n_bins)
        print(f"  noise sweep ({len(settings['noise']['sigmas'])} σ)  {time.perf_counter() - t0:6.2f} s")
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            out = evaluate_trained(parser, network, data, Path(tmp), None, settings=settings, quiet=True)
            total = time.perf_counter() - t0
        tm = out["timings"]
        print(f"  whole evaluation  {total:6.2f} s  (post-hoc fit {tm['posthoc_fit_s']:.2f}, test pass "
              f"{tm['test_s']:.2f}, noise {tm['noise_s']:.2f}, reports {tm['reports_s']:.2f}); fit alone above: "
              f"{t_fit:.2f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
