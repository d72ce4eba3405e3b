"""The `surgery` command: inspect checkpoints, write pruned or expanded ones, score layers,
train chosen layers.

    surgery inspect MODEL [--json]
    surgery prune  MODEL --drop SPEC | --keep SPEC [--drop-attn SPEC] [--drop-mlp SPEC] --out DIR
    surgery expand MODEL --insert SPEC | --preset slayer | --preset llama-pro:K [--drop SPEC] --out DIR
    surgery score  MODEL --method shapley|exact|ablation|window|angular|bi ...   (surgery/score.py)
    surgery train  MODEL --data DATA --out DIR ...                              (surgery/train.py)
    surgery ila    MODEL --data DATA --out ila.json | compare A.json B.json ...  (surgery/ila.py)

Plans use the `layered` plugin's syntax and the same parser, so a written checkpoint is exactly
the variant `lm_eval --model layered` evaluates. User mistakes print one line and exit with 2
(`surgery/options.py`).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from lm_eval_layers.arch import num_layers
from lm_eval_layers.errors import UsageError
from lm_eval_layers.plan import PlanSpec
from lm_eval_layers.scores_file import read_scores
from surgery.checkpoint import (
    atomic_output, block_prefix, copy_side_files, parse_size, plan_tensors, write_config, write_metadata,
    write_weights,
)
from surgery.ila import app as ila_app
from surgery.options import DType, ModelArg, console, user_errors
from surgery.score import score
from surgery.sources import Source, open_model, source_layout
from surgery.train import train
from surgery.verify import verify as verify_checkpoint

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Write pruned and expanded checkpoints as safetensors, exactly as `layered` evaluates them.")
OutOpt = typer.Option(..., "--out", help="output folder (must not exist or be empty, unless --force)")
DTypeOpt = typer.Option(None, "--dtype", help="convert floating tensors (default: keep; GGUF: float32)")
ShardOpt = typer.Option("5GB", "--max-shard-size", help="largest safetensors file, e.g. 5GB, 500MB")
ForceOpt = typer.Option(False, "--force", help="replace a non-empty --out")
VerifyOpt = typer.Option(False, "--verify", help="reload the output and compare logits with the in-memory variant")


def _write(command: str, model: str, spec: PlanSpec, out: Path, dtype: Optional[DType], max_shard_size: str,
           force: bool, verify: bool) -> None:
    import torch

    start = time.perf_counter()
    shard_bytes = parse_size(max_shard_size)
    source = open_model(model)
    plan = spec.resolve(num_layers(source.config), source.config.get("model_type"))
    layout = source_layout(source)
    torch_dtype = getattr(torch, dtype.value) if dtype else None
    tensors = plan_tensors(source, plan, layout, torch_dtype)
    total = sum(t.info.nbytes for t in tensors)
    with atomic_output(out, source, force, total) as tmp:
        columns = ("[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
        with Progress(*columns, console=console, transient=True) as progress:
            task = progress.add_task(f"writing {len(tensors)} tensors", total=total)
            files = write_weights(tmp, source, layout, tensors, shard_bytes, lambda n: progress.advance(task, n))
        write_config(tmp, source, plan, layout, torch_dtype)
        copy_side_files(tmp, source)
        write_metadata(tmp, out.name, source, plan, layout, command, torch_dtype)
        if verify:
            out_dtype = torch_dtype or tensors[0].info.dtype
            exact = all(t.info.dtype == source.infos[t.sources[0]].dtype for t in tensors)
            with console.status("verifying: reloading the output and the in-memory variant…"):
                diff = verify_checkpoint(tmp, source, plan, out_dtype, exact)
            console.print(f"verified: max |Δ logit| = {diff:.3g} against the in-memory variant")
    seconds = time.perf_counter() - start
    console.print(f"wrote {out}: {plan.describe()}; {len(files)} file(s), {total / 1e6:.1f} MB in {seconds:.1f} s")


@app.command()
def prune(
    model: str = ModelArg,
    out: Path = OutOpt,
    drop: Optional[str] = typer.Option(None, "--drop", help="blocks to remove, e.g. 24-27 or 3,5-7 or -2"),
    keep: Optional[str] = typer.Option(None, "--keep", help="blocks to keep (the complement of --drop)"),
    drop_attn: Optional[str] = typer.Option(None, "--drop-attn", help="blocks whose attention branch is removed"),
    drop_mlp: Optional[str] = typer.Option(None, "--drop-mlp", help="blocks whose MLP branch is removed"),
    scores: Optional[Path] = typer.Option(None, "--scores", help="scores.json of `surgery score` on this model"),
    drop_lowest: Optional[int] = typer.Option(None, "--drop-lowest", help="with --scores: remove the K lowest-valued units"),
    dtype: Optional[DType] = DTypeOpt,
    max_shard_size: str = ShardOpt,
    force: bool = ForceOpt,
    verify: bool = VerifyOpt,
) -> None:
    """Remove blocks (or their attention / MLP branches) and write the result."""
    with user_errors():
        if drop is None and keep is None and drop_attn is None and drop_mlp is None and scores is None:
            raise UsageError("prune needs --drop, --keep, --drop-attn, --drop-mlp or --scores with --drop-lowest")
        spec = PlanSpec.from_args(drop=drop, keep=keep, drop_attn=drop_attn, drop_mlp=drop_mlp,
                                  scores=read_scores(scores) if scores else None, drop_lowest=drop_lowest)
        _write("prune", model, spec, out, dtype, max_shard_size, force, verify)


@app.command()
def expand(
    model: str = ModelArg,
    out: Path = OutOpt,
    insert: Optional[str] = typer.Option(None, "--insert", help="new blocks POS:INIT, e.g. 1:avg-zero,3:copy"),
    preset: Optional[str] = typer.Option(None, "--preset", help="slayer or llama-pro:K"),
    drop: Optional[str] = typer.Option(None, "--drop", help="blocks to remove as well"),
    dtype: Optional[DType] = DTypeOpt,
    max_shard_size: str = ShardOpt,
    force: bool = ForceOpt,
    verify: bool = VerifyOpt,
) -> None:
    """Insert blocks (copies, averages, function-preserving zero-init) and write the result."""
    with user_errors():
        if insert is None and preset is None:
            raise UsageError("expand needs --insert or --preset")
        spec = PlanSpec.from_args(insert=insert, preset=preset, drop=drop)
        _write("expand", model, spec, out, dtype, max_shard_size, force, verify)


app.command()(score)
app.command()(train)
app.add_typer(ila_app, name="ila")


@app.command()
def inspect(
    model: str = ModelArg,
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
) -> None:
    """Blocks, parameter counts, dtypes, size, architecture and the config fields that count layers."""
    with user_errors():
        report = describe(open_model(model))
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    out = Console()
    table = Table(title=f"{report['model']} — {report['architecture']} ({report['model_type']})")
    for col in ("block", "parameters", "tensors", "dtypes"):
        table.add_column(col, justify="right" if col != "dtypes" else "left")
    for b in report["blocks"]:
        table.add_row(str(b["index"]), f"{b['parameters']:,}", str(b["tensors"]), ", ".join(b["dtypes"]))
    table.add_row("other", f"{report['other_parameters']:,}", str(report["other_tensors"]), ", ".join(report["other_dtypes"]))
    out.print(table)
    out.print(f"blocks: {report['num_blocks']}  parameters: {report['parameters']:,}  size: {report['bytes'] / 1e6:.1f} MB  "
              f"tied embeddings: {report['tied_embeddings']}")
    out.print("layer fields in config: " + ", ".join(f"{k}={v}" for k, v in report["layer_config"].items()))


def describe(source: Source) -> dict:
    """What `inspect` reports, as a JSON-ready dict."""
    layout = source_layout(source)
    names = list(source.infos)
    prefix = block_prefix(names, layout)
    blocks: dict[int, list[str]] = {}
    other: list[str] = []
    for name in names:
        rest = name[len(prefix):] if name.startswith(prefix) else ""
        head = rest.split(".", 1)[0]
        (blocks.setdefault(int(head), []) if head.isdigit() else other).append(name)

    def numel(n: str) -> int:
        size = 1
        for d in source.infos[n].shape:
            size *= d
        return size

    def dtypes(group: list[str]) -> list[str]:
        return sorted({str(source.infos[n].dtype).removeprefix("torch.") for n in group})

    config = source.config
    text = config.get("text_config", config)
    return {
        "model": source.name,
        "architecture": (config.get("architectures") or [type(source.hf_config).__name__])[0],
        "model_type": config.get("model_type"),
        "num_blocks": len(blocks),
        "blocks": [
            {"index": i, "parameters": sum(numel(n) for n in group), "tensors": len(group), "dtypes": dtypes(group)}
            for i, group in sorted(blocks.items())
        ],
        "other_parameters": sum(numel(n) for n in other),
        "other_tensors": len(other),
        "other_dtypes": dtypes(other),
        "parameters": sum(numel(n) for n in names),
        "bytes": sum(source.infos[n].nbytes for n in names),
        "tied_embeddings": bool(text.get("tie_word_embeddings", config.get("tie_word_embeddings", False)))
        and not any(n.endswith("lm_head.weight") for n in names),
        "layer_config": {k: text[k] for k in layout.layer_keys if k in text},
    }


def main() -> None:
    app(prog_name="surgery")


if __name__ == "__main__":
    sys.exit(main())
