"""`make demo`: SmolLM2-135M (the embedded default) and a few of its variants on a real task.

Loads the model once, then evaluates the full model, single-block removals (an early
"cornerstone" block vs a middle one), a deep 4-block prune, and the two expansion presets,
printing one table and writing the numbers as JSON.

    python -m lm_eval_layers.demo [--limit 100] [--task arc_easy_local] [--dtype float32]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from lm_eval_layers.task_data import ENV
from lm_eval_layers.evaluate import Evaluator
from lm_eval_layers.model import LayeredLM
from lm_eval_layers.plan import PlanSpec

# One of each lesson: a cornerstone (block 1; block 0 teaches the same at the same cost), a
# redundant middle block, a deep prune, a function-preserving expansion and the S-strategy
# preset. A variant costs the blocks after its first change (the prefix is reused), so early
# changes are the expensive rows.
VARIANTS = [
    ("full model", {}),
    ("drop block 1", {"drop": 1}),
    ("drop block 15", {"drop": 15}),
    ("drop blocks 24-27", {"drop": "24-27"}),
    ("preset llama-pro:4", {"preset": "llama-pro:4"}),
    ("preset slayer", {"preset": "slayer"}),
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="arc_easy_local")
    parser.add_argument("--limit", type=int, default=100, help="documents of the task to score")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--json", type=Path, default=Path("out/demo.json"))
    args = parser.parse_args(argv)
    start = time.perf_counter()
    console = Console()
    if not console.is_terminal:  # a log keeps each line and table row on one line (rich would wrap at 80)
        console = Console(width=240, soft_wrap=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    source = os.environ.get(ENV) or "the Hugging Face hub"
    console.print(f"[bold]SmolLM2-135M-Instruct[/] (GGUF Q4_1, {args.dtype}, {device}); {args.task}, "
                  f"first {args.limit} documents, data from {source}")

    console.print("loading the model…", highlight=False)
    with console.status("loading the model…"):
        lm = LayeredLM(pretrained="smollm2", dtype=args.dtype, device=device, batch_size=args.batch_size)
    loaded = time.perf_counter()
    plans = [(name, PlanSpec.from_args(**kw)) for name, kw in VARIANTS]
    console.print(f"model loaded in {loaded - start:.0f} s; preparing requests and running the full model once…",
                  highlight=False)
    with console.status("preparing requests and running the full model once…"):
        evaluator = Evaluator(lm, [args.task], limit=args.limit)
    prepared = time.perf_counter()
    # Preparing runs the full model over every shared context and keeps its hidden states, which
    # each variant starts from at its first changed block: that pass is the full model's real
    # cost, so it is reported here and not hidden in the per-variant seconds below.
    console.print(f"set-up: model loaded in {loaded - start:.0f} s; requests prepared and the full model run once "
                  f"(its hidden states are what every variant reuses) in {prepared - loaded:.0f} s")
    if evaluator.fallback:
        console.print(f"lm-eval's own loop for every variant: {evaluator.fallback}")
    results = []
    for k, (name, plan) in enumerate(plans, 1):  # a line per variant, on a terminal and in a log
        with console.status(f"variant {k}/{len(plans)}: {name}…"):
            results.append(evaluator.evaluate(plan, name))
        acc = results[-1].metrics[args.task].get("acc", float("nan"))
        console.print(f"variant {k}/{len(plans)}: {name}: acc {acc:.3f} ({results[-1].seconds:.1f} s)", highlight=False)

    table = Table(title=f"{args.task}, {args.limit} documents (chance 0.25)",
                  caption="seconds: this variant's own work, after the set-up above")
    for col in ("variant", "blocks", "acc", "acc_norm", "Δ acc", "seconds", "plan"):
        table.add_column(col, justify="left" if col in ("variant", "plan") else "right")
    base = results[0].metrics[args.task]["acc"]
    rows = []
    for r in results:
        m = r.metrics[args.task]
        acc, acc_norm = m["acc"], m.get("acc_norm", float("nan"))
        table.add_row(r.name, str(len(r.plan.slots)), f"{acc:.3f}", f"{acc_norm:.3f}", f"{acc - base:+.3f}",
                      f"{r.seconds:.1f}", r.plan.describe())
        rows.append({"variant": r.name, "blocks": len(r.plan.slots), "acc": acc, "acc_norm": acc_norm,
                     "seconds": r.seconds, "plan": r.plan.to_dict()})
    console.print(table)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"task": args.task, "limit": args.limit, "dtype": args.dtype, "load_seconds": loaded - start,
                                     "prepare_seconds": prepared - loaded, "variants": rows}, indent=2))
    console.print(f"JSON written to {args.json}; {time.perf_counter() - start:.0f} s in all")


if __name__ == "__main__":
    main()
