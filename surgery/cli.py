"""The `surgery` command: inspect checkpoints, write pruned or expanded ones, score layers,
train chosen layers.

    surgery inspect MODEL [--json]
    surgery prune  MODEL --drop SPEC | --keep SPEC [--drop-attn SPEC] [--drop-mlp SPEC] --out DIR
    surgery expand MODEL --insert SPEC | --preset slayer | --preset llama-pro:K [--drop SPEC] --out DIR
    surgery score  MODEL --method shapley|exact|ablation|window|angular|bi ...   (surgery/score.py)
    surgery train  MODEL --data DATA --out DIR ...                              (surgery/train.py)
    surgery ila    MODEL --data DATA --out ila.json | compare A.json B.json ...  (surgery/ila.py)

Each command parses its settings (declared once, in the library), calls the library and
reports. Plans use the `layered` plugin's syntax and the same parser, so a written checkpoint is
exactly the variant `lm_eval --model layered` evaluates. Heavy imports (torch, transformers,
lm-eval) happen inside the commands, after the arguments are checked. User mistakes print one
line and exit with 2 (`surgery/options.py`).
"""

from __future__ import annotations

import json
import sys

import typer

from lm_eval_layers.checkpoint.settings import ExpandSettings, PruneSettings, WriteSettings
from surgery.bench import bench
from surgery.ila import app as ila_app
from surgery.options import Bars, ModelArg, command, console, results, user_errors
from surgery.score import score
from surgery.search import search
from surgery.train import train

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Write pruned and expanded checkpoints as safetensors, exactly as `layered` evaluates them.")


def _write(command_name: str, settings: WriteSettings) -> None:
    """The library writes (`checkpoint.commands`); this renders its progress and result."""
    from rich.progress import BarColumn, TaskProgressColumn, TimeElapsedColumn

    from lm_eval_layers.checkpoint.commands import write_plan

    with user_errors(), Bars("[progress.description]{task.description}", BarColumn(), TaskProgressColumn(),
                             TimeElapsedColumn(), transient=True) as bars:
        tasks: dict[str, object] = {}

        def progress(what: str, done: int, total: int | None) -> None:
            if what not in tasks:
                tasks[what] = bars.add_task(what, total=total)
            bars.update(tasks[what], completed=done, total=total)

        result = write_plan(command_name, settings, progress)
    written = result.written
    for run in result.repair:
        console.print(f"repair: blocks {run['blocks'][0]}-{run['blocks'][1]} -> map folded into block {run['folded_into']}, "
                      f"{run['tokens']:,} tokens, calibration residual {run['residual_vs_drop']:.1%} of plain dropping's"
                      + (" (cached fit)" if result.repair_cached else f", {run['seconds']:.1f} s"))
    if written.max_logit_diff is not None:
        console.print(f"verified: max |Δ logit| = {written.max_logit_diff:.3g} against the in-memory variant")
    console.print(f"wrote {written.out}: {written.plan.describe()}; {len(written.files)} file(s), "
                  f"{written.bytes / 1e6:.1f} MB in {written.seconds:.1f} s")


@app.command()
@command(PruneSettings)
def prune(settings: PruneSettings) -> None:
    """Remove blocks (or their attention / MLP branches) and write the result."""
    _write("prune", settings)


@app.command()
@command(ExpandSettings)
def expand(settings: ExpandSettings) -> None:
    """Insert blocks (copies, averages, function-preserving zero-init) and write the result."""
    _write("expand", settings)


app.command()(score)
app.command()(bench)
app.command()(search)
app.command()(train)
app.add_typer(ila_app, name="ila")


@app.command()
def inspect(
    model: str = ModelArg,
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
) -> None:
    """Blocks, parameter counts, dtypes, size, architecture and the config fields that count layers."""
    with user_errors():
        from lm_eval_layers.checkpoint.describe import describe
        from lm_eval_layers.checkpoint.sources import open_model

        report = describe(open_model(model))
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    from rich.table import Table

    table = Table(title=f"{report['model']} — {report['architecture']} ({report['model_type']})")
    for col in ("block", "parameters", "tensors", "dtypes"):
        table.add_column(col, justify="right" if col != "dtypes" else "left")
    for b in report["blocks"]:
        table.add_row(str(b["index"]), f"{b['parameters']:,}", str(b["tensors"]), ", ".join(b["dtypes"]))
    table.add_row("other", f"{report['other_parameters']:,}", str(report["other_tensors"]), ", ".join(report["other_dtypes"]))
    results.print(table)
    size = f"{report['bytes'] / 1e6:.1f} MB"
    if "stored_bytes" in report:
        kinds = ", ".join(f"{k} ×{n}" for k, n in report["stored_types"].items())
        size = f"{report['stored_bytes'] / 1e6:.1f} MB stored ({kinds}), {size} dequantised to float32"
    results.print(f"blocks: {report['num_blocks']}  parameters: {report['parameters']:,}  size: {size}  "
              f"tied embeddings: {report['tied_embeddings']}")
    results.print("layer fields in config: " + ", ".join(f"{k}={v}" for k, v in report["layer_config"].items()))
    if report.get("gguf_plan"):
        results.print(f"written by lm-eval-layers: {report['gguf_plan']}")
    for key, values in report.get("gguf_per_layer", {}).items():
        results.print(f"{key} (per layer): {values}")


def main() -> None:
    """The console script: a mistake in a flag or its value is one `error:` line and exit 2, as
    every other user mistake (click would draw a box of its own)."""
    from typer.exceptions import TyperException  # click's errors, as typer ships them

    try:
        code = app(prog_name="surgery", standalone_mode=False)
    except typer.Abort:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except TyperException as e:
        ctx = getattr(e, "ctx", None)
        message = (e.format_message() if hasattr(e, "format_message") else str(e)).strip().replace("Value error, ", "")
        if message:  # else the help was shown (no arguments given)
            typer.echo(f"error: {message.splitlines()[0]} (see {ctx.command_path if ctx else 'surgery'} --help)", err=True)
        sys.exit(getattr(e, "exit_code", 2))
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    sys.exit(main())
