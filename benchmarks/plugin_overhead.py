"""Benchmark: the stock `lm_eval` console script with `--model layered` and an
empty plan against `--model hf` on SmolLM2 (fp32, CPU), arc_easy validation[:N], batch 32.

`layered` runs lm-eval's loglikelihood requests with shared contexts by default; with
`fast=False` it is lm-eval's own loop, which isolates the plugin's overhead (plan resolution,
registration). Runs alternate between the three so drift hits all alike; wall time of the whole
process (what a user waits for) and the per-sample log-likelihoods are compared.

    python benchmarks/plugin_overhead.py [--limit 200] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from common import BIN, INCLUDE, TASK, save

MODES = {"hf": ("hf", ""), "layered": ("layered", ""), "layered_fast_false": ("layered", ",fast=False")}


def run(mode: str, checkpoint: Path, limit: int, out: Path) -> tuple[float, dict, dict]:
    model, extra = MODES[mode]
    start = time.perf_counter()
    subprocess.run(
        [str(BIN / "lm_eval"), "--model", model, "--model_args", f"pretrained={checkpoint},dtype=float32{extra}",
         "--tasks", TASK, "--include_path", INCLUDE, "--limit", str(limit), "--batch_size", "32",
         "--device", "cpu", "--log_samples", "--output_path", str(out)],
        check=True, capture_output=True, text=True, env=os.environ.copy())
    seconds = time.perf_counter() - start
    (results,) = out.rglob("results_*.json")
    (samples,) = out.rglob(f"samples_{TASK}_*.jsonl")
    lls = {}
    for line in samples.read_text().splitlines():
        s = json.loads(line)
        lls[s["doc_id"]] = [float(r[0][0]) for r in s["resps"]]
    return seconds, json.loads(results.read_text())["results"][TASK], lls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    times: dict[str, list[float]] = {m: [] for m in MODES}
    metrics, lls = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "smollm2"  # the GGUF as an fp32 safetensors folder, as users load models
        subprocess.run([str(BIN / "surgery"), "prune", "smollm2", "--keep", "0-29", "--out", str(checkpoint)],
                       check=True, capture_output=True)
        for r in range(args.rounds):
            for mode in MODES:
                seconds, metrics[mode], lls[mode] = run(mode, checkpoint, args.limit, Path(tmp) / f"{mode}{r}")
                times[mode].append(seconds)
    median = {m: statistics.median(t) for m, t in times.items()}
    diff = {m: max(abs(a - b) for d in lls["hf"] for a, b in zip(lls["hf"][d], lls[m][d])) for m in MODES}
    result = {
        "task": TASK, "limit": args.limit, "rounds": args.rounds, "seconds": times, "median_seconds": median,
        "overhead_vs_hf": {m: median[m] / median["hf"] - 1 for m in MODES},
        "acc": {m: metrics[m]["acc,none"] for m in MODES}, "acc_norm": {m: metrics[m]["acc_norm,none"] for m in MODES},
        "max_abs_loglik_diff_vs_hf": diff,
    }
    save("plugin_overhead", result, ("median_seconds", "overhead_vs_hf", "acc", "max_abs_loglik_diff_vs_hf"))


if __name__ == "__main__":
    main()
