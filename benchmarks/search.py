"""Benchmark: `surgery search` methods side by side on SmolLM2, judged on data the search did not see.

Calibration is the first half of the local WikiText-2 test text; held-out perplexity is measured
on windows of the second half, accuracy on lm-eval tasks. Every method removes K blocks with the
same engine, objective and calibration windows (`--seeds` picks other windows of the first half).

    python benchmarks/search.py [--k 4 8] [--methods greedy beam:2 last bi angular evolve] [--halves]
        [--seeds 0 1 2] [--tokens 16x128] [--heldout 16x256] [--tasks arc_easy_local ...] [--limit 200]

Results are written after each plan is judged, so a stopped run keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from common import RESULTS
from lm_eval_layers.plan import LayerPlan

DATA = Path(os.environ.get("LM_EVAL_LAYERS_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def fp32_folder(work: Path) -> Path:
    """SmolLM2 as an fp32 safetensors folder (loads in seconds, unlike the GGUF)."""
    from lm_eval_layers.arch import num_layers
    from lm_eval_layers.checkpoint.sources import open_model
    from lm_eval_layers.checkpoint.writer import write_variant

    folder = work / "smollm2-fp32"
    if not (folder / "config.json").is_file():
        source = open_model("smollm2")
        write_variant(source, LayerPlan.identity(num_layers(source.config)), folder, dtype=torch.float32, force=True)
    return folder


def split_text(work: Path) -> tuple[Path, str]:
    text = (DATA / "wikitext2" / "wiki.test.raw").read_text(encoding="utf-8")
    half = len(text) // 2
    calibration = work / "calibration.txt"
    calibration.write_text(text[:half], encoding="utf-8")
    return calibration, text[half:]


PREFIX_METHODS = ("greedy", "beam", "last", "bi")  # a run to K removals holds every smaller K in its steps


def bootstrap_ci(values: list[float], seed: int = 0, draws: int = 1000) -> list[float]:
    """95% bootstrap interval of a mean over documents."""
    x = np.asarray(values, dtype=float)
    means = x[np.random.default_rng(seed).integers(0, len(x), size=(draws, len(x)))].mean(axis=1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/search-bench"))
    parser.add_argument("--k", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--methods", nargs="*", default=["greedy", "beam:2", "last", "bi", "angular", "evolve"])
    parser.add_argument("--halves", action="store_true", help="also greedy over attention/MLP halves at each K's parameter share")
    parser.add_argument("--objective", default="nll")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--tokens", default="16x128")
    parser.add_argument("--heldout", default="16x256")
    parser.add_argument("--tasks", nargs="+", default=["arc_easy_local"])
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--json", type=Path, default=RESULTS / "search.json")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    torch.set_grad_enabled(False)

    from lm_eval_layers.evaluate import Evaluator
    from lm_eval_layers.model import LayeredLM
    from lm_eval_layers.search.driver import find_plan, load_model, load_tokenizer
    from lm_eval_layers.search.engine import CalibrationEngine
    from lm_eval_layers.search.settings import SearchSettings
    from lm_eval_layers.search.removable import unit_parameters
    from lm_eval_layers.arch import layout_for
    from lm_eval_layers.calibration import calibration_windows, parse_shape

    folder = fp32_folder(args.work)
    calibration, heldout_text = split_text(args.work)
    model = load_model(str(folder), torch.float32, "cpu")
    count, tokens = parse_shape(args.heldout)
    heldout = CalibrationEngine(model, calibration_windows(load_tokenizer(str(folder)), heldout_text, count, tokens), "nll", 4)
    block = unit_parameters(model, layout_for(model), False)[1]
    total = sum(p.numel() for p in model.parameters())
    lm = LayeredLM(pretrained=str(folder), dtype="float32", device="cpu", batch_size=32)
    evaluator = Evaluator(lm, args.tasks, limit=args.limit)
    full = evaluator.evaluate(LayerPlan.identity(lm.plan.num_layers))
    result = {"settings": vars(args) | {"work": str(args.work), "json": str(args.json)},
              "full_heldout_ppl": math.exp(float(heldout.full_scores.sum()) / heldout.positions),
              "full_acc": {t: full.metrics[t]["acc"] for t in args.tasks},
              "full_acc_ci": {t: bootstrap_ci(full.examples[t]["acc"]) for t in args.tasks}, "runs": []}

    def judge(run: dict) -> None:
        """Held-out perplexity and task accuracy (with bootstrap intervals) of a run's plan; saved at once."""
        plan = LayerPlan.from_dict(run["plan"])
        run["heldout_ppl"] = math.exp(float(heldout.score(plan).sum()) / heldout.positions)
        variant = evaluator.evaluate(plan)
        run["acc"] = {t: variant.metrics[t]["acc"] for t in args.tasks}
        run["acc_ci"] = {t: bootstrap_ci(variant.examples[t]["acc"]) for t in args.tasks}
        result["runs"].append(run)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"{run['method']} K={run['k']} seed={run['seed']}: removed {run['removed']}, held-out ppl "
              f"{run['heldout_ppl']:.2f}, acc {run['acc']}, {run['block_passes']:.0f} block passes", flush=True)

    jobs = [(m, "block", [max(args.k)] if m.partition(':')[0] in PREFIX_METHODS else args.k) for m in args.methods]
    jobs += [("greedy", "halves", [max(args.k)])] if args.halves else []
    for seed in args.seeds:  # every method on one seed's windows before the next seed
        for method, unit, ks in jobs if seed == args.seeds[0] else [j for j in jobs if j[0] != "last"]:
            for k in ks:
                share = f"{100 * (1 - k * block / total):.4f}%"  # halves: the parameters of k blocks
                budget = {"remove": k} if unit == "block" else {"params": share}
                settings = SearchSettings(model=str(folder), out=args.work / f"{method.replace(':', '')}-{unit}-k{k}-s{seed}.json",
                                          method=method, unit=unit, objective=args.objective, calibration=calibration,
                                          tokens=args.tokens, seed=seed, force=True, **budget)
                start = time.perf_counter()
                doc = find_plan(settings)
                wall = time.perf_counter() - start
                steps = doc["steps"]
                # a prefix method's run to K holds each smaller K's answer in its steps (the same the
                # shorter run would give); halves: the first step within that K's parameter share
                wanted = [x for x in args.k if x <= k] if method.partition(':')[0] in PREFIX_METHODS else [k]
                for want in wanted:
                    if unit == "block" and method.partition(':')[0] in PREFIX_METHODS:
                        step = steps[want - 1]
                    elif unit == "halves":
                        step = next(s for s in steps if s["params"] <= (1 - want * block / total) * total)
                    else:
                        step = steps[-1]
                    judge({"method": method, "unit": unit, "k": want, "seed": seed, "removed": step["removed"],
                           "plan": step["plan"], "calibration_objective": step["objective"],
                           "params": step["params"], "block_passes": step["block_passes"],
                           "search_seconds": step["seconds"], "wall_seconds": wall if want == k else None,
                           "margin_ci": step["margin_ci"]})

    print(f"\nfull model: held-out ppl {result['full_heldout_ppl']:.2f}, acc {result['full_acc']}")
    print("| method | unit | K | seed | removed | held-out ppl | " + " | ".join(args.tasks) + " | block passes | search s |")
    for r in result["runs"]:
        print(f"| {r['method']} | {r['unit']} | {r['k']} | {r['seed']} | {r['removed']} | {r['heldout_ppl']:.2f} | "
              + " | ".join(f"{r['acc'][t]:.3f}" for t in args.tasks) + f" | {r['block_passes']:.0f} | {r['search_seconds']:.0f} |")


if __name__ == "__main__":
    main()
