"""Benchmark: a leave-one-out sweep over the blocks of SmolLM2 on arc_easy
validation (first N documents).

  (a) what a user does today: `surgery prune` a checkpoint per block and run `lm_eval --model hf`
      on it (measured on a subset of blocks; per-variant cost reported);
  (b) plain lm-eval in one process with the `layered` model switching variants in place, with
      lm-eval's own request loop (`fast=False`) and with `layered`'s default shared-context
      loop (b2) (both measured on a subset of blocks);
  (c) the fast path (prepared requests, shared contexts, continuation-only logits, prefix
      reuse), all blocks.
Accuracies are compared on the shared blocks. The physical limit of (c): the blocks each variant
must run (after its unchanged prefix) at the full model's measured cost per block, plus the LM
head and log-softmax at every real continuation token, at their measured cost per token.
(c) includes its one-off preparation and boundary caching; the limit does not.

    python benchmarks/loo_sweep.py [--limit 200] [--subset 0,15,28]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from lm_eval.tasks import TaskManager

from common import BIN, INCLUDE, TASK, save
from lm_eval_layers.evaluate import Evaluator
from lm_eval_layers.loglikelihood import run_batches
from lm_eval_layers.model import LayeredLM
from lm_eval_layers.plan import PlanSpec



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--subset", default="0,15,28", help="blocks measured for (a) and (b)")
    args = parser.parse_args()
    subset = [int(x) for x in args.subset.split(",")]
    lm = LayeredLM(pretrained="smollm2", dtype="float32", device="cpu", batch_size=32, fast=False)
    depth = lm.plan.num_layers
    manager = TaskManager(include_path=INCLUDE)

    a = {}
    with tempfile.TemporaryDirectory() as tmp:
        for k in subset:
            out = Path(tmp) / f"drop{k}"
            start = time.perf_counter()
            subprocess.run([str(BIN / "surgery"), "prune", "smollm2", "--drop", str(k), "--out", str(out)], check=True, capture_output=True)
            subprocess.run(
                [str(BIN / "lm_eval"), "--model", "hf", "--model_args", f"pretrained={out},dtype=float32",
                 "--tasks", TASK, "--include_path", INCLUDE, "--limit", str(args.limit), "--batch_size", "32",
                 "--device", "cpu", "--output_path", str(Path(tmp) / f"res{k}")],
                check=True, capture_output=True, text=True, env=os.environ.copy())
            a[k] = {"seconds": time.perf_counter() - start}
            (result_file,) = (Path(tmp) / f"res{k}").rglob("results_*.json")
            a[k]["acc"] = json.loads(result_file.read_text())["results"][TASK]["acc,none"]

    b: dict[str, dict] = {"plain": {}, "shared_contexts": {}}
    lm_eval_loop = Evaluator(lm, [TASK], manager, args.limit, prepared=False)
    for mode, fast_loop in (("plain", False), ("shared_contexts", True)):
        lm.prepared = fast_loop
        for k in subset:
            r = lm_eval_loop.evaluate(PlanSpec.from_args(drop=k))
            b[mode][k] = {"seconds": r.seconds, "acc": r.metrics[TASK]["acc"]}

    start = time.perf_counter()
    fast = Evaluator(lm, [TASK], manager, args.limit)
    setup = time.perf_counter() - start
    engine = fast.engine
    start = time.perf_counter()  # one pass of the full model over the prepared batches
    run_batches(lm.model, engine.prepared.batches, len(engine.prepared.requests), lm.softmax_dtype)
    full_pass = time.perf_counter() - start
    head = head_seconds(lm.model, engine.prepared.batches)
    per_block = (full_pass - head) / depth
    c = {}
    for k in range(depth):
        r = fast.evaluate(PlanSpec.from_args(drop=k))
        c[k] = {"seconds": r.seconds, "acc": r.metrics[TASK]["acc"], "blocks_run": engine.blocks_run}

    def per(runs: dict) -> float:
        return sum(v["seconds"] for v in runs.values()) / len(runs)

    sweep_c = setup + sum(v["seconds"] for v in c.values())
    sweeps = {"a_estimated": per(a) * depth, "b_plain_estimated": per(b["plain"]) * depth,
              "b2_shared_contexts_estimated": per(b["shared_contexts"]) * depth, "c_measured": sweep_c}
    result = {
        "task": TASK, "limit": args.limit, "blocks": depth, "subset": subset, "batches_c": len(engine.prepared.batches),
        "requests": len(engine.prepared.requests),
        "a_prune_then_lm_eval_hf": a, "b_lm_eval_layered_in_process": b, "c_fast": c, "c_setup_seconds": setup,
        "sweep_seconds": sweeps,
        "ratios": {"a_over_c": sweeps["a_estimated"] / sweep_c, "b_over_c": sweeps["b_plain_estimated"] / sweep_c,
                   "b2_over_c": sweeps["b2_shared_contexts_estimated"] / sweep_c},
        "same_accuracy_b_c": all(b[m][k]["acc"] == c[k]["acc"] for m in b for k in subset),
        "same_accuracy_a_c": all(a[k]["acc"] == c[k]["acc"] for k in subset),
        "physical_limit_share_of_block_compute": sum(v["blocks_run"] for v in c.values()) / (depth * depth),
        "full_model_pass_seconds": full_pass,
        "head_seconds_per_variant": head,
        "block_seconds_full_model": per_block,
        "physical_limit_seconds": sum(per_block * v["blocks_run"] + head for v in c.values()),
    }
    result["c_over_limit"] = sweep_c / result["physical_limit_seconds"]
    save("loo_sweep", result, ("sweep_seconds", "ratios", "same_accuracy_b_c", "same_accuracy_a_c",
                               "physical_limit_share_of_block_compute", "physical_limit_seconds", "c_over_limit",
                               "c_setup_seconds"))


@torch.no_grad()
def head_seconds(model, batches) -> float:
    """The final norm, LM head and log-softmax at every real continuation token of one pass."""
    head, norm = model.get_output_embeddings(), model.model.norm
    total = 0.0
    for batch in batches:
        hidden = torch.randn(1, int(batch.tensors["valid"].sum()), model.config.hidden_size)
        start = time.perf_counter()
        torch.log_softmax(head(norm(hidden)), dim=-1)
        total += time.perf_counter() - start
    return total


if __name__ == "__main__":
    main()
