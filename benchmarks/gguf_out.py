"""Benchmark: GGUF in -> GGUF out on SmolLM2 (Q4_1), drop 20-23 (issue 32's targets).

- size of the written file (target <= 90 MB, not ~480 MB of float32 safetensors);
- writing it: peak RSS (target <= 400 MB) and wall time against `cp` of the input plus the CLI's
  start-up (`surgery --help`) (target <= 1.5x);
- llama.cpp (../shared/llama.cpp/bin): the file loads; WikiText-2 perplexity of full and pruned
  (llama-perplexity, 8 chunks of 256 tokens) and llama-bench pp512/tg128 of both.

    python benchmarks/gguf_out.py [--drop 20-23]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import BIN, HERE, save

from lm_eval_layers.default_model import smollm2_gguf

LLAMA_CPP = HERE.parent.parent / "shared" / "llama.cpp" / "bin"
WIKITEXT = HERE.parent.parent / "shared" / "data" / "wikitext2" / "wiki.test.raw"
_CHILD = """import resource, subprocess, sys, time
start = time.perf_counter()
subprocess.run(sys.argv[1:], check=True, capture_output=True)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, time.perf_counter() - start)"""


def measured(cmd: list[str]) -> tuple[float, float]:
    """(peak RSS MiB, seconds) of `cmd` in a fresh process."""
    out = subprocess.run([sys.executable, "-c", _CHILD, *cmd], check=True, capture_output=True, text=True).stdout.split()
    return int(out[0]) / 1024, float(out[1])


def perplexity(model: Path) -> float:
    proc = subprocess.run([str(LLAMA_CPP / "llama-perplexity"), "-m", str(model), "-f", str(WIKITEXT), "--chunks", "8",
                           "-c", "256", "-t", "2"], capture_output=True, text=True, check=True)
    return float(re.search(r"Final estimate: PPL = ([\d.]+)", proc.stderr + proc.stdout).group(1))


def bench(model: Path) -> dict[str, float]:
    proc = subprocess.run([str(LLAMA_CPP / "llama-bench"), "-m", str(model), "-p", "512", "-n", "128", "-t", "2", "-o", "json"],
                          capture_output=True, text=True, check=True)
    rows = json.loads(proc.stdout)
    return {("pp512" if r["n_prompt"] else "tg128"): round(r["avg_ts"], 1) for r in rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drop", default="20-23")
    args = parser.parse_args()
    source = smollm2_gguf()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "pruned.gguf"
        write_mib, write_s = measured([str(BIN / "surgery"), "prune", "smollm2", "--drop", args.drop, "--out", str(out)])
        _, cp_s = measured(["cp", str(source), str(Path(tmp) / "copy.gguf")])
        _, startup_s = measured([str(BIN / "surgery"), "--help"])
        result = {
            "model": "smollm2 (Q4_1 GGUF)", "drop": args.drop, "input_mb": round(source.stat().st_size / 1e6, 1),
            "output_mb": round(out.stat().st_size / 1e6, 1), "write_peak_rss_mib": round(write_mib, 1),
            "write_seconds": round(write_s, 2), "cp_plus_startup_seconds": round(cp_s + startup_s, 2),
            "write_over_cp_plus_startup": round(write_s / (cp_s + startup_s), 2),
            "targets": {"output_mb": "<= 90", "write_peak_rss_mib": "<= 400", "write_over_cp_plus_startup": "<= 1.5"},
            "machine": os.uname().machine, "cpus": os.cpu_count(), "load": os.getloadavg(), "when": time.strftime("%Y-%m-%d"),
        }
        if shutil.which(str(LLAMA_CPP / "llama-perplexity")):
            result["llama_cpp"] = {"perplexity_full": perplexity(source), "perplexity_pruned": perplexity(out),
                                   "bench_full": bench(source), "bench_pruned": bench(out)}
    save("gguf_out", result, tuple(k for k in result if k not in ("machine", "cpus", "when")))


if __name__ == "__main__":
    main()
