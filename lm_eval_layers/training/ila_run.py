"""One `surgery ila` run from paths: check the options and outputs, read the model and data
exactly as `surgery train` does (same loaders, same response-only labels), run both stages,
write ila.json (and the heat map) atomically."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from lm_eval_layers.arch import num_layers
from lm_eval_layers.errors import UsageError
from lm_eval_layers.training import data as D
from lm_eval_layers.training import ila_report
from lm_eval_layers.training.ila import ILASettings, run_ila
from lm_eval_layers.training.run import load_tokenizer, plain_folder


def check_outputs(out: Path, plot: Path | None, force: bool) -> None:
    """Never overwrite without --force; the folders must exist (nothing is created on a mistake)."""
    for path, option in ((out, "--out"), (plot, "--plot")):
        if path is None:
            continue
        if path.is_dir():
            raise UsageError(f"{option} {path} is a folder; give a file path")
        if path.exists() and not force:
            raise UsageError(f"{option} {path} exists; choose another path or pass --force to replace it")
        if not path.parent.is_dir():
            raise UsageError(f"{option} {path}: the folder {path.parent} does not exist; create it first")
    if plot is not None and plot.suffix.lower() != ".png":
        raise UsageError(f"--plot {plot}: the heat map is a PNG; give a path ending in .png")


def run(model: str, data: str, out: Path, plot: Path | None, settings: ILASettings, console: Console,
        force: bool = False) -> dict[str, Any]:
    """Run ILA and write its outputs; returns the ila.json document."""
    import transformers

    from lm_eval_layers.checkpoint.sources import open_model

    settings.check()
    out, plot = out.expanduser().resolve(), plot.expanduser().resolve() if plot else None
    check_outputs(out, plot, force)
    source = open_model(model)
    depth = num_layers(source.config)
    tokenizer = load_tokenizer(source)
    prepared = D.prepare(data, tokenizer, settings.max_length)
    examples = prepared.examples
    if len(examples) < settings.batch_size:
        raise UsageError(f"{len(examples)} examples are fewer than --batch-size {settings.batch_size}; lower it")
    console.print(f"data: {prepared.describe()}; model: {source.name}, {depth} blocks")

    scratch = out.with_name(f".{out.name}.base")  # a GGUF input dequantised to a plain folder, removed at the end
    try:
        folder = plain_folder(source, scratch)
        loaded = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=getattr(torch, settings.dtype))
        result = run_ila(loaded, examples, D.pad_id(tokenizer), settings, console)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    document = ila_report.build(
        result, settings, model=model, model_type=source.config.get("model_type"), num_layers=depth,
        data={"path": data, "format": prepared.format.value, "records": len(prepared.records), "train_examples": len(examples),
              "tokens": sum(sum(label != D.IGNORE for label in e.labels[1:]) for e in examples),
              "digest": ila_report.records_digest(prepared.records)},
    )
    ila_report.write(out, document)
    if plot is not None:
        ila_report.heat_map(document, plot)
    return document
