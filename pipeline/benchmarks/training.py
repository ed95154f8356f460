"""Training throughput benchmark (``make bench``): slices per second of the whole training step (data, network,
loss, optimizer, DDP) against the bare network, for 1 and 2 processes, and on CUDA without and with AMP.

Each row is a fresh run of the training path of ``make train`` (``torchrun`` for several processes), on the default
dataset unless told otherwise, in which:

1. every process times its **bare network**: forward, cross-entropy and backward on a random batch of the training
   batch's shape (``--bare-steps`` steps after three untimed ones, before and after the training, the faster
   kept: a busy machine slows one of them; the processes run it at the same time, so on a shared CPU they compete as
   in training); their rates add up to the ``bare`` column;
2. the **training** runs ``--epochs`` epochs (the first untimed) with MONAI's trainer as ``make train`` builds it
   (same loader, sampler, DDP wrapper, AMP and channels-last settings; no validation); ``slices/s`` is the slices of
   all processes over the slowest process's time;
3. ``ratio`` = slices/s ÷ bare: the share of the network's own speed the whole training step keeps; ``data wait`` =
   the time spent waiting for the next batch ÷ (that + the step's time), mean over processes.

On the CPU each process gets ``--threads`` threads (default: this process's ``torch.get_num_threads()``, i.e.
``OMP_NUM_THREADS``), so 2 processes use twice the cores of 1. On CUDA each process has its own GPU (rows with more
processes than GPUs are skipped) and the timings wait for the GPU (``torch.cuda.synchronize``).

Usage::

    python -m pipeline.benchmarks.training                        # 1 and 2 processes; on CUDA, AMP off and on
    python -m pipeline.benchmarks.training --processes 1,2,4 --epochs 6 --json bench/training.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from monai.utils import set_determinism

from pipeline.accelerator import amp_dtype, configure_amp, to_channels_last
from pipeline.collectives import barrier, gather_in_rank_order
from pipeline.config import REPO_ROOT, load_config, parse_assignments
from pipeline.data.prepare import prepare_data, split_cases
from pipeline.distributed import DistributedRun
from pipeline.engines import create_trainer
from pipeline.io import write_json_atomic


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_rate(network: torch.nn.Module, shape: tuple, num_classes: int, device: torch.device, amp: bool,
              steps: int = 20, warmup: int = 3) -> float:
    """Slices per second of forward + cross-entropy + backward of (a copy of) ``network`` on a random ``shape``
    (``B×C×H×W``) batch, under autocast when ``amp``."""
    net = copy.deepcopy(network).train()
    x = torch.rand(*shape, device=device)
    y = torch.randint(0, num_classes, (shape[0], *shape[2:]), device=device)
    dtype = amp_dtype(device)
    elapsed = 0.0
    for i in range(warmup + steps):
        _sync(device)
        start = time.perf_counter()
        net.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=amp):
            out = net(x)
        F.cross_entropy(out.float(), y).backward()
        _sync(device)
        if i >= warmup:
            elapsed += time.perf_counter() - start
    return steps * shape[0] / elapsed


class StepTimer:
    """Ignite handler: per process, after ``warmup`` epochs, the slices trained, the wall time of the epochs, the
    time waiting for batches and the time of the steps."""

    def __init__(self, device: torch.device, warmup: int = 1) -> None:
        self.device, self.warmup = device, warmup
        self.totals = {"slices": 0, "wall_s": 0.0, "data_s": 0.0, "step_s": 0.0, "iterations": 0}

    def attach(self, engine: Engine) -> None:
        for event, fn in ((Events.EPOCH_STARTED, self.epoch_started), (Events.GET_BATCH_STARTED, self.batch_started),
                          (Events.GET_BATCH_COMPLETED, self.batch_completed),
                          (Events.ITERATION_STARTED, self.step_started),
                          (Events.ITERATION_COMPLETED, self.step_completed), (Events.EPOCH_COMPLETED, self.epoch_done)):
            engine.add_event_handler(event, fn)

    def timed(self, engine: Engine) -> bool:
        return engine.state.epoch > self.warmup

    def epoch_started(self, engine: Engine) -> None:
        _sync(self.device)
        self.epoch_t0 = time.perf_counter()

    def batch_started(self, engine: Engine) -> None:
        self.batch_t0 = time.perf_counter()

    def batch_completed(self, engine: Engine) -> None:
        if self.timed(engine):
            self.totals["data_s"] += time.perf_counter() - self.batch_t0

    def step_started(self, engine: Engine) -> None:
        self.step_t0 = time.perf_counter()

    def step_completed(self, engine: Engine) -> None:
        _sync(self.device)
        if self.timed(engine):
            self.totals["step_s"] += time.perf_counter() - self.step_t0
            self.totals["slices"] += int(engine.state.batch["image"].shape[0])
            self.totals["iterations"] += 1

    def epoch_done(self, engine: Engine) -> None:
        _sync(self.device)
        if self.timed(engine):
            self.totals["wall_s"] += time.perf_counter() - self.epoch_t0


def measure(dataset: str, loss: str, backbone: str, epochs: int, amp: bool, bare_steps: int,
            overrides: dict | None = None) -> dict | None:
    """One row, in each process of a (``torchrun``) run; the row on rank 0, ``None`` on the others."""
    parser = load_config(dataset, loss, backbone, {"epochs": epochs, "amp": amp, **(overrides or {})})
    seed = int(parser.get_parsed_content("seed"))
    set_determinism(seed=seed)
    device = parser.get_parsed_content("device")
    dist = DistributedRun.start(device)
    dist.rank_zero_first(lambda: split_cases(parser))
    data = prepare_data(parser, dist.share, dist.local_world_size)
    loader = dist.train_loader(data.volumes["train"], data.slice_axis, parser.get_parsed_content("augment"),
                               int(parser.get_parsed_content("batch_size")),
                               int(parser.get_parsed_content("num_workers")),
                               bool(data.dataset.get("skip_empty_slices", False)), seed, device)
    cuda = device.type == "cuda"
    network = to_channels_last(parser.get_parsed_content("network"),
                               bool(parser.get_parsed_content("channels_last")) and cuda)
    amp = bool(parser.get_parsed_content("amp")) and cuda
    shape = (loader.batch_size, *loader.dataset[0]["image"].shape)  # without starting the loader's workers
    barrier()
    bare = bare_rate(network, shape, len(data.class_names), device, amp, bare_steps)
    unused = bool(parser.get_parsed_content("find_unused_parameters"))
    trainer = create_trainer(dist.wrap(network, seed, unused), parser.get_parsed_content("loss").to(device),
                             parser.get_parsed_content("optimizer"), loader, device, epochs, None, amp)
    dist.attach(trainer, None, network)
    if amp:
        configure_amp(amp_dtype(device), trainer)
    timer = StepTimer(device)
    timer.attach(trainer)
    trainer.run()
    barrier()
    bare = max(bare, bare_rate(network, shape, len(data.class_names), device, amp, bare_steps))
    per_process = gather_in_rank_order([{**timer.totals, "bare": bare}])
    primary = dist.finish_training()
    if not primary:
        return None
    wall = max(p["wall_s"] for p in per_process)
    slices = sum(p["slices"] for p in per_process)
    rate, bare_total = slices / wall, sum(p["bare"] for p in per_process)
    waits = [p["data_s"] / max(p["data_s"] + p["step_s"], 1e-12) for p in per_process]
    return {"processes": dist.world_size, "amp": str(amp_dtype(device)).replace("torch.", "") if amp else "off",
            "channels_last": bool(parser.get_parsed_content("channels_last")) and cuda,
            "threads": torch.get_num_threads(), "device": str(device), "batch_shape": list(shape),
            "slices_per_s": rate, "bare_slices_per_s": bare_total, "ratio": rate / bare_total,
            "data_wait": sum(waits) / len(waits), "step_ms": 1000 * wall / max(p["iterations"] for p in per_process),
            "timed_epochs": epochs - 1, "per_process": per_process}


def hardware() -> str:
    """The machine in words: the GPU's name (CUDA) or the CPU model, with the core count and torch's version."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    text = f"{cpu}, {cores} cores"
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        text = f"{len(names)}× {names[0]} (CUDA {torch.version.cuda}); " + text
    return f"{text}; torch {torch.__version__}"


def run_row(processes: int, amp: bool, threads: int, args: argparse.Namespace) -> dict:
    """One row in a fresh run (``torchrun`` for several processes)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        worker = ["-m", "pipeline.benchmarks.training", "--worker", str(out), "--dataset", args.dataset, "--loss",
                  args.loss, "--backbone", args.backbone, "--epochs", str(args.epochs), "--bare-steps",
                  str(args.bare_steps), "--amp", "on" if amp else "off", *sum((["--set", s] for s in args.set), [])]
        launcher = [sys.executable] if processes == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        proc = subprocess.run([*launcher, *worker], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
        if proc.returncode or not out.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-4:]
            return {"processes": processes, "amp": "on" if amp else "off", "error": " | ".join(tail)}
        return json.loads(out.read_text())


HEADER = (f"{'processes':>9} {'threads':>7} {'amp':>8} {'slices/s':>9} {'bare fwd+bwd':>13} {'ratio':>6} "
          f"{'data wait':>9} {'ms/step':>8}")


def row_text(r: dict) -> str:
    if "error" in r:
        return f"{r['processes']:>9} {'':>7} {r['amp']:>8}  FAILED: {r['error']}"
    return (f"{r['processes']:>9} {r['threads']:>7} {r['amp']:>8} {r['slices_per_s']:>9.1f} "
            f"{r['bare_slices_per_s']:>13.1f} {r['ratio']:>6.2f} {100 * r['data_wait']:>8.1f}% {r['step_ms']:>8.1f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.benchmarks.training", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="mni", help="configs/dataset/<name>.yaml (default: mni)")
    ap.add_argument("--loss", default="ce", help="configs/loss/<name>.yaml (default: ce)")
    ap.add_argument("--backbone", default="unet", help="configs/backbone/<name>.yaml (default: unet)")
    ap.add_argument("--processes", default="1,2", help="comma-separated process counts (default: 1,2)")
    ap.add_argument("--epochs", type=int, default=None, help="epochs per row, the first untimed (default: 4 on the "
                    "CPU, 20 on CUDA)")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads per process (default: this process's, i.e. OMP_NUM_THREADS)")
    ap.add_argument("--bare-steps", type=int, default=20, help="timed steps of the bare network (default: 20)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--amp", default="off", choices=["on", "off"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    args.epochs = args.epochs or (20 if cuda else 4)
    if args.epochs < 2:
        ap.error(f"--epochs must be >= 2 (the first is untimed), got {args.epochs}")
    if args.worker:
        warnings.filterwarnings("ignore")
        row = measure(args.dataset, args.loss, args.backbone, args.epochs, args.amp == "on", args.bare_steps,
                      parse_assignments(args.set))
        if row is not None:
            write_json_atomic(Path(args.worker), row)
        return 0

    counts = [int(n) for n in args.processes.split(",")]
    print(f"Training throughput: {args.dataset}, {args.backbone}, loss {args.loss}, {args.epochs - 1} timed epochs "
          f"after 1 untimed; {hardware()}")
    print(HEADER)
    print("-" * len(HEADER))
    rows = []
    for amp in ([False, True] if cuda else [False]):
        for n in counts:
            if cuda and n > torch.cuda.device_count():
                print(f"{n:>9} {'':>7} {'on' if amp else 'off':>8}  skipped: {torch.cuda.device_count()} GPU(s)")
                continue
            threads = args.threads or torch.get_num_threads()
            rows.append(run_row(n, amp, threads, args))
            print(row_text(rows[-1]), flush=True)
    if args.json:
        write_json_atomic(Path(args.json), {"hardware": hardware(), "rows": rows})
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
