"""Benchmark: prune 4 blocks from a safetensors checkpoint, `surgery` against what users do today.

Methods, each run as its own process and timed with /usr/bin/time (wall, peak RSS):
  cp         copy of the weight files (the physical limit of a streaming writer)
  startup    `python -c "import torch"` (the start-up every torch-based tool pays; surgery prune
             imports torch but, for a known architecture, neither transformers nor lm-eval)
  help       `surgery --help` (the command's own start-up: what an argument error costs)
  surgery    `surgery prune MODEL --drop ... --out DIR`
  load+save  every tensor loaded with safetensors, renamed, saved again (a hand-written script)
  mergekit   `mergekit-yaml` passthrough merge (when MERGEKIT names a mergekit-yaml executable)

Checkpoints: SmolLM2-135M in fp32 (made from the embedded GGUF with `surgery prune smollm2
--keep 0-29`, 538 MB) and a synthetic Llama-style checkpoint of several GB (random weights,
sharded), to show that surgery's memory does not grow with the model.

    python benchmarks/prune_speed.py [--work /tmp/prune-bench] [--repeats 3]
    MERGEKIT=/path/to/venv/bin/mergekit-yaml python benchmarks/prune_speed.py
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).parent
BIN = Path(sys.executable).parent
SYNTHETIC = dict(hidden=2048, intermediate=5632, layers=16, vocab=32000, heads=16)


def run(cmd: list[str], env: dict | None = None) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one process."""
    out = subprocess.run(["/usr/bin/time", "-f", "%e %M", *cmd], capture_output=True, text=True,
                         env={**os.environ, **(env or {})})
    if out.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed: {out.stderr[-2000:]}")
    wall, rss_kb = out.stderr.strip().splitlines()[-1].split()
    return float(wall), int(rss_kb) / 1024


def make_smollm2(work: Path) -> Path:
    path = work / "smollm2-fp32"
    if not (path / "model.safetensors").exists():
        subprocess.run([str(BIN / "surgery"), "prune", "smollm2", "--keep", "0-29", "--out", str(path), "--force"], check=True)
    return path


def make_synthetic(work: Path) -> Path:
    """A Llama-style checkpoint of several GB, written shard by shard (never all in memory)."""
    s = SYNTHETIC
    path = work / "synthetic"
    if (path / "model.safetensors.index.json").exists():
        return path
    path.mkdir(parents=True, exist_ok=True)
    h, m, n = s["hidden"], s["intermediate"], s["layers"]
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h, "intermediate_size": m,
              "num_hidden_layers": n, "num_attention_heads": s["heads"], "num_key_value_heads": s["heads"],
              "vocab_size": s["vocab"], "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
              "tie_word_embeddings": False, "dtype": "float32"}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g) * 0.02

    groups = [{"model.embed_tokens.weight": rand(s["vocab"], h)}]
    for i in range(n):
        p = f"model.layers.{i}."
        groups.append({
            p + "input_layernorm.weight": torch.ones(h), p + "post_attention_layernorm.weight": torch.ones(h),
            **{p + f"self_attn.{k}_proj.weight": rand(h, h) for k in "qkvo"},
            p + "mlp.gate_proj.weight": rand(m, h), p + "mlp.up_proj.weight": rand(m, h), p + "mlp.down_proj.weight": rand(h, m),
        })
    groups.append({"model.norm.weight": torch.ones(h), "lm_head.weight": rand(s["vocab"], h)})
    weight_map, total = {}, 0
    for k, group in enumerate(groups):
        name = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(group, str(path / name), metadata={"format": "pt"})
        for t_name, t in group.items():
            weight_map[t_name] = name
            total += t.numel() * t.element_size()
        del group
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return path


LOAD_SAVE = """
import json, sys
from pathlib import Path
from safetensors.torch import load_file, save_file
src, dst, drop = Path(sys.argv[1]), Path(sys.argv[2]), {int(x) for x in sys.argv[3].split(",")}
tensors = {}
for f in sorted(src.glob("*.safetensors")):
    tensors.update(load_file(str(f)))
n = json.loads((src / "config.json").read_text())["num_hidden_layers"]
new = {old: k for k, old in enumerate(i for i in range(n) if i not in drop)}
out = {}
for name, t in tensors.items():
    if name.startswith("model.layers."):
        i, rest = name[len("model.layers."):].split(".", 1)
        if int(i) in drop:
            continue
        name = f"model.layers.{new[int(i)]}.{rest}"
    out[name] = t
dst.mkdir(parents=True, exist_ok=True)
save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
"""


def mergekit_config(src: Path, n: int, drop: list[int], path: Path) -> Path:
    keep_ranges, start = [], 0
    for i in sorted(drop) + [n]:
        if i > start:
            keep_ranges.append([start, i])
        start = i + 1
    slices = "\n".join(f"  - sources:\n      - model: {src}\n        layer_range: {r}" for r in keep_ranges)
    path.write_text(f"slices:\n{slices}\nmerge_method: passthrough\ndtype: float32\n")
    return path


def bench(name: str, src: Path, n: int, drop: list[int], work: Path, repeats: int) -> dict:
    spec = ",".join(map(str, drop))
    out = work / f"out-{name}"
    weights = sorted(src.glob("*.safetensors"))
    methods = {
        "cp": lambda: ["cp", *map(str, weights), str(out)],
        "startup": lambda: [sys.executable, "-c", "import torch"],
        "help": lambda: [str(BIN / "surgery"), "--help"],
        "surgery": lambda: [str(BIN / "surgery"), "prune", str(src), "--drop", spec, "--out", str(out), "--force"],
        "load+save": lambda: [sys.executable, "-c", LOAD_SAVE, str(src), str(out), spec],
    }
    mergekit = os.environ.get("MERGEKIT")
    if mergekit:
        cfg = mergekit_config(src, n, drop, work / f"mergekit-{name}.yml")
        methods["mergekit"] = lambda: [mergekit, str(cfg), str(out), "--allow-crimes", "--lazy-unpickle"]
    times: dict[str, list[tuple[float, float]]] = {m: [] for m in methods}
    for _ in range(repeats):
        for method, cmd in methods.items():
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            times[method].append(run(cmd()))
    shutil.rmtree(out, ignore_errors=True)
    size = sum(p.stat().st_size for p in weights)
    result = {"checkpoint": name, "bytes": size, "blocks": n, "drop": spec, "repeats": repeats, "methods": {}}
    for method, runs in times.items():
        result["methods"][method] = {"wall_s": statistics.median(w for w, _ in runs), "peak_rss_mb": max(r for _, r in runs)}
    m = result["methods"]
    result["surgery_vs_cp_plus_startup"] = m["surgery"]["wall_s"] / (m["cp"]["wall_s"] + m["startup"]["wall_s"])
    for other in ("load+save", "mergekit"):
        if other in m:
            result[f"{other}_vs_surgery_wall"] = m[other]["wall_s"] / m["surgery"]["wall_s"]
            result[f"{other}_vs_surgery_rss"] = m[other]["peak_rss_mb"] / m["surgery"]["peak_rss_mb"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/prune-bench"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=HERE / "results" / "prune_speed.json")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    results = [
        bench("smollm2-fp32", make_smollm2(args.work), 30, [24, 25, 26, 27], args.work, args.repeats),
        bench("synthetic", make_synthetic(args.work), SYNTHETIC["layers"], [10, 11, 12, 13], args.work, args.repeats),
    ]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    for r in results:
        print(f"\n{r['checkpoint']} ({r['bytes'] / 1e9:.2f} GB, drop {r['drop']}, median of {r['repeats']})")
        for method, m in r["methods"].items():
            print(f"  {method:10s} {m['wall_s']:7.2f} s  {m['peak_rss_mb']:8.0f} MB")
        print(f"  surgery / (cp + startup) = {r['surgery_vs_cp_plus_startup']:.2f}")
        for k, v in r.items():
            if k.endswith(("_wall", "_rss")):
                print(f"  {k} = {v:.2f}")


if __name__ == "__main__":
    main()
