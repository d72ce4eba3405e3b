"""Benchmark: what greedy search (SLEB) costs on the fast path, against SLEB's loop as written.

SmolLM2 fp32, remove K = 6 of 30 blocks (first and last protected), objective nll on 16 × 128
calibration tokens. Three measurements in one run, on the same windows:

1. The cost of one block pass (one block over every window) and of the fixed part every
   candidate pays (embedding, final norm, head, log-softmax): the tail of the stack is timed from
   a cached boundary with 1 and with 29 blocks; block = (t29 − t1) / 28, fixed = t1 − block.
2. `surgery search --method greedy` (the library call): block passes against SLEB's as-written
   count, and its wall time against block passes × block cost (the issue's 1.15× target), and
   against block passes × block cost + candidates × fixed cost.
3. SLEB's loop as written for the first `--as-written-steps` steps: every candidate runs the whole
   kept stack from the embeddings; the same choices must come out, and the wall ratio is measured.

    python benchmarks/search_cost.py [--k 6] [--tokens 16x128] [--as-written-steps 2]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from common import RESULTS
from search import fp32_folder, split_text


def best_of(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/search-bench"))
    parser.add_argument("--k", type=int, default=6)
    parser.add_argument("--tokens", default="16x128")
    parser.add_argument("--as-written-steps", type=int, default=2)
    parser.add_argument("--json", type=Path, default=RESULTS / "search_cost.json")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    torch.set_grad_enabled(False)

    from lm_eval_layers.calibration import calibration_windows, parse_shape
    from lm_eval_layers.plan import LayerPlan
    from lm_eval_layers.search.driver import find_plan, load_model, load_tokenizer
    from lm_eval_layers.search.engine import CalibrationEngine
    from lm_eval_layers.search.settings import SearchSettings
    from lm_eval_layers.search.removable import plan_without

    folder = fp32_folder(args.work)
    calibration, _ = split_text(args.work)
    count, tokens = parse_shape(args.tokens)
    model = load_model(str(folder), torch.float32, "cpu")
    windows = calibration_windows(load_tokenizer(str(folder)), calibration.read_text(encoding="utf-8"), count, tokens)
    engine = CalibrationEngine(model, windows, "nll", batch_size=4)
    depth = engine.num_layers
    engine.full_scores  # noqa: B018 — the full pass, caching every boundary

    def tail(n: int):
        plan = LayerPlan(depth, LayerPlan.identity(depth).slots[depth - n:])
        return lambda: engine._run(plan, depth - n)

    t1, tn = best_of(tail(1)), best_of(tail(depth - 1))
    block = (tn - t1) / (depth - 2)
    fixed = t1 - block
    full = best_of(lambda: engine._run(LayerPlan.identity(depth), 0))
    print(f"block pass {block:.3f} s, fixed part per candidate {fixed:.3f} s (= {fixed / block:.1f} block passes), "
          f"full model {full:.3f} s", flush=True)

    settings = SearchSettings(model=str(folder), out=args.work / f"cost-greedy-k{args.k}.json", remove=args.k,
                              method="greedy", calibration=calibration, tokens=args.tokens, force=True)
    doc = find_plan(settings)
    wall, passes = doc["search_seconds"], doc["block_passes"]
    computed = doc["evaluations"]["computed"]
    print(f"greedy K={args.k}: removed {doc['steps'][-1]['removed']}, {passes:.0f} block passes "
          f"({passes / doc['as_written_block_passes']:.2f}× of SLEB as written, {doc['as_written_block_passes']}), "
          f"{wall:.1f} s", flush=True)

    # SLEB as written: every candidate is the whole kept stack, run from the embeddings
    plain = CalibrationEngine(model, windows, "nll", batch_size=4, cache_bytes=0)
    removed: list[int] = []
    plain_passes, start = 0, time.perf_counter()
    for _ in range(args.as_written_steps):
        best = None
        for unit in range(1, depth - 1):
            if unit in removed:
                continue
            plan = plan_without(depth, [*removed, unit])
            score = float(plain._run(plan, 0).sum())
            plain_passes += len(plan.slots)
            if best is None or score < best[0]:
                best = (score, unit)
        assert best is not None
        removed.append(best[1])
    plain_wall = time.perf_counter() - start
    fast_wall = doc["steps"][args.as_written_steps - 1]["seconds"]
    fast_passes = doc["steps"][args.as_written_steps - 1]["block_passes"]
    same = removed == doc["steps"][args.as_written_steps - 1]["removed"]
    print(f"as written, {args.as_written_steps} steps: removed {removed} (same as greedy: {same}), "
          f"{plain_passes} block passes in {plain_wall:.1f} s; fast path {fast_passes:.0f} in {fast_wall:.1f} s", flush=True)

    result = {
        "settings": {"k": args.k, "tokens": args.tokens, "model": "SmolLM2-135M fp32", "threads": torch.get_num_threads()},
        "block_seconds": block, "fixed_seconds": fixed, "full_model_seconds": full,
        "greedy": {"removed": doc["steps"][-1]["removed"], "block_passes": passes,
                   "as_written_block_passes": doc["as_written_block_passes"],
                   "pass_ratio": passes / doc["as_written_block_passes"], "candidates": computed, "seconds": wall,
                   "wall_over_passes": wall / (passes * block),
                   "wall_over_passes_and_fixed": wall / (passes * block + computed * fixed)},
        "as_written": {"steps": args.as_written_steps, "removed": removed, "same_choices": same,
                       "block_passes": plain_passes, "seconds": plain_wall,
                       "fast_block_passes": fast_passes, "fast_seconds": fast_wall,
                       "wall_ratio_fast_over_as_written": fast_wall / plain_wall},
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
