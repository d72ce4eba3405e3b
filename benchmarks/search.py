"""Benchmark: `surgery search` methods side by side on SmolLM2, judged on data the search did not see.

Calibration is the first half of the local WikiText-2 test text; held-out perplexity is measured
on windows of the second half, accuracy on lm-eval tasks. Every method removes K blocks with the
same engine, objective and calibration windows (`--seeds` picks other windows of the first half).

    python benchmarks/search.py [--k 4 8] [--methods greedy last bi angular beam:2] [--seeds 0 1 2]
        [--tokens 16x128] [--heldout 16x256] [--tasks arc_easy_local] [--limit 200]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/search-bench"))
    parser.add_argument("--k", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--methods", nargs="+", default=["greedy", "beam:2", "last", "bi", "angular"])
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
    from lm_eval_layers.calibration import calibration_windows, parse_shape

    folder = fp32_folder(args.work)
    calibration, heldout_text = split_text(args.work)
    runs = []
    for k in args.k:
        for method in args.methods:
            for seed in args.seeds if method not in ("last",) else args.seeds[:1]:
                settings = SearchSettings(model=str(folder), out=args.work / f"{method.replace(':', '')}-k{k}-s{seed}.json",
                                          remove=k, method=method, objective=args.objective, calibration=calibration,
                                          tokens=args.tokens, seed=seed, force=True)
                start = time.perf_counter()
                doc = find_plan(settings)
                wall = time.perf_counter() - start
                print(f"{method} K={k} seed={seed}: removed {doc['steps'][-1]['removed']} in {doc['search_seconds']:.0f} s, "
                      f"{doc['block_passes']:.0f} block passes", flush=True)
                runs.append({"method": method, "k": k, "seed": seed, "removed": doc["steps"][-1]["removed"],
                             "plan": doc["plan"], "calibration_objective": doc["steps"][-1]["objective"],
                             "block_passes": doc["block_passes"], "as_written_block_passes": doc["as_written_block_passes"],
                             "search_seconds": doc["search_seconds"], "wall_seconds": wall})

    model = load_model(str(folder), torch.float32, "cpu")
    count, tokens = parse_shape(args.heldout)
    windows = calibration_windows(load_tokenizer(str(folder)), heldout_text, count, tokens)
    heldout = CalibrationEngine(model, windows, "nll", batch_size=4)
    full_ppl = math.exp(float(heldout.full_scores.sum()) / heldout.positions)
    for run in runs:
        run["heldout_ppl"] = math.exp(float(heldout.score(LayerPlan.from_dict(run["plan"])).sum()) / heldout.positions)
    del model, heldout

    lm = LayeredLM(pretrained=str(folder), dtype="float32", device="cpu", batch_size=32)
    evaluator = Evaluator(lm, args.tasks, limit=args.limit)
    full = evaluator.evaluate(LayerPlan.identity(lm.plan.num_layers)).metrics
    for run in runs:
        metrics = evaluator.evaluate(LayerPlan.from_dict(run["plan"])).metrics
        run["acc"] = {t: metrics[t]["acc"] for t in args.tasks}
    result = {"settings": vars(args) | {"work": str(args.work), "json": str(args.json)}, "full_heldout_ppl": full_ppl,
              "full_acc": {t: full[t]["acc"] for t in args.tasks}, "runs": runs}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nfull model: held-out ppl {full_ppl:.2f}, acc {result['full_acc']}")
    print("| method | K | seed | removed | held-out ppl | " + " | ".join(args.tasks) + " | block passes | search s |")
    for r in runs:
        print(f"| {r['method']} | {r['k']} | {r['seed']} | {r['removed']} | {r['heldout_ppl']:.2f} | "
              + " | ".join(f"{r['acc'][t]:.3f}" for t in args.tasks) + f" | {r['block_passes']:.0f} | {r['search_seconds']:.0f} |")


if __name__ == "__main__":
    main()
