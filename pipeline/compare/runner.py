"""``make compare``: train a comparison grid (resumable, shardable, several runs at once), then write its report.

1. The grid (:mod:`pipeline.compare.grid`) expands into runs, each keyed by its resolved config, seed and data.
2. One MLflow parent run stands for the comparison (dataset, grid, epochs); every training is a child run of it.
3. This shard's runs (``SHARD=i/n``) that have no finished child are trained (a finished run of the same key made
   for another comparison of the experiment — same resolved config, seed and data — is reused, not retrained),
   ``JOBS`` at a time (one GPU each where there are GPUs, the CPU threads divided otherwise); a failed run is recorded
   and the others go on; a run left RUNNING by a dead process is marked KILLED and trained again.
4. The report is built from whatever the store holds for the grid (all shards): ``reports/<dataset>/<grid>/``, and
   logged to the parent run.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import mlflow
import torch
from mlflow.entities import Metric, RunTag

from pipeline.compare.collect import (
    child_runs,
    collect,
    find_or_create_parent,
    finished_elsewhere,
    is_stale,
    with_reused,
)
from pipeline.compare.grid import RunSpec, expand, load_grid, parse_shard, resolved_config, run_key, shard
from pipeline.compare.report import write_report
from pipeline.compare.statistics import resolve_margins
from pipeline.config import REPO_ROOT, quiet_warnings
from pipeline.data.prepare import data_fingerprint
from pipeline.io import building_folder
from pipeline.tracking import ensure_experiment, source_tags, tracking_uri
from pipeline.training import run_training

EXPERIMENT = "compare"
NOTE_LIMIT = 7900


def comparison_id(dataset: str, grid: dict, epochs: int | None) -> str:
    """``<dataset>/<grid>`` (``/epochs=<n>`` when the grid's epochs are overridden): one parent run each."""
    return f"{dataset}/{grid['name']}" + (f"/epochs={epochs}" if epochs is not None else "")


def report_folder(dataset: str, grid: dict, epochs: int | None, root: Path | None = None) -> Path:
    """``reports/<dataset>/<grid>`` (``…-epochs<n>`` when the epochs are overridden, so a quick look never
    replaces the report of the grid's own protocol)."""
    name = grid["name"] + (f"-epochs{epochs}" if epochs is not None else "")
    return Path(root or REPO_ROOT / "reports") / dataset / name


def report_grid(grid: dict, dataset: str, parser, seeds: list[int], epochs: int | None, backbones,
                margins: dict | None = None) -> dict:
    """The grid description the report reads (:mod:`pipeline.compare.data`)."""
    ds = parser.get_parsed_content("dataset")
    return {
        "name": grid["name"], "dataset": dataset, "class_names": list(ds["class_names"]),
        "region_names": list((ds.get("eval_regions") or {}).keys()) or list(ds["class_names"])[1:],
        "distance_unit": str(ds.get("distance_unit", "mm")), "backbones": list(backbones or grid["backbones"]),
        "methods": [{"name": m["name"], "label": m["label"], "loss": m["loss"],
                     "hp_name": next(iter(m.get("grid") or {}), None),
                     "values": next(iter((m.get("grid") or {}).values()), [])} for m in grid["methods"]],
        "reference": grid["reference"], "baseline": grid["baseline"], "seeds": list(seeds),
        "epochs": int(grid["profile"].get("epochs", parser.get_parsed_content("epochs"))),
        "epochs_overridden": epochs is not None, "augmentation": str(grid.get("augmentation", "")),
        "penalties": bool(grid.get("penalties", False)), "margins": resolve_margins(grid, margins),
    }


def parent_status(runs, expected: int) -> str | None:
    """The parent run's status once its report is written: FINISHED when every run of the grid finished, FAILED when
    every run has been tried and some failed; ``None`` (left RUNNING) while runs are missing (other shards)."""
    finished = int((runs["status"] == "FINISHED").sum()) if len(runs) else 0
    if finished == expected:
        return "FINISHED"
    return "FAILED" if len(runs) == expected else None


def train_one(spec: RunSpec, dataset: str, machine: dict, tags: dict, config_dir: str | None, quiet: bool) -> dict:
    """Train one run of the comparison as a child run; never raises for a failed training (it is recorded)."""
    parser = resolved_config(spec, dataset, Path(config_dir) if config_dir else None, machine)
    out_dir = Path(parser.get_parsed_content("output_dir"))
    name, attempt = spec.run_name, 1
    while (out_dir / name).exists():  # an earlier attempt (failed or killed) keeps its folder
        attempt += 1
        name = f"{spec.run_name}-try{attempt}"
    tags = {**tags, **spec.tags(), "compare.host": socket.gethostname(), "compare.pid": str(os.getpid())}
    t0 = time.time()
    try:
        out = run_training(parser, run_name=name, quiet=True, tags=tags)
    except Exception as e:  # noqa: BLE001 - a failed run is reported, the comparison goes on
        return {"key": spec.key, "status": "FAILED", "error": f"{type(e).__name__}: {e}", "seconds": time.time() - t0}
    mean = out["results"]["mean"]
    return {"key": spec.key, "status": "FINISHED", "run_id": out["run_id"], "seconds": time.time() - t0,
            "dsc": mean["dsc"], "ece": mean["ece"]}


def _init_worker(threads: int, gpus) -> None:
    torch.set_num_threads(threads)
    quiet_warnings()
    if gpus is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpus.get())


def run_comparison(
    dataset: str = "mni",
    grid: str = "paper",
    seeds: list[int] | None = None,
    jobs: int = 1,
    shard_spec: str | None = None,
    epochs: int | None = None,
    report_only: bool = False,
    backbones: list[str] | None = None,
    overrides: dict | None = None,
    margins: dict | None = None,
    config_dir: Path | None = None,
    reports_root: Path | None = None,
    quiet: bool = False,
) -> dict:
    """Train this shard's missing runs of a comparison, then write the report of the whole comparison.

    Args:
        dataset: the dataset (``configs/dataset/<name>.yaml``).
        grid: a grid name (``configs/compare/<name>.yaml``) or a grid file.
        seeds, epochs, backbones: replace the grid's seeds, epochs and backbones.
        jobs: runs trained at once on this machine (1: in this process).
        shard_spec: ``"i/n"``: train only the i-th of n deterministic shares of the grid.
        report_only: train nothing; report on what the store holds.
        overrides: config overrides of every run that do not change what it computes (``data_dir``,
            ``output_dir``, ``cache``…; they are left out of the keys).
        margins: practical-equivalence margins per metric (``{"ece": 0.003}``) over the grid file's ``margins``.

    Returns:
        ``{"report", "parent_run_id", "trained", "skipped", "failed", "specs"}``.
    """
    say = (lambda msg: None) if quiet else (lambda msg: print(msg, flush=True))
    i, n = parse_shard(shard_spec)
    if jobs < 1:
        raise ValueError(f"JOBS must be a whole number >= 1, got {jobs}")
    g = load_grid(grid, config_dir)
    resolve_margins(g, margins)  # a bad margin fails now, before any training
    specs = expand(g, seeds, epochs, backbones)
    machine = {"experiment_name": EXPERIMENT, **(overrides or {})}
    machine.setdefault("output_dir", str(REPO_ROOT / "runs" / "compare" / dataset / g["name"]))
    first = resolved_config(specs[0], dataset, config_dir, machine)
    fingerprint = data_fingerprint(first)
    for s in specs:
        s.key = run_key(resolved_config(s, dataset, config_dir, machine), s.seed, fingerprint)
    comparison = comparison_id(dataset, g, epochs)
    uri = tracking_uri()
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment_id = ensure_experiment(client, EXPERIMENT, uri)
    parent = find_or_create_parent(client, experiment_id, comparison, {
        **source_tags(), "compare.grid": g["name"], "compare.dataset": dataset, "dataset": dataset})
    say(f"comparison {comparison}: {len(specs)} runs in the grid; MLflow parent run {parent} (experiment "
        f"'{EXPERIMENT}', {uri})")

    keys = [s.key for s in specs]

    def children_now() -> dict[str, list]:  # this comparison's runs, and finished runs of the same key elsewhere
        return with_reused(child_runs(client, experiment_id, parent), finished_elsewhere(client, experiment_id, parent),
                           keys)

    trained, skipped, failed = [], [], []
    if not report_only:
        children = children_now()
        todo = []
        for s in shard(specs, i, n):
            attempts = children.get(s.key, [])
            if any(r.info.status == "FINISHED" for r in attempts):
                skipped.append(s.key)
                continue
            for r in attempts:
                if is_stale(r):
                    client.set_terminated(r.info.run_id, "KILLED")
            todo.append(s)
        say(f"shard {i}/{n}: {len(todo)} to train, {len(skipped)} already finished")
        tags = {"mlflow.parentRunId": parent, "compare.id": comparison}
        results = _train_all(todo, dataset, machine, tags, config_dir, jobs, say)
        trained = [r["key"] for r in results if r["status"] == "FINISHED"]
        failed = [r for r in results if r["status"] != "FINISHED"]

    runs, volumes, extras = collect(client, specs, children_now())
    folder = report_folder(dataset, g, epochs, reports_root)
    described = report_grid(g, dataset, first, [*dict.fromkeys(s.seed for s in specs)], epochs, backbones, margins)
    with building_folder(folder) as tmp:  # a report is replaced whole: no figure of an earlier one stays behind
        write_report(tmp, runs, volumes, described, extras)
    path = folder / "report.md"
    for f in sorted(folder.iterdir()):
        if f.is_file():
            client.log_artifact(parent, str(f), "report")
    log_verdict(client, parent, folder, child_runs(client, experiment_id, parent), specs)
    status = parent_status(runs, len(specs))
    if status is not None:
        client.set_terminated(parent, status)
    say(f"report: {path}")
    return {"report": path, "parent_run_id": parent, "trained": trained, "skipped": skipped, "failed": failed,
            "specs": specs}


def log_verdict(client, parent: str, folder: Path, own_children: dict[str, list], specs: list[RunSpec]) -> None:
    """What the MLflow UI shows of the verdict: the parent run's description is the report's verdict and
    checkpoint-sensitivity paragraphs; its metrics ``verdict/<other>/<metric>/{diff,ci_low,ci_high,p_holm,
    p_tost_holm}`` and tags ``verdict/<other>/<metric>`` (the word) per comparison (``<backbone>/`` first with
    several backbones); the comparison's own finished children carry ``compare.selected`` = ``true`` or ``false``."""
    summary = json.loads((folder / "summary.json").read_text())
    text = (folder / "report.md").read_text()
    note = text[text.index("**Verdict**"):text.index("**Protocol.**")].strip()  # verdict and checkpoint sensitivity
    multi = len(summary["grid"]["backbones"]) > 1
    if len(note) > NOTE_LIMIT:  # MLflow keeps tag values up to 8000 characters
        note = note[:NOTE_LIMIT - 60].rsplit(" ", 1)[0] + " … (the whole verdict: report/report.md)"
    metrics, tags = {}, {"mlflow.note.content": note}
    for row in summary["statistics"]:
        name = f"verdict/{row['backbone'] + '/' if multi else ''}{row['other']}/{row['metric']}"
        tags[name] = str(row["verdict"])
        metrics.update({f"{name}/{k}": row[k] for k in ("diff", "ci_low", "ci_high", "p_holm", "p_tost_holm")
                        if row.get(k) is not None})
    log_batch(client, parent, metrics, tags)
    chosen = {(r["backbone"], r["method"], r["setting"]) for r in summary["selection"]}
    for spec in specs:
        for run in own_children.get(spec.key, []):
            if run.info.status == "FINISHED":
                selected = (spec.backbone, spec.method, spec.setting) in chosen
                client.set_tag(run.info.run_id, "compare.selected", "true" if selected else "false")


def log_batch(client, run_id: str, metrics: dict, tags: dict) -> None:
    """Metrics (step 0) and tags in batches MLflow accepts (at most 1000 metrics, 100 tags a call)."""
    now = int(time.time() * 1000)
    ms = [Metric(k, float(v), now, 0) for k, v in sorted(metrics.items())]
    ts = [RunTag(k, v) for k, v in sorted(tags.items())]
    for i in range(0, max(len(ms), len(ts)), 100):
        client.log_batch(run_id, metrics=ms[i:i + 100], tags=ts[i:i + 100])


def _train_all(todo: list[RunSpec], dataset: str, machine: dict, tags: dict, config_dir, jobs: int, say) -> list:
    done = []

    def report(k: int, spec: RunSpec, r: dict) -> None:
        what = f"{spec.method} {spec.setting or ''} {spec.backbone} seed {spec.seed}".replace("  ", " ")
        detail = (f"test DSC {r['dsc']:.3f}, ECE {r['ece']:.4f}" if r["status"] == "FINISHED" else r.get("error", ""))
        say(f"[{k}/{len(todo)}] {what}: {r['status']} in {r['seconds']:.0f} s ({detail})")

    if jobs == 1 or len(todo) <= 1:
        for k, spec in enumerate(todo, 1):
            done.append(train_one(spec, dataset, machine, tags, str(config_dir) if config_dir else None, True))
            report(k, spec, done[-1])
        return done
    n_gpu = torch.cuda.device_count()
    ctx = mp.get_context("spawn")
    gpus = None
    if n_gpu:
        gpus = ctx.Manager().Queue()
        for w in range(jobs):
            gpus.put(w % n_gpu)
    threads = max(1, len(os.sched_getaffinity(0)) // jobs) if not n_gpu else torch.get_num_threads()
    with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init_worker, initargs=(threads, gpus)) as pool:
        futures = {pool.submit(train_one, s, dataset, machine, tags, str(config_dir) if config_dir else None, True): s
                   for s in todo}
        for k, fut in enumerate(as_completed(futures), 1):
            done.append(fut.result())
            report(k, futures[fut], done[-1])
    return done
