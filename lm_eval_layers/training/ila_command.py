"""`surgery ila` as a library call, from paths: check the outputs, read the model and data
exactly as `surgery train` does (same loaders, same response-only labels), learn the gates,
write ila.json (and the heat map) atomically.

    from lm_eval_layers.training.ila_command import write_ila_json
    from lm_eval_layers.training.ila_settings import ILASettings
from lm_eval_layers.training.reporter import Reporter
    document = write_ila_json(ILASettings(model="smollm2", data="sft.jsonl", out=Path("ila.json")), Reporter(print))
"""

from __future__ import annotations

import shutil
from typing import Any

import transformers

from lm_eval_layers.arch import num_layers
from lm_eval_layers.checkpoint.sources import open_model
from lm_eval_layers.errors import UsageError
from lm_eval_layers.outputs import check_file, write_json
from lm_eval_layers.training import examples as D
from lm_eval_layers.training import ila_report
from lm_eval_layers.training.ila import learn_gates
from lm_eval_layers.training.ila_file import records_digest
from lm_eval_layers.training.ila_settings import ILASettings
from lm_eval_layers.training.reporter import Reporter
from lm_eval_layers.checkpoint.sources import load_tokenizer
from lm_eval_layers.training.trainer import plain_folder


def check_outputs(settings: ILASettings) -> None:
    """Never overwrite without --force; the folders must exist (nothing is created on a mistake)."""
    for path, flag in ((settings.out, "--out"), (settings.plot, "--plot")):
        if path is None:
            continue
        check_file(path, settings.force, flag)
        if not path.parent.is_dir():
            raise UsageError(f"{flag} {path}: the folder {path.parent} does not exist; create it first")


def write_ila_json(settings: ILASettings, reporter: Reporter = Reporter()) -> dict[str, Any]:
    """Rank MODEL's units for a fine-tune on DATA and write ila.json (and --plot's heat map);
    returns the ila.json document."""
    settings = settings.resolved()
    check_outputs(settings)
    source = open_model(settings.model)
    depth = num_layers(source.config)
    tokenizer = load_tokenizer(source)
    prepared = D.prepare(settings.data, tokenizer, settings.max_length)
    examples = prepared.examples
    if len(examples) < settings.batch_size:
        raise UsageError(f"{len(examples)} examples are fewer than --batch-size {settings.batch_size}; lower it")
    reporter.say(f"data: {prepared.describe()}; model: {source.name}, {depth} blocks")

    out = settings.out
    scratch = out.with_name(f".{out.name}.base")  # a GGUF input dequantised to a plain folder, removed at the end
    try:
        folder = plain_folder(source, scratch)
        loaded = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=settings.dtype.torch)
        result = learn_gates(loaded, examples, D.pad_id(tokenizer), settings, reporter)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    document = ila_report.build(
        result, settings, model=settings.model, model_type=source.config.get("model_type"), num_layers=depth,
        data={"path": settings.data, "format": prepared.format.value, "records": len(prepared.records),
              "train_examples": len(examples), "tokens": sum(sum(label != D.IGNORE for label in e.labels[1:]) for e in examples),
              "digest": records_digest(prepared.records)},
    )
    write_json(out, document)
    if settings.plot is not None:
        ila_report.heat_map(document, settings.plot)
    return document
