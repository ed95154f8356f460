"""Backbone benchmark (``make bench-backbones``): parameters, forward+backward time and peak memory per backbone.

Every backbone is built from its config (``configs/backbone/<name>.yaml`` wrapped by the base config's
``PadToMultiple``, with the default dataset's 1 input channel and 4 classes) and measured on random batches of
each input size (default: the default dataset's 80×96 slices and 224×224), batch 4, in training mode: one step is
forward, cross-entropy, backward (no optimiser step). The time is the median over ``--repeats`` steps after
``--warmup`` untimed ones.

Each (backbone, size) pair runs in a fresh Python process, so the memory figures of one never include another's:

- CPU: ``peak RSS`` is the process's maximum resident set size (``resource.getrusage``), which includes the Python
  interpreter, the libraries and the weights; ``Δ step`` is that peak minus the maximum RSS reached before the first
  step (after the imports, the network and the input batch), i.e. what the training steps added: activations,
  gradients and workspace. The allocator may reuse memory freed earlier, so ``Δ step`` is a lower bound.
- CUDA: ``peak RSS`` is replaced by ``torch.cuda.max_memory_allocated`` over the steps (weights, gradients,
  activations), ``Δ step`` by that minus the memory allocated before the first step.

CE vs MbLS on every backbone (the paper's Fig. 7) is a comparison grid: ``make compare GRID=backbones``.

Usage::

    python -m pipeline.benchmarks.backbones                      # all backbones, 80x96 and 224x224
    python -m pipeline.benchmarks.backbones --backbones unet,transunet --sizes 80x96 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.config import REPO_ROOT, available, load_config
from pipeline.io import write_json_atomic

DEFAULT_SIZES = ("80x96", "224x224")


def _rss_mib() -> float:
    """Maximum resident set size of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(backbone: str, size: tuple[int, int], batch: int, repeats: int, warmup: int, device: str) -> dict:
    """Build ``backbone`` from its config and time ``repeats`` training steps on a ``batch×C×H×W`` random input.

    Returns:
        ``{"backbone", "size", "params", "step_ms", "step_ms_all", "peak_mib", "delta_mib", "memory", "threads"}``.
    """


    parser = load_config(dataset="mni", loss="ce", backbone=backbone)
    in_channels = int(parser.get_parsed_content("in_channels"))
    num_classes = int(parser.get_parsed_content("num_classes"))
    dev = torch.device(device)
    torch.manual_seed(0)
    net = parser.get_parsed_content("network_def").to(dev).train()
    params = sum(p.numel() for p in net.parameters())
    x = torch.rand(batch, in_channels, *size, device=dev)
    y = torch.randint(0, num_classes, (batch, *size), device=dev)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev) / 2**20
    else:
        before = _rss_mib()
    times = []
    for i in range(warmup + repeats):
        sync()
        start = time.perf_counter()
        net.zero_grad(set_to_none=True)
        logits = net(x)
        if logits.shape != (batch, num_classes, *size):
            raise RuntimeError(f"{backbone}: output {tuple(logits.shape)}, expected {(batch, num_classes, *size)}")
        F.cross_entropy(logits, y).backward()
        sync()
        if i >= warmup:
            times.append(1000 * (time.perf_counter() - start))
    if dev.type == "cuda":
        peak, memory = torch.cuda.max_memory_allocated(dev) / 2**20, "cuda max_memory_allocated"
    else:
        peak, memory = _rss_mib(), "process max RSS"
    return {
        "backbone": backbone, "size": list(size), "batch": batch, "params": params,
        "step_ms": statistics.median(times), "step_ms_all": times, "peak_mib": peak, "delta_mib": peak - before,
        "memory": memory, "threads": torch.get_num_threads(), "device": str(dev),
    }


def _parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"size '{text}' is not HxW (e.g. 80x96)") from None
    return h, w


def run_all(backbones: list[str], sizes: list[str], batch: int, repeats: int, warmup: int, device: str) -> list[dict]:
    """One fresh process per (backbone, size); returns their results (an ``"error"`` key where one failed)."""
    results = []
    for name in backbones:
        for size in sizes:
            cmd = [sys.executable, "-m", "pipeline.benchmarks.backbones", "--worker", "--backbones", name, "--sizes",
                   size, "--batch", str(batch), "--repeats", str(repeats), "--warmup", str(warmup), "--device", device]
            proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if proc.returncode or not lines:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
                results.append({"backbone": name, "size": list(_parse_size(size)), "error": " | ".join(tail)})
            else:
                results.append(json.loads(lines[-1]))
            print(_row(results[-1]), flush=True)
    return results


HEADER = f"{'backbone':<16} {'params':>9} {'input':>9} {'fwd+bwd ms':>11} {'peak MiB':>9} {'Δ step MiB':>11}"


def _row(r: dict) -> str:
    size = "×".join(str(s) for s in r["size"])
    if "error" in r:
        return f"{r['backbone']:<16} {'':>9} {size:>9}  FAILED: {r['error']}"
    return (f"{r['backbone']:<16} {r['params'] / 1e6:>8.2f}M {size:>9} {r['step_ms']:>11.0f} {r['peak_mib']:>9.0f} "
            f"{r['delta_mib']:>11.0f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.benchmarks.backbones", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbones", default=None, help="comma-separated names (default: every configs/backbone file)")
    ap.add_argument("--sizes", default=",".join(DEFAULT_SIZES), help="comma-separated HxW (default: 80x96,224x224)")
    ap.add_argument("--batch", type=int, default=4, help="batch size (default: 4, the paper's)")
    ap.add_argument("--repeats", type=int, default=5, help="timed steps (default: 5)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first (default: 1)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    names = args.backbones.split(",") if args.backbones else available("backbone")
    sizes = args.sizes.split(",")
    for s in sizes:
        _parse_size(s)
    if args.worker:
        warnings.filterwarnings("ignore")
        r = measure(names[0], _parse_size(sizes[0]), args.batch, args.repeats, args.warmup, args.device)
        print(json.dumps(r))
        return 0

    print(f"Backbone benchmark: batch {args.batch}, 1 channel, 4 classes (default dataset), training mode, "
          f"forward + cross-entropy + backward; median of {args.repeats} steps after {args.warmup} warm-up.")
    print(f"device {args.device}, {torch.get_num_threads()} torch threads, {platform.processor() or platform.machine()}"
          f", {os.cpu_count()} CPUs, torch {torch.__version__}; one fresh process per row. Memory: "
          + ("cuda max_memory_allocated (MiB); Δ step = peak - allocated before the first step."
             if args.device.startswith("cuda") else
             "process max RSS (MiB, incl. interpreter, libraries, weights); Δ step = peak - max RSS before the first "
             "step."))
    print(HEADER)
    print("-" * len(HEADER))
    results = run_all(names, sizes, args.batch, args.repeats, args.warmup, args.device)
    if args.json:
        write_json_atomic(Path(args.json), {"results": results})
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
