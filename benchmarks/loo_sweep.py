"""Benchmark: a leave-one-out sweep over the blocks of SmolLM2 on arc_easy (first N documents).

  (a) what a user does today: `surgery prune` a checkpoint per block and run `lm_eval --model hf`
      on it (measured on a subset of blocks; per-variant cost reported);
  (b) plain lm-eval in one process with the `layered` model switching variants in place
      (measured on a subset of blocks);
  (c) the fast path (prepared requests, continuation-only logits, prefix reuse), all blocks.
Accuracies of (b) and (c) are compared on the shared blocks; the physical limit is stated as the
share of block computations a variant actually needs.

    python benchmarks/loo_sweep.py [--limit 100] [--subset 0,15,28]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lm_eval.tasks import TaskManager

from lm_eval_layers.evaluate import evaluate_plans
from lm_eval_layers.fast import FastEvaluator, PreparedTasks
from lm_eval_layers.model import LayeredLM
from lm_eval_layers.plan import PlanSpec

HERE = Path(__file__).parent
TASKS = HERE.parent / "tasks"
BIN = Path(sys.executable).parent
TASK = "arc_easy_local"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--subset", default="0,15,28", help="blocks measured for (a) and (b)")
    parser.add_argument("--json", type=Path, default=HERE / "results" / "loo_sweep.json")
    args = parser.parse_args()
    subset = [int(x) for x in args.subset.split(",")]
    lm = LayeredLM(pretrained="smollm2", dtype="float32", device="cpu", batch_size=32)
    depth = lm.plan.num_layers
    manager = TaskManager(include_path=str(TASKS))

    a = {}
    with tempfile.TemporaryDirectory() as tmp:
        for k in subset:
            out = Path(tmp) / f"drop{k}"
            start = time.perf_counter()
            subprocess.run([str(BIN / "surgery"), "prune", "smollm2", "--drop", str(k), "--out", str(out)], check=True, capture_output=True)
            res = subprocess.run(
                [str(BIN / "lm_eval"), "--model", "hf", "--model_args", f"pretrained={out},dtype=float32",
                 "--tasks", TASK, "--include_path", str(TASKS), "--limit", str(args.limit), "--batch_size", "32",
                 "--device", "cpu", "--output_path", str(Path(tmp) / f"res{k}")],
                check=True, capture_output=True, text=True, env=os.environ.copy())
            a[k] = {"seconds": time.perf_counter() - start}
            (result_file,) = (Path(tmp) / f"res{k}").rglob("results_*.json")
            a[k]["acc"] = json.loads(result_file.read_text())["results"][TASK]["acc,none"]

    b = {}
    for k in subset:
        start = time.perf_counter()
        r = evaluate_plans(lm, [(str(k), PlanSpec.from_args(drop=k))], [TASK], manager, limit=args.limit)[0]
        b[k] = {"seconds": time.perf_counter() - start, "acc": r.metrics[TASK]["acc,none"]}

    start = time.perf_counter()
    fast = FastEvaluator(lm, PreparedTasks(lm, [TASK], manager, args.limit))
    setup = time.perf_counter() - start
    c = {}
    for k in range(depth):
        start = time.perf_counter()
        metrics, _ = fast.evaluate(PlanSpec.from_args(drop=k).resolve(depth))
        c[k] = {"seconds": time.perf_counter() - start, "acc": metrics[TASK]["acc"], "blocks_run": fast.blocks_run}

    per_a = sum(v["seconds"] for v in a.values()) / len(a)
    per_b = sum(v["seconds"] for v in b.values()) / len(b)
    sweep_c = setup + sum(v["seconds"] for v in c.values())
    result = {
        "task": TASK, "limit": args.limit, "blocks": depth, "subset": subset,
        "a_prune_then_lm_eval_hf": a, "b_lm_eval_layered_in_process": b, "c_fast": c, "c_setup_seconds": setup,
        "sweep_seconds": {"a_estimated": per_a * depth, "b_estimated": per_b * depth, "c_measured": sweep_c},
        "ratios": {"a_over_c": per_a * depth / sweep_c, "b_over_c": per_b * depth / sweep_c},
        "same_accuracy_b_c": all(b[k]["acc"] == c[k]["acc"] for k in subset),
        "same_accuracy_a_c": all(a[k]["acc"] == c[k]["acc"] for k in subset),
        "physical_limit_share_of_block_compute": sum(v["blocks_run"] for v in c.values()) / (depth * depth),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("sweep_seconds", "ratios", "same_accuracy_b_c", "same_accuracy_a_c",
                                             "physical_limit_share_of_block_compute", "c_setup_seconds")}, indent=2))


if __name__ == "__main__":
    main()
