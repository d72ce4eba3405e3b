"""Benchmark: Shapley estimators against ground truth on synthetic layer games, side by side.

Games (per n, weights drawn with seed n):
- `cornerstone`: accuracy collapses to chance without units 0 and 1, otherwise a saturating
  function of the kept units (the shape measured on real models);
- `noisy-cornerstone`: the same with fixed per-coalition noise (σ = 0.003, like a benchmark's
  sample error);
- `redundant-pairs`: units 2k and 2k+1 are interchangeable (a pair counts while either is kept),
  through a saturating curve;
- `cornerstone-tail`: one cornerstone (unit 1) plus weights decaying along the stack through a
  saturating curve (a long tail of small late units).
Ground truth: exact enumeration at n = 16; at n = 32, 200,000 evaluations of antithetic
permutations (an estimator not under comparison at that budget; its own error is printed).

Estimators: ours (`ramc`, `ramc-kadd`, `regression`, `permutation`, and `window` once per cell)
and, when shapiq is installed, every `shapiq:NAME` of `lm_eval_layers.importance.shapiq_adapter`
on the same games, budgets and seeds. Per cell: median relative L2 error over the seeds with a
95% bootstrap interval of that median, and the coverage of nominal 95% intervals (only where the
estimator reports intervals and the error is not zero). The default is the built-in estimator
with the lowest median error over the whole grid.

    python benchmarks/estimator_accuracy.py [--repeats 10] [--no-shapiq]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
import warnings
from pathlib import Path

import numpy as np

from lm_eval_layers.importance import estimators as E
from lm_eval_layers.importance.games import (CachedGame, CornerstoneGame, CornerstoneTailGame, NoisyGame,
                                             RedundantPairsGame)
from lm_eval_layers.importance.scoring import estimate
from lm_eval_layers.importance.settings import Estimator
from lm_eval_layers.importance.shapiq_adapter import APPROXIMATORS, PREFIX

HERE = Path(__file__).parent
BUDGETS = {16: [200, 400, 800], 32: [400, 800, 1600]}
OURS = [e.value for e in Estimator]


def games(n: int) -> dict:
    rng = np.random.default_rng(n)
    w = rng.gamma(2.0, 0.02, n)
    w[0] *= 5
    corner = CornerstoneGame(w, [0, 1])
    return {"cornerstone": corner, "noisy-cornerstone": NoisyGame(corner, 0.003, n),
            "redundant-pairs": RedundantPairsGame(rng.gamma(2.0, 0.02, n)),
            "cornerstone-tail": CornerstoneTailGame(n, cornerstone=1)}


def truth(game, n: int) -> np.ndarray:
    if n <= 16:
        return E.exact(CachedGame(game)).values
    return E.permutation(CachedGame(game), 200_000, seed=12345).values


def median_ci(errors: list[float], seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval of the median error over seeds."""
    rng = np.random.default_rng(seed)
    boots = np.median(rng.choice(errors, (2000, len(errors))), axis=1)
    return float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-shapiq", action="store_true", help="only the built-in estimators")
    parser.add_argument("--json", type=Path, default=HERE / "results" / "estimator_accuracy.json")
    args = parser.parse_args()
    methods = OURS + ["window"]
    if not args.no_shapiq and importlib.util.find_spec("shapiq") is not None:
        methods += [PREFIX + name for name in APPROXIMATORS]
        warnings.filterwarnings("ignore")  # shapiq warns about budgets and sampling weights on every call
    rows = []
    start = time.perf_counter()
    for n, budgets in BUDGETS.items():
        for name, game in games(n).items():
            phi = truth(game, n)
            for budget in budgets:
                for method in methods:
                    errs, cover, evals, seconds = [], [], [], []
                    for seed in range(1 if method == "window" else args.repeats):
                        t = time.perf_counter()
                        if method == "window":
                            est = E.window(CachedGame(game), 3)
                        else:
                            est = estimate("shapley", CachedGame(game), budget, method, seed, 3)
                        seconds.append(time.perf_counter() - t)
                        err = float(np.linalg.norm(est.values - phi) / np.linalg.norm(phi))
                        errs.append(err)
                        if np.any(est.stderr > 0) and err > 1e-9:
                            lo, hi = est.ci()
                            cover.append(float(np.mean((phi >= lo) & (phi <= hi))))
                        evals.append(est.evaluations)
                    lo_err, hi_err = median_ci(errs)
                    row = {"n": n, "game": name, "budget": budget, "method": method,
                           "evaluations": int(np.median(evals)), "median_rel_error": float(np.median(errs)),
                           "median_ci": [lo_err, hi_err], "coverage_95": float(np.mean(cover)) if cover else None,
                           "seconds": float(np.mean(seconds))}
                    rows.append(row)
                    print(f"n={n:2d} {name:18s} budget={budget:5d} {method:28s} err={row['median_rel_error']:.4f} "
                          f"[{lo_err:.4f}, {hi_err:.4f}] cover={row['coverage_95'] if cover else float('nan'):.2f} "
                          f"{row['seconds']:.2f}s", flush=True)
    overall = {m: float(np.median([r["median_rel_error"] for r in rows if r["method"] == m])) for m in methods}
    default = min(OURS, key=overall.__getitem__)
    print("median error over the grid:", ", ".join(f"{m} {e:.4f}" for m, e in sorted(overall.items(), key=lambda x: x[1])))
    print("default (lowest among built-in):", default)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"repeats": args.repeats, "seconds": time.perf_counter() - start,
                                     "overall_median_error": overall, "default": default, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
