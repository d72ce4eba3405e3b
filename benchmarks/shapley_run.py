"""Benchmark: a Shapley run (the default estimator, budget 200) over SmolLM2's 30
blocks on arc_easy validation[:N], fast path vs plain path.

The fast path runs the whole budget, as `surgery score` does. The plain path is lm-eval's own
request loop through `layered` (fast=False), one coalition at a time; all 200 coalitions would
take hours on this machine, so it runs a random sample of the same coalitions and its time per
coalition is scaled to the budget. Every example's acc and acc_norm of each sampled coalition
must equal the fast path's: then the Shapley values, the same estimator on the same values,
are the same.

    python benchmarks/shapley_run.py [--limit 200] [--budget 200] [--sample 8]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from lm_eval.tasks import TaskManager

from common import INCLUDE, TASK, save
from lm_eval_layers.evaluate import Evaluator
from lm_eval_layers.importance.games import from_key
from lm_eval_layers.importance.scoring import score_units
from lm_eval_layers.importance.settings import DEFAULT_ESTIMATOR
from lm_eval_layers.importance.store import Store
from lm_eval_layers.importance.task_game import TaskGame, coalition_plan
from lm_eval_layers.model import LayeredLM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--budget", type=int, default=200)
    parser.add_argument("--sample", type=int, default=8, help="coalitions re-run on the plain path")
    args = parser.parse_args()
    lm = LayeredLM(pretrained="smollm2", dtype="float32", device="cpu", batch_size=32, fast=False)
    depth = lm.plan.num_layers
    manager = TaskManager(include_path=INCLUDE)

    start = time.perf_counter()
    fast = Evaluator(lm, [TASK], manager, args.limit)
    with tempfile.TemporaryDirectory() as tmp:
        game = TaskGame(lambda plan: fast.evaluate(plan).examples, depth, "block", "acc", Store(Path(tmp) / "s.sqlite", {}))
        est, used, sample_se = score_units(game, "shapley", args.budget, DEFAULT_ESTIMATOR.value, 0, 3)
        fast_seconds = time.perf_counter() - start
        stored = {k: game.scores(from_key(k, depth))[TASK] for k in used.values}

    rng = np.random.default_rng(0)
    keys = [int(k) for k in rng.choice(list(stored), size=min(args.sample, len(stored)), replace=False)]
    plain, lm_eval_loop = [], Evaluator(lm, [TASK], manager, args.limit, prepared=False)
    for k in keys:
        t0 = time.perf_counter()
        r = lm_eval_loop.evaluate(coalition_plan(from_key(k, depth), "block", depth))
        seconds = time.perf_counter() - t0
        same = all(r.examples[TASK][m] == stored[k][m] for m in ("acc", "acc_norm"))
        plain.append({"coalition": format(k, "08x"), "kept_blocks": int(from_key(k, depth).sum()),
                      "seconds": seconds, "same_examples": same})

    per_plain = sum(p["seconds"] for p in plain) / len(plain)
    result = {
        "task": TASK, "limit": args.limit, "budget": args.budget, "estimator": DEFAULT_ESTIMATOR.value, "evaluations": est.evaluations,
        "fast_seconds": fast_seconds, "plain_seconds_per_coalition": per_plain,
        "plain_seconds_estimated": per_plain * est.evaluations,
        "ratio_plain_over_fast": per_plain * est.evaluations / fast_seconds,
        "same_values_on_sampled_coalitions": all(p["same_examples"] for p in plain),
        "plain_sample": plain,
        "shapley": {"values": est.values.tolist(), "stderr": est.stderr.tolist(), "sample_stderr": sample_se.tolist(),
                    "top5": [int(i) for i in np.argsort(-est.values)[:5]]},
    }
    save("shapley_run", result, ("fast_seconds", "plain_seconds_estimated", "ratio_plain_over_fast",
                                 "same_values_on_sampled_coalitions"))


if __name__ == "__main__":
    main()
