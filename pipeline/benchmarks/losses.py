"""Forward + backward time of every registered loss, relative to plain cross-entropy measured in the same run.

``make bench-losses`` (``python -m pipeline.benchmarks.losses``). Logits ``B×K×H×W`` (default ``4×4×224×224``, a
training batch of the paper's 2D setting) drawn from ``N(0, scale²)`` with ``scale = 10`` by default, so that a good
share of the logit distances exceeds the MbLS margin of 10 and the penalties' gradients are exercised (the share is
printed); labels are random integers. Each loss is built with its defaults.

A timing is the mean of ``--iters`` forward + backward passes after ``--warmup`` untimed ones. Every round times,
for each loss, CE and that loss back to back, so that both see the same machine load (the machine may be shared);
the table gives the median time over ``--repeats`` rounds and the median over rounds of the paired ratio
``time(loss) / time(ce)``.

Then a whole training step of the default run (network, loss, backward, optimizer) is timed with CE and with each of
MbLS, NACL, CRaC, mL1-ACE (hard, soft) and ACLS, paired: what a loss costs where it matters. (That measurement
decided MbLS's implementation: a fused autograd function of CE and penalty made the step only 1-3 % faster than
the plain expression, so the plain one stays.)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from pipeline.config import load_config
from pipeline.losses import LOSSES, build_loss, logit_distances


def time_loss(loss_fn, logits: torch.Tensor, labels: torch.Tensor, iters: int, warmup: int) -> float:
    """Mean seconds of one ``loss_fn(logits, labels).backward()`` over ``iters`` passes after ``warmup`` passes."""
    sync = torch.cuda.synchronize if logits.is_cuda else (lambda: None)
    for _ in range(warmup):
        logits.grad = None
        loss_fn(logits, labels).backward()
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        logits.grad = None
        loss_fn(logits, labels).backward()
    sync()
    return (time.perf_counter() - start) / iters


def run(batch: int = 4, classes: int = 4, size: int = 224, scale: float = 10.0, repeats: int = 21, iters: int = 5,
        warmup: int = 2, seed: int = 0, device: str = "cpu") -> dict[str, dict[str, float]]:
    """Time every loss of :data:`pipeline.losses.LOSSES` against CE.

    Each round times, for every loss, CE and the loss back to back (in alternating order from round to round), so
    that both see the same machine load; the ratio of a round is ``time(loss) / time(ce)`` of that pair.

    Returns:
        ``{name: {"ms": median ms per forward+backward, "ratio": median over rounds of the paired ratio}}``, CE
        first (its ``ms`` is the median over all its timings), then the registered losses.
    """
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(batch, classes, size, size, generator=gen) * scale).to(device).requires_grad_(True)
    labels = torch.randint(0, classes, (batch, 1, size, size), generator=gen).to(device)
    names = sorted(n for n in LOSSES if n != "ce")
    losses = {n: build_loss(n).to(device) for n in ["ce", *names]}
    times: dict[str, list[float]] = {n: [] for n in ["ce", *names]}
    ratios: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names:
            pair = ("ce", n) if r % 2 == 0 else (n, "ce")
            t = {m: time_loss(losses[m], logits, labels, iters, warmup) for m in pair}
            times["ce"].append(t["ce"])
            times[n].append(t[n])
            ratios[n].append(t[n] / t["ce"])
    out = {"ce": {"ms": 1e3 * statistics.median(times["ce"]), "ratio": 1.0}}
    for n in names:
        out[n] = {"ms": 1e3 * statistics.median(times[n]), "ratio": statistics.median(ratios[n])}
    return out


#: the losses whose training step ``make bench-losses`` times against CE's (the paper's MbLS and the methods since)
STEP_LOSSES = ("mbls", "nacl", "crac", "ace_hard", "ace_soft", "acls")


def training_step_times(repeats: int = 15, steps: int = 10, warmup: int = 3, seed: int = 0,
                        device: str = "cpu", losses: tuple[str, ...] | list[str] = ("mbls",)) -> dict:
    """Time a whole training step of the default run (its network, batch and slice size, Adam) with CE and with each
    of ``losses`` (default MbLS), paired: every round times ``steps`` steps of CE and of the loss back to back, in
    alternating order.

    A step is forward, loss, backward and ``optimizer.step()``, as in ``make train`` (the default config: dataset
    ``mni``, loss ``mbls``, backbone ``unet``, ``batch_size`` slices of the dataset's in-plane crop), on random labels.

    Returns:
        ``"ce_ms"`` (median over all CE timings of the mean step time), for each loss ``"<name>_ms"`` (its median)
        and ``"<name>_over_ce"`` (the median of the paired ratios), the step's input shape as ``"input"``.
    """
    parser = load_config("mni", "mbls", "unet")
    torch.manual_seed(seed)
    network = parser.get_parsed_content("network_def").to(device).train()
    optimizer = torch.optim.Adam(network.parameters(), lr=float(parser.get_parsed_content("lr")))
    batch = int(parser.get_parsed_content("batch_size"))
    crop = parser.get_parsed_content("dataset::source::crop")
    k, c = int(parser.get_parsed_content("num_classes")), int(parser.get_parsed_content("in_channels"))
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, c, *crop, generator=gen).to(device)
    y = torch.randint(0, k, (batch, 1, *crop), generator=gen).to(device)
    names = [n for n in losses if n != "ce"]
    fns = {n: build_loss(n).to(device) for n in ["ce", *names]}
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)

    def timed(loss_fn, n: int) -> float:
        sync()
        start = time.perf_counter()
        for _ in range(n):
            optimizer.zero_grad(set_to_none=True)
            loss_fn(network(x), y).backward()
            optimizer.step()
        sync()
        return (time.perf_counter() - start) / max(n, 1)

    for fn in fns.values():
        timed(fn, warmup)
    times: dict[str, list[float]] = {n: [] for n in fns}
    ratios: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names:
            order = ("ce", name) if r % 2 == 0 else (name, "ce")
            t = {m: timed(fns[m], steps) for m in order}
            times["ce"].append(t["ce"])
            times[name].append(t[name])
            ratios[name].append(t[name] / t["ce"])
    out: dict = {"ce_ms": 1e3 * statistics.median(times["ce"])}
    for name in names:
        out[f"{name}_ms"] = 1e3 * statistics.median(times[name])
        out[f"{name}_over_ce"] = statistics.median(ratios[name])
    out["input"] = "×".join(str(v) for v in x.shape)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.benchmarks.losses", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4, help="B (default 4)")
    ap.add_argument("--classes", type=int, default=4, help="K (default 4)")
    ap.add_argument("--size", type=int, default=224, help="H = W (default 224)")
    ap.add_argument("--scale", type=float, default=10.0, help="standard deviation of the logits (default 10)")
    ap.add_argument("--repeats", type=int, default=21, help="rounds; the table shows medians (default 21)")
    ap.add_argument("--iters", type=int, default=5, help="timed passes per loss and round (default 5)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed passes before each timing (default 2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--step-repeats", type=int, default=15,
                    help="rounds of the training-step comparison with CE (default 15; 0 skips it)")
    ap.add_argument("--step-losses", default=",".join(STEP_LOSSES),
                    help=f"the losses whose training step is timed against CE's (default {','.join(STEP_LOSSES)})")
    ap.add_argument("--step-iters", type=int, default=10, help="training steps per loss and round (default 10)")
    args = ap.parse_args(argv)

    gen = torch.Generator().manual_seed(args.seed)
    sample = torch.randn(args.batch, args.classes, args.size, args.size, generator=gen) * args.scale
    active = (logit_distances(sample) > 10).float().mean().item()
    print(f"forward + backward, logits {args.batch}×{args.classes}×{args.size}×{args.size} ~ N(0, {args.scale:g}²), "
          f"{args.device}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{100 * active:.0f}% of the logit distances exceed the margin 10; median of {args.repeats} rounds of "
          f"{args.iters} passes (after {args.warmup} warm-up passes), each paired with CE\n")
    results = run(args.batch, args.classes, args.size, args.scale, args.repeats, args.iters, args.warmup, args.seed,
                  args.device)
    print("| loss | ms | × CE |")
    print("|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['ms']:.2f} | {r['ratio']:.2f} |")
    print(f"\nmbls / ce = {results['mbls']['ratio']:.2f} for the loss alone")
    if args.step_repeats > 0:
        names = [n.strip() for n in args.step_losses.split(",") if n.strip()]
        st = training_step_times(args.step_repeats, args.step_iters, device=args.device, losses=names)
        print(f"\ntraining step of the default run (UNet, Adam, input {st['input']}), median of {args.step_repeats} "
              f"rounds of {args.step_iters} steps, each loss paired with CE (CE {st['ce_ms']:.1f} ms per step):")
        print("| loss | ms per step | × CE (paired median) |")
        print("|---|---|---|")
        for name in names:
            print(f"| {name} | {st[f'{name}_ms']:.1f} | {st[f'{name}_over_ce']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
