"""Benchmark: peak memory of `lm_eval --model layered` with a drop plan against `--model hf` on the
pruned folder `surgery prune` writes (SmolLM2 from its embedded GGUF, fp32, CPU, arc_easy
validation[:N], batch 32). Target (issue 30): layered within 5% of hf on the pruned folder.

Each run is its own process; its peak RSS is read from the kernel (`ru_maxrss` over the waited
children: lm_eval and the writer it starts). `layered` starts from the GGUF and from the whole model
as fp32 safetensors (the usual input); `keep_base=True` (the whole model held, to switch plans) is
measured beside them, and the per-sample log-likelihoods of layered and hf compared.
The target ratio compares `fast=False` (hf's own log-likelihood loop, so the same evaluation) with
hf; the default prepared requests need less memory still.

    python benchmarks/plugin_memory.py [--drop 20-27] [--limit 40]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import BIN, INCLUDE, TASK, save

_CHILD = """import resource, subprocess, sys, time
start = time.perf_counter()
subprocess.run(sys.argv[1:], check=True, capture_output=True)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, time.perf_counter() - start)"""


def peak(cmd: list[str]) -> tuple[float, float]:
    """(peak RSS in MiB, seconds) of `cmd`, measured in a fresh process of its own."""
    out = subprocess.run([sys.executable, "-c", _CHILD, *cmd], check=True, capture_output=True, text=True,
                         env=os.environ.copy()).stdout.split()
    return int(out[0]) / 1024, float(out[1])


def lm_eval(model: str, args: str, limit: int, out: Path) -> list[str]:
    return [str(BIN / "lm_eval"), "--model", model, "--model_args", f"{args},dtype=float32", "--tasks", TASK,
            "--include_path", INCLUDE, "--limit", str(limit), "--batch_size", "32", "--device", "cpu",
            "--log_samples", "--output_path", str(out)]


def loglikelihoods(out: Path) -> list[float]:
    (samples,) = out.rglob(f"samples_{TASK}_*.jsonl")
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    return [float(r[0][0]) for row in sorted(rows, key=lambda r: r["doc_id"]) for r in row["resps"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drop", default="20-27")
    parser.add_argument("--limit", type=int, default=40)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        subprocess.run([str(BIN / "surgery"), "prune", "smollm2", "--drop", args.drop, "--out", str(work / "pruned")],
                       check=True, capture_output=True)
        subprocess.run([str(BIN / "surgery"), "prune", "smollm2", "--keep", "0-29", "--out", str(work / "full")],
                       check=True, capture_output=True)  # the whole model as fp32 safetensors (the usual input)
        plan = f"drop={args.drop}"
        runs = {
            "hf_pruned_folder": lm_eval("hf", f"pretrained={work / 'pruned'}", args.limit, work / "a"),
            "layered_safetensors_fast_false": lm_eval("layered", f"pretrained={work / 'full'},{plan},fast=False",
                                                      args.limit, work / "b"),
            "layered_gguf_fast_false": lm_eval("layered", f"pretrained=smollm2,{plan},fast=False", args.limit, work / "c"),
            "layered_gguf_keep_base_fast_false": lm_eval("layered", f"pretrained=smollm2,{plan},keep_base=True,fast=False",
                                                         args.limit, work / "d"),
            "layered_gguf": lm_eval("layered", f"pretrained=smollm2,{plan}", args.limit, work / "e"),
        }
        measured = {}
        for name, cmd in runs.items():
            mib, seconds = peak(cmd)
            measured[name] = {"peak_rss_mib": round(mib, 1), "seconds": round(seconds, 1)}
            print(name, measured[name], flush=True)
        a, b = loglikelihoods(work / "a"), loglikelihoods(work / "c")
        max_diff = max(abs(x - y) for x, y in zip(a, b))
    # fast=False runs hf's own log-likelihood loop: the same evaluation, so the difference is what is loaded
    hf = measured["hf_pruned_folder"]["peak_rss_mib"]
    ratios = {name: round(m["peak_rss_mib"] / hf, 3) for name, m in measured.items()}
    result = {
        "model": "smollm2 (embedded GGUF, fp32)", "drop": args.drop, "task": TASK, "limit": args.limit,
        "runs": measured, "over_hf_pruned": ratios, "target": "layered (fast=False) <= 1.05 x hf on the pruned folder",
        "met": max(ratios["layered_safetensors_fast_false"], ratios["layered_gguf_fast_false"]) <= 1.05,
        "max_abs_loglikelihood_diff_layered_gguf_vs_hf_pruned": max_diff,
        "machine": os.uname().machine, "cpus": os.cpu_count(), "when": time.strftime("%Y-%m-%d"),
    }
    save("plugin_memory", result, ("runs", "over_hf_pruned", "met", "max_abs_loglikelihood_diff_layered_gguf_vs_hf_pruned"))


if __name__ == "__main__":
    main()
