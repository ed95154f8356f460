"""``make check-statistics``: the verdict's procedure checked on simulated comparisons, not assumed.

A simulated comparison has ``n_seeds`` seeds × ``n_volumes`` test volumes per method. Each trained network (method,
seed) gets its own random effect (standard deviation ``seed_sd``), each of its volumes its own noise
(``volume_sd``); a volume effect shared by the methods cancels in the paired differences and is left out. The
defaults are of the size seen in the ``paper`` comparison on the default dataset (ECE of CE and MbLS over 5 seeds ×
3 volumes: seed-to-seed standard deviation of a run's mean 0.007–0.008, residual per volume 0.005–0.007).

For every simulated comparison the seed-level procedure of the report (a difference counts when the exact
sign-flip p over the seed means is below α and the two-level bootstrap interval excludes 0; equivalence by TOST
on the seed means) and the former pair-level procedure (Wilcoxon over the (seed, volume) pairs and a bootstrap
over the pairs) decide; the rates are counted:

- under the null (no method effect): the false-positive rate of each procedure's "difference";
- under a known effect: the coverage of each 95 % interval;
- at a true difference equal to the margin: how often equivalence is (wrongly) declared.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from pipeline.compare import seed_statistics as ss
from pipeline.compare.statistics import bootstrap_ci, wilcoxon_p

SEED_SD = 0.007
VOLUME_SD = 0.006


def simulate_differences(rng: np.random.Generator, n_seeds: int, n_volumes: int, effect: float = 0.0,
                         seed_sd: float = SEED_SD, volume_sd: float = VOLUME_SD) -> np.ndarray:
    """``n_seeds × n_volumes`` paired differences reference − other of one simulated comparison: the true
    ``effect`` plus the difference of the two networks' seed effects plus the difference of their volume noise."""
    networks = rng.normal(0, seed_sd, size=(2, n_seeds, 1))
    noise = rng.normal(0, volume_sd, size=(2, n_seeds, n_volumes))
    values = networks + noise
    return effect + values[0] - values[1]


def decide(d: np.ndarray, margin: float, alpha: float = 0.05, n_resamples: int = 2000, seed: int = 0) -> dict:
    """Both procedures on one comparison's differences (``seeds × volumes``): their decisions and intervals."""
    per_seed = d.mean(axis=1)
    low, high = ss.hierarchical_bootstrap(list(d), n_resamples=n_resamples, seed=seed)
    p = ss.sign_flip_p(per_seed)
    pair_low, pair_high = bootstrap_ci(d.ravel(), n_resamples=n_resamples, seed=seed)
    pair_p = wilcoxon_p(d.ravel())
    return {"seed_detects": p < alpha and (low > 0 or high < 0), "seed_ci": (low, high),
            "seed_equivalent": ss.tost_p(per_seed, margin) < alpha,
            "pair_detects": pair_p < alpha and (pair_low > 0 or pair_high < 0), "pair_ci": (pair_low, pair_high)}


def check_procedure(n_sims: int = 500, n_seeds: int = 10, n_volumes: int = 3, effect: float = 0.01,
                    margin: float = 0.005, alpha: float = 0.05, seed: int = 0, n_resamples: int = 2000,
                    seed_sd: float = SEED_SD, volume_sd: float = VOLUME_SD) -> dict:
    """Run ``n_sims`` simulated comparisons of each kind (null, known ``effect``, true difference = ``margin``).

    Returns:
        ``{"n_sims", "n_seeds", "n_volumes", "seed_false_positive", "pair_false_positive", "seed_coverage",
        "pair_coverage", "seed_false_equivalence", "mc_se"}`` (rates in [0, 1]; ``mc_se``: the Monte-Carlo standard
        error of a rate of ``alpha``).
    """
    rng = np.random.default_rng(seed)
    counts = dict.fromkeys(("seed_fp", "pair_fp", "seed_cover", "pair_cover", "seed_false_eq"), 0)
    for i in range(n_sims):
        null = decide(simulate_differences(rng, n_seeds, n_volumes, 0.0, seed_sd, volume_sd), margin, alpha,
                      n_resamples, seed=i)
        counts["seed_fp"] += null["seed_detects"]
        counts["pair_fp"] += null["pair_detects"]
        known = decide(simulate_differences(rng, n_seeds, n_volumes, effect, seed_sd, volume_sd), margin, alpha,
                       n_resamples, seed=i)
        counts["seed_cover"] += known["seed_ci"][0] <= effect <= known["seed_ci"][1]
        counts["pair_cover"] += known["pair_ci"][0] <= effect <= known["pair_ci"][1]
        edge = decide(simulate_differences(rng, n_seeds, n_volumes, margin, seed_sd, volume_sd), margin, alpha,
                      n_resamples, seed=i)
        counts["seed_false_eq"] += edge["seed_equivalent"]
    rate = {k: v / n_sims for k, v in counts.items()}
    return {"n_sims": n_sims, "n_seeds": n_seeds, "n_volumes": n_volumes, "effect": effect, "margin": margin,
            "seed_false_positive": rate["seed_fp"], "pair_false_positive": rate["pair_fp"],
            "seed_coverage": rate["seed_cover"], "pair_coverage": rate["pair_cover"],
            "seed_false_equivalence": rate["seed_false_eq"], "mc_se": math.sqrt(alpha * (1 - alpha) / n_sims)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="make check-statistics", description=__doc__.split("\n\n")[0])
    p.add_argument("--sims", type=int, default=2000, help="simulated comparisons of each kind (default 2000)")
    p.add_argument("--seeds", default="5,10", help="seed counts to simulate (default 5,10)")
    p.add_argument("--volumes", type=int, default=3, help="test volumes per seed (default 3, as the default dataset)")
    args = p.parse_args(argv)
    print(f"simulated comparisons: {args.sims} of each kind, {args.volumes} volumes per seed, seed sd {SEED_SD}, "
          f"volume sd {VOLUME_SD}, effect 0.01 for the coverage, margin 0.005, alpha 0.05")
    print(f"{'seeds':>5}  {'FPR seed-level':>14}  {'FPR pairs':>9}  {'coverage seed-level':>19}  "
          f"{'coverage pairs':>14}  {'false equivalence':>17}  {'s':>5}")
    for n in (int(s) for s in args.seeds.split(",")):
        t0 = time.time()
        r = check_procedure(args.sims, n, args.volumes)
        print(f"{n:>5}  {r['seed_false_positive']:>14.3f}  {r['pair_false_positive']:>9.3f}  "
              f"{r['seed_coverage']:>19.3f}  {r['pair_coverage']:>14.3f}  {r['seed_false_equivalence']:>17.3f}  "
              f"{time.time() - t0:>5.0f}")
    print(f"(Monte-Carlo standard error of a rate near 0.05: {math.sqrt(0.05 * 0.95 / args.sims):.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
