"""Command line: ``python -m pipeline <command>`` (the Makefile's targets call these).

Commands only parse arguments and call a plain function.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from pipeline import config as cfg

TRUST_HELP = ("read the run folder's config.yaml even if this MLflow store did not record it (a folder from "
              "elsewhere): its $ expressions are Python code and run")


def _add_selection(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="mni", help="configs/dataset/<name>.yaml (default: mni)")
    p.add_argument("--loss", default="mbls", help="configs/loss/<name>.yaml (default: mbls)")
    p.add_argument("--backbone", default="unet", help="configs/backbone/<name>.yaml (default: unet)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: the config's)")
    p.add_argument("--data-dir", default=None, help="dataset folder (default: data/<dataset>)")
    p.add_argument("--loss-args", default=None, help='loss parameters, e.g. "margin=8,alpha=0.1"')
    p.add_argument("--split-file", default=None, help="JSON split file replacing the dataset's split")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key (nested keys with '::'), repeatable; e.g. --set batch_size=8")


def build_parser(args: argparse.Namespace):
    overrides = cfg.parse_assignments(args.overrides)
    overrides.update(cfg.parse_assignments(args.loss_args, prefix="loss::"))
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    if args.data_dir:
        overrides["data_dir"] = args.data_dir
    if args.split_file:
        overrides["split_file"] = args.split_file
    return cfg.load_config(args.dataset, args.loss, args.backbone, overrides)


def _print_tables(out: dict, title: str) -> None:
    """The test table, then the post-hoc and noise tables when the evaluation made them."""
    sections = [(title, out["table"]),
                ("Post-hoc calibration (fitted on the validation volumes), test volumes:", out.get("posthoc_table")),
                ("Gaussian noise on the test images:", out.get("noise_table"))]
    for heading, table in sections:
        if table:
            print()
            print(heading)
            print(table)
    print()


def resume_parser(args: argparse.Namespace):
    """``train --resume RUN``: the run's own saved config, with the command's explicit overrides (which must not
    change it), and the run's name and folder."""
    from pipeline.resume import find_run_folder, read_record
    from pipeline.runs import check_trusted
    from pipeline.tracking import tracking_uri

    uri = tracking_uri()
    run_dir = find_run_folder(args.resume, uri)
    check_trusted(run_dir, read_record(run_dir).get("run_id"), uri, args.trust)  # its `$` expressions are code
    parser = cfg.load_run_config(run_dir / "config.yaml")
    overrides = cfg.parse_assignments(args.overrides)
    overrides.update(cfg.parse_assignments(args.loss_args, prefix="loss::"))
    overrides.update({k: v for k, v in (("epochs", args.epochs), ("data_dir", args.data_dir),
                                        ("split_file", args.split_file)) if v is not None})
    cfg.apply_overrides(parser, {**overrides, "output_dir": str(run_dir.parent)}, f"the run's config ({run_dir})")
    return parser, run_dir.name


def cmd_train(args: argparse.Namespace) -> int:
    from pipeline.checkpoints import TrainingTerminated
    from pipeline.tracking_store import TrackingStoreError
    from pipeline.training import default_run_name, run_training

    if args.resume:
        parser, run_name = resume_parser(args)
    else:  # named here, so that a stopped run's message names it
        parser = build_parser(args)
        run_name = args.run_name or default_run_name(parser)
    parser.get_parsed_content("loss")  # a bad loss parameter (e.g. LOSS_ARGS) fails here, before the data are read
    if args.nproc is not None and args.nproc != 1 and "WORLD_SIZE" not in os.environ:
        return launch_train(args, parser, run_name)
    try:
        out = run_training(parser, run_name=run_name, quiet=args.quiet)
    except TrackingStoreError as e:
        print(f"error: {e}", file=sys.stderr)  # the message masks the URI's password
        return 2
    except TrainingTerminated as e:
        print(f"error: training {e}; the MLflow run is marked KILLED. Continue it with the same command, or "
              f"`make train RESUME={run_name}`", file=sys.stderr)
        return 143  # 128 + SIGTERM, as the shell reports a process ended by it
    if not out["primary"]:  # a torchrun process other than rank 0: rank 0 reports
        return 0
    _print_tables(out, f"Test results ({args.dataset}, loss={args.loss}, backbone={args.backbone}):")
    print(f"run folder : {out['run_dir']}")
    print(f"MLflow run : {out['run_id']}  (make ui, then open http://127.0.0.1:5000)")
    return 0


def without_option(argv: list[str], option: str) -> list[str]:
    """``argv`` without ``option VALUE`` / ``option=VALUE``."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == option:
            skip = True
        elif not a.startswith(option + "="):
            out.append(a)
    return out


def launch_train(args: argparse.Namespace, parser, run_name: str | None) -> int:
    """``train --nproc n``: the same command in ``n`` processes on this machine (:mod:`pipeline.launch`), under
    the run name chosen here (so that a failed job's run is known to this process)."""
    from pipeline.launch import launch
    from pipeline.training import default_run_name

    if args.nproc < 1:
        raise ValueError(f"--nproc must be a positive number of processes, got {args.nproc}")
    argv = without_option(args.argv, "--nproc")
    if run_name is None:
        run_name = default_run_name(parser)
        argv += ["--run-name", run_name]
    run_dir = Path(parser.get_parsed_content("output_dir")) / run_name
    return launch(args.nproc, argv, run_dir, run_name)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from pipeline.evaluation import evaluate_run

    out = evaluate_run(args.run, overrides=cfg.parse_assignments(args.overrides), quiet=args.quiet, trust=args.trust)
    _print_tables(out, "Test results:")
    print(f"run folder : {out['run_dir']}  (summary.md, figures, maps/, posthoc/)")
    print(f"MLflow run : {out['run_id']}  (test metrics at step {out['step']})")
    return 0


def cmd_sync_mlflow(args: argparse.Namespace) -> int:
    from pipeline.journal import sync_journal
    from pipeline.resume import find_run_folder, read_record
    from pipeline.tracking import RunTracker, tracking_uri
    from pipeline.tracking_store import TrackingStoreError, check_store, mask_uri

    uri = tracking_uri()
    try:
        check_store(uri)
    except TrackingStoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run_dir = find_run_folder(args.run, uri)
    out = sync_journal(run_dir, uri)  # the final status, if it waited in the journal, is written here
    run_id = read_record(run_dir).get("run_id")
    if run_id:
        RunTracker.resume(run_id, uri)  # else a run left RUNNING by a process that is gone is marked KILLED
    if not out["entries"]:
        print(f"nothing to sync: no pending MLflow writes in {run_dir}")
    else:
        ops = ", ".join(f"{n} {op}" for op, n in sorted(out["by_op"].items()))
        print(f"synced {out['entries']} pending write(s) ({ops}) of {run_dir} into MLflow run(s) "
              f"{', '.join(out['run_ids'])} ({mask_uri(uri)})")
    return 0


def cmd_demo_data(args: argparse.Namespace) -> int:
    from pipeline.data.demo import write_demo_data

    options = cfg.parse_assignments(args.options)
    shape = [int(v) for v in args.shape.split(",")] if args.shape else None
    dest = write_demo_data(args.dataset, args.data_dir, n_cases=args.cases, shape=shape, seed=args.seed, **options)
    print(f"demo {args.dataset} data written to {dest}")
    print(f"train on it: make train DATASET={args.dataset} DATA_DIR={dest}")
    return 0


def cmd_bench_data(args: argparse.Namespace) -> int:
    from pipeline.benchmarks.data import main as bench

    return bench(["--dataset", args.dataset, *(["--data-dir", args.data_dir] if args.data_dir else [])])


def cmd_export(args: argparse.Namespace) -> int:
    from pipeline.export import export_bundle

    out = export_bundle(args.run, name=args.name, out_root=args.out, calibration=args.calibration,
                        overwrite=args.overwrite, log_to_mlflow=not args.no_mlflow, data_dir=args.data_dir,
                        with_data=args.with_data)
    dest = out["bundle"]
    print(f"bundle {out['name']} {out['version']} written to {dest} (calibration: {out['calibration']}, "
          f"{out['compiled']} into models/model.ts; eval_metrics from {out['metrics_source']})")
    print(f"calibration {out['calibration_reason']}")
    if out["mlflow"]:
        print(f"MLflow: artifacts {out['mlflow']['artifact_path']}, logged model {out['mlflow']['model_uri']}")
    if out["data_dir"]:
        print(f"the run's cases, in the bundle's data layout: {out['data_dir']}")
    print(f"verify it: make verify-bundle NAME={dest} TRUST=1 (TRUST=1 runs its configs and scripts: code)")
    print(f"run it: cd {dest} && python -m monai.bundle run --config_file configs/inference.json "
          "--dataset_dir <folder with imagesTs/> --output_dir <predictions>")
    return 0


def cmd_ui_links(args: argparse.Namespace) -> int:
    import mlflow

    from pipeline.tracking import runs_table_links, tracking_uri

    host = "127.0.0.1" if args.host in ("0.0.0.0", "") else args.host
    for line in runs_table_links(mlflow.MlflowClient(tracking_uri=tracking_uri()), host, args.port):
        print(line)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from pipeline.compare.grid import parse_seeds
    from pipeline.compare.runner import run_comparison

    overrides = cfg.parse_assignments(args.overrides)
    if args.data_dir:
        overrides["data_dir"] = args.data_dir
    out = run_comparison(
        args.dataset, args.grid, seeds=parse_seeds(args.seeds) if args.seeds else None,
        jobs=args.jobs, shard_spec=args.shard, epochs=args.epochs, report_only=args.report == "only",
        backbones=args.backbones.split(",") if args.backbones else None, overrides=overrides,
        margins=cfg.parse_assignments(args.margins) if args.margins else None)
    print(f"MLflow parent run: {out['parent_run_id']} (make ui: experiment 'compare')")
    print(f"report: {out['report']}")
    if out["failed"]:
        print(f"{len(out['failed'])} run(s) failed: " + "; ".join(f"{r['key']}: {r['error']}" for r in out["failed"]))
    return 1 if out["failed"] else 0


def cmd_list(args: argparse.Namespace) -> int:
    for kind in cfg.KINDS:
        print(f"{kind}: {', '.join(cfg.available(kind))}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train, validate, test and log one run")
    _add_selection(p)
    p.add_argument("--run-name", default=None,
                   help="MLflow run name and run folder (default: generated); an existing one is resumed")
    p.add_argument("--resume", default=None, metavar="RUN",
                   help="continue a run (its folder, MLflow run id or name) with its own config")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--trust", action="store_true", help=TRUST_HELP)
    p.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="train with N processes on this machine (DDP; sockets on the loopback interface only)")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("sync-mlflow", help="write a run's pending MLflow writes (metrics.jsonl) into MLflow")
    p.add_argument("run", help="run folder (runs/<name>), MLflow run id or run name")
    p.set_defaults(func=cmd_sync_mlflow)
    p = sub.add_parser("evaluate", help="evaluate a trained run on its test volumes and log into the same MLflow run")
    p.add_argument("run", help="MLflow run id or name, run folder (runs/<name>), or checkpoint file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key of the run, e.g. --set evaluation::noise::sigmas=[]")
    p.add_argument("--quiet", action="store_true", help="no progress messages")
    p.add_argument("--trust", action="store_true", help=TRUST_HELP)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("demo-data", help="write a small synthetic sample in a dataset's official layout")
    p.add_argument("--dataset", required=True, help="configs/dataset/<name>.yaml")
    p.add_argument("--data-dir", default=None, help="where to write it (default: data/demo/<dataset>)")
    p.add_argument("--cases", type=int, default=None, help="number of cases (default: the dataset's demo size)")
    p.add_argument("--shape", default=None, help="volume grid, e.g. 64,64,8 (default: the dataset's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic anatomy (default: 0)")
    p.add_argument("--option", dest="options", action="append", default=[], metavar="KEY=VALUE",
                   help="writer option, e.g. --option layout=promise12")
    p.set_defaults(func=cmd_demo_data)
    p = sub.add_parser("bench-data", help="time and memory of validating and caching a dataset")
    p.add_argument("--dataset", required=True, help="configs/dataset/<name>.yaml")
    p.add_argument("--data-dir", default=None, help="the data to measure (default: a fresh demo sample)")
    p.set_defaults(func=cmd_bench_data)
    p = sub.add_parser("export", help="export a trained run as a MONAI bundle (bundles/<name>/)")
    p.add_argument("run", help="MLflow run id or name, run folder (runs/<name>), or checkpoint file")
    p.add_argument("--name", default=None,
                   help="bundle folder name (default: <dataset>_<task>_<loss>_<backbone>_<run name>, "
                   "e.g. mni_brain_tissue_mbls_unet_brain_mbls)")
    p.add_argument("--out", default=None, help="where bundles go (default: bundles/)")
    p.add_argument("--calibration", default="auto", choices=["auto", "none", "ts", "lts"],
                   help="post-hoc calibration inside the shipped model (auto: the fitted one with the lowest "
                   "validation ECE, none when none lowered it)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle of that name (version + 1)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log the bundle and model into the run's MLflow run")
    p.add_argument("--data-dir", default=None, help="also copy the run's cases there, in the bundle's data layout")
    p.add_argument("--with-data", action="store_true",
                   help="copy the run's cases into the bundle's data/ (its configs' default dataset_dir)")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("compare", help="train a comparison grid (resumable, shardable) and write its report")
    p.add_argument("--dataset", default="mni", help="configs/dataset/<name>.yaml (default: mni)")
    p.add_argument("--grid", default="paper", help="configs/compare/<name>.yaml or a grid file (default: paper)")
    p.add_argument("--margins", default=None,
                   help="equivalence margins of the verdict over the grid file's, e.g. ece=0.003,dsc=0.02")
    p.add_argument("--seeds", default=None, help="seeds: 0-9, 0,1,2 or 0-4,7 (default: the grid's)")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at once on this machine (default 1)")
    p.add_argument("--shard", default=None, help="i/n: train the i-th of n shares of the grid (default: all)")
    p.add_argument("--epochs", type=int, default=None, help="replace the grid's epochs (a quick look)")
    p.add_argument("--backbones", default=None, help="comma-separated backbones (default: the grid's)")
    p.add_argument("--report", default=None, choices=["only"], help="only: train nothing, report on the store")
    p.add_argument("--data-dir", default=None, help="dataset folder (default: data/<dataset>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a config key that does not change the result (e.g. cache=disk, num_workers=2)")
    p.set_defaults(func=cmd_compare)
    p = sub.add_parser("ui-links", help="the UI address of each experiment's runs table")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    p.set_defaults(func=cmd_ui_links)
    p = sub.add_parser("list", help="list the datasets, losses and backbones")
    p.set_defaults(func=cmd_list)

    argv = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(argv)
    args.argv = argv
    sys.excepthook = masked_excepthook
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cfg.quiet_warnings()
    try:
        return args.func(args)
    except (ValueError, KeyError, FileNotFoundError, FileExistsError, RuntimeError) as e:
        # MONAI's config parser wraps a component's own error in "Failed to instantiate …": show the cause
        if isinstance(e, RuntimeError):
            if not isinstance(e.__cause__, (ValueError, KeyError)):
                raise
            e = e.__cause__
        from pipeline.launch import note_error
        from pipeline.tracking_store import mask_uri

        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {mask_uri(msg)}", file=sys.stderr)
        note_error(f"{type(e).__name__}: {msg}")  # for the launcher of `train --nproc n`, if any
        return 2


def masked_excepthook(exc_type, exc, tb) -> None:
    """Print an uncaught error's traceback as Python does, with every URI's password masked (an MLflow client error
    quotes the store's URL); in a process of ``train --nproc n``, also note the error for the launcher."""
    import traceback

    from pipeline.launch import note_error
    from pipeline.tracking_store import mask_uri

    sys.stderr.write(mask_uri("".join(traceback.format_exception(exc_type, exc, tb))))
    note_error("".join(traceback.format_exception_only(exc_type, exc)))


if __name__ == "__main__":
    sys.exit(main())
