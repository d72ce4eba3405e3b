"""ILA on SmolLM2 (fp32, CPU): the same settings on three SFT datasets and on nq_open with three
seeds; one result file per run, then the overlaps.

    .venv/bin/python benchmarks/ila_runs.py --work /tmp/ila_runs                  # every run, hours
    .venv/bin/python benchmarks/ila_runs.py --runs nq_open_seed0 --max-steps 4 --gate-steps 2 --limit 64 --results /tmp/smoke

Each run is `surgery ila` in a subprocess writing `results/ila_runs/RUN.json` (the ila.json plus
the run's wall time) and `RUN.png` (the heat map); a run whose JSON exists is skipped, so a
killed benchmark resumes where it stopped. The summary (`results/ila_runs.json`) has per run the
wall time, the stage-1 stop step (or the cap) and seconds per step, and the top-25% Jaccard for
every pair of datasets (seed 0) and of seeds (nq_open) beside the chance level, the expected
Jaccard of two random K-of-N sets.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import BIN, HERE, RESULTS  # noqa: E402

REPO = HERE.parent
SFT = REPO.parent / "shared" / "data" / "sft"
DEPTH = 30  # SmolLM2-135M
DATASETS = ("nq_open", "trivia_qa", "arithmetic")
RUNS = {f"{d}_seed0": (d, 0) for d in DATASETS} | {f"nq_open_seed{s}": ("nq_open", s) for s in (1, 2)}
# Everything else: the command's defaults. 256 tokens truncate no response of the three files
# (their longest examples: nq_open 72, arithmetic 66, trivia_qa 179 tokens).
SETTINGS = ["--batch-size", "16", "--max-length", "256"]
TOP = "25%"


def base(work: Path) -> Path:
    """SmolLM2's GGUF dequantised once to an fp32 safetensors folder."""
    out = work / "smollm2"
    if not out.is_dir():
        subprocess.run([str(BIN / "surgery"), "prune", "smollm2", "--keep", f"0-{DEPTH - 1}", "--out", str(out)], check=True)
    return out


def data_file(work: Path, dataset: str, limit: int | None) -> Path:
    """The shared SFT file, or its first `limit` records (for a quick check)."""
    path = SFT / f"{dataset}.jsonl"
    if limit is None:
        return path
    out = work / f"{dataset}_{limit}.jsonl"
    out.write_text("\n".join(path.read_text().splitlines()[:limit]) + "\n")
    return out


def ila_json(name: str, args: argparse.Namespace, folder: Path) -> dict:
    """RUN's ila.json (with its wall time and command), computed once: an existing file is read."""
    out = folder / f"{name}.json"
    if out.is_file():
        return json.loads(out.read_text())
    dataset, seed = RUNS[name]
    partial = folder / f".{name}.partial.json"
    command = [str(BIN / "surgery"), "ila", str(base(args.work)), "--data", str(data_file(args.work, dataset, args.limit)),
               "--out", str(partial), "--plot", str(folder / f"{name}.png"), "--seed", str(seed), "--force", *SETTINGS,
               *(["--max-steps", str(args.max_steps)] if args.max_steps else []),
               *(["--gate-steps", str(args.gate_steps)] if args.gate_steps else [])]
    start = time.perf_counter()
    subprocess.run(command, check=True)
    document = json.loads(partial.read_text()) | {"wall_seconds": time.perf_counter() - start, "command": command[1:]}
    out.write_text(json.dumps(document, indent=2) + "\n")
    partial.unlink()
    return document


def summary(results: dict[str, dict]) -> dict:
    from lm_eval_layers.training.ila_compare import compare_runs

    def pairs(names: list[str]) -> list[dict]:
        present = [(n, results[n]) for n in names if n in results]
        return [r for r in compare_runs(present) if r["top"] == TOP]

    runs = {
        name: {"wall_seconds": d["wall_seconds"], "stage1_stop_step": d["stage1"]["stop_step"],
               "stage1_steps": d["stage1"]["steps"], "stage1_seconds_per_step": d["timing"]["stage1_per_step"],
               "stage2_seconds_per_step": d["timing"]["stage2_per_step"], "top_25": d["top"][TOP]}
        for name, d in results.items()
    }
    return {"settings": SETTINGS, "runs": runs,
            "datasets": pairs([f"{d}_seed0" for d in DATASETS]),
            "seeds": pairs([f"nq_open_seed{s}" for s in range(3)])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/ila_runs"), help="the fp32 model and data subsets")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where ila_runs/ and ila_runs.json go")
    parser.add_argument("--runs", nargs="*", choices=sorted(RUNS), default=list(RUNS))
    parser.add_argument("--limit", type=int, help="first N records of each dataset (quick checks)")
    parser.add_argument("--max-steps", type=int, help="stage-1 cap (default: the command's)")
    parser.add_argument("--gate-steps", type=int, help="stage-2 steps (default: the command's)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    folder = args.results / "ila_runs"
    folder.mkdir(parents=True, exist_ok=True)
    results = {name: ila_json(name, args, folder) for name in args.runs}
    result = summary(results)
    (args.results / "ila_runs.json").write_text(json.dumps(result, indent=2) + "\n")
    for name, r in result["runs"].items():
        stop = f"ε-stop at {r['stage1_stop_step']}" if r["stage1_stop_step"] else f"cap {r['stage1_steps']}"
        print(f"{name}: {r['wall_seconds'] / 60:.1f} min, stage 1 {stop} ({r['stage1_seconds_per_step']:.2f} s/step), "
              f"stage 2 {r['stage2_seconds_per_step']:.2f} s/step")
    for group in ("datasets", "seeds"):
        for r in result[group]:
            print(f"{group}: {r['a']} vs {r['b']}: top {TOP} Jaccard {r['jaccard']:.3f} (chance {r['chance']:.3f}, K={r['k']} of {r['n']})")


if __name__ == "__main__":
    main()
