"""`surgery ila`: which weight matrices a fine-tune on your data needs (ILA: LoRA, then learned
gates on its updates), and `surgery ila compare` for rankings side by side. The options are
`ILASettings`' fields; the work is in `lm_eval_layers.training`, imported only when a command
runs, so `--help` and argument errors cost no torch."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer
from typer.core import TyperGroup

from lm_eval_layers.training.ila_settings import ILASettings
from surgery.options import command, console, quiet_training_logs, results, user_errors


class _RunByDefault(TyperGroup):
    """`surgery ila MODEL ...` runs ILA (`surgery ila run MODEL ...` spelled out); only
    `compare` (and `--help`) name a subcommand."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


app = typer.Typer(cls=_RunByDefault, no_args_is_help=True, add_completion=False,
                  help="ILA: which layers a fine-tune needs (`surgery ila MODEL --data DATA --out ila.json`), "
                       "and `surgery ila compare` for rankings side by side.")


@app.command("run")
@command(ILASettings)
def rank_units(settings: ILASettings) -> None:
    """Rank the weight matrices (or blocks) a fine-tune on DATA needs: LoRA, then gates σ(s) on its updates."""

    quiet_training_logs()
    with user_errors():
        from lm_eval_layers.training import ila_report
        from lm_eval_layers.training.ila_command import write_ila_json

        from surgery.training_bar import console_reporter

        document = write_ila_json(settings, console_reporter(console))
    results.print(ila_report.table(document))
    for warning in document["warnings"]:
        console.print(f"warning: {warning}", highlight=False)
    console.print(f"wrote {settings.out}" + (f" and {settings.plot}" if settings.plot else ""))


@app.command("compare")
def compare(
    files: List[Path] = typer.Argument(..., help="ila.json files (two or more), and optionally scores.json files of `surgery score --unit block`"),
    out: Optional[Path] = typer.Option(None, "--out", help="also write the comparison as JSON"),
) -> None:
    """Overlap of ILA rankings (Jaccard, chance beside it); per-block totals vs `surgery score` values."""

    from lm_eval_layers.outputs import write_json
    from lm_eval_layers.training.ila_compare import compare_files, tables

    with user_errors():
        comparison = compare_files(files)
        if out is not None:
            write_json(out, comparison)
    for table in tables(comparison):
        results.print(table)
    if out is not None:
        console.print(f"wrote {out}")
