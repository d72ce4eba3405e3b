"""Benchmark: what SmolLM2-135M's variants cost, with `surgery bench`, and whether the in-memory
`layered` variant costs what the written `surgery prune` / `expand` folder of the same plan
costs (`--checkpoints`: each plan is also written and timed as a plain checkpoint).

Two runs of `surgery bench` on SmolLM2 in fp32 as a safetensors folder (made from the embedded
GGUF with `surgery prune smollm2 --keep 0-29`, so every worker loads the same bytes):
  table: the full model, drop=26-29 (4 blocks), drop=20-27 (8), drop=10-27 (18) and
         preset=llama-pro:4 (4 function-preserving blocks added), each also as a checkpoint;
         accuracy on the first 100 arc_easy test documents; `--repeats` (5) per row.
  pairs: drop=20-27 and drop=10-27 in memory and as checkpoints, `--pair-repeats` (10) per row.
In every repeat a plan's in-memory row and its checkpoint row run back to back, so their
per-repeat ratio cancels the load drift of a shared machine: summary.json gives its median and
IQR beside the ratio of the medians, and the FLOP-predicted pp speed-up against the measured one.

    nice python benchmarks/bench_smollm2.py [--work /tmp/bench-smollm2] [--threads 1] [--reuse]

Writes benchmarks/results/bench/smollm2.json and smollm2_pairs.json (bench.json files),
smollm2.png and summary.json. `--reuse` summarises the existing files without measuring.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
BIN = Path(sys.executable).parent
OUT = HERE / "results" / "bench"
TABLE = ["", "drop=26-29", "drop=20-27", "drop=10-27", "preset=llama-pro:4"]
PAIRS = ["drop=20-27", "drop=10-27"]
SPEEDS = ("pp_tokens_per_s", "tg_tokens_per_s")


def bench(model: Path, plans: list[str], repeats: int, threads: int, out: str, extra: list[str]) -> None:
    args = [arg for plan in plans for arg in ("--plans", plan)]
    subprocess.run([str(BIN / "surgery"), "bench", str(model), *args, "--checkpoints", "--threads", str(threads),
                    "--repeats", str(repeats), "--out", str(OUT / out), "--force", *extra], check=True)


def in_memory_vs_checkpoint(rows: list[dict]) -> dict:
    """Per plan and speed: in-memory over checkpoint, as the ratio of the medians and as the
    median (and IQR) of the per-repeat ratios; peak memory as the ratio."""
    memory = {r["plan"]: r for r in rows if r["kind"] == "in-memory"}
    out = {}
    for ckpt in (r for r in rows if r["kind"] == "checkpoint"):
        mem = memory[ckpt["plan"]]
        entry = {"peak_memory_ratio": mem["peak_memory_mb"] / ckpt["peak_memory_mb"]}
        for key in SPEEDS:
            paired = [a / b for a, b in zip(mem["samples"][key], ckpt["samples"][key])]
            q1, _, q3 = statistics.quantiles(paired, n=4, method="inclusive")
            entry[key] = {"ratio_of_medians": mem[key] / ckpt[key], "median_paired_ratio": statistics.median(paired),
                          "paired_ratio_iqr": q3 - q1}
        out[ckpt["plan"]] = entry
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-smollm2"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--pair-repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="1: steadier than 2 on a machine shared with other jobs")
    parser.add_argument("--reuse", action="store_true", help="summarise the existing result files, measure nothing")
    args = parser.parse_args()
    if not args.reuse:
        model = args.work / "smollm2-fp32"
        if not (model / "model.safetensors").is_file():
            subprocess.run([str(BIN / "surgery"), "prune", "smollm2", "--keep", "0-29", "--out", str(model), "--force"],
                           check=True)
        OUT.mkdir(parents=True, exist_ok=True)
        bench(model, TABLE, args.repeats, args.threads, "smollm2.json",
              ["--tasks", "arc_easy_local", "--limit", "100", "--plot", str(OUT / "smollm2.png")])
        bench(model, PAIRS, args.pair_repeats, args.threads, "smollm2_pairs.json", [])
    table = json.loads((OUT / "smollm2.json").read_text())["plans"]
    pairs = json.loads((OUT / "smollm2_pairs.json").read_text())["plans"]
    summary = {
        "predicted_vs_measured_pp": {
            f"{r['plan']} ({name})": {"predicted": r["predicted_speedup_pp"], "measured": r["measured_speedup_pp"],
                                      "miss": r["measured_speedup_pp"] / r["predicted_speedup_pp"] - 1}
            for name, rows in (("table", table), ("pairs", pairs)) for r in rows
            if r["kind"] == "in-memory" and r["plan"] != "full"},
        "in_memory_vs_checkpoint": {"table": in_memory_vs_checkpoint(table), "pairs": in_memory_vs_checkpoint(pairs)},
    }
    (OUT / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
