"""`surgery ila`: which weight matrices a fine-tune on your data needs (ILA: LoRA, then learned
gates on its updates), and `surgery ila compare` for rankings side by side. The work is in
`lm_eval_layers.training.ila*`; this module holds the commands' options, so importing the CLI
stays cheap."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer
from typer.core import TyperGroup

from lm_eval_layers.training.gates import UnitKind
from lm_eval_layers.precision import DType
from surgery.options import ModelArg, console, quiet_training_logs, user_errors


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
def run(
    model: str = ModelArg,
    data: str = typer.Option(..., "--data", help=".jsonl/.json/.parquet file or hub dataset id, as for `surgery train`"),
    out: Path = typer.Option(..., "--out", help="ila.json to write (refused if it exists, unless --force)"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="PNG heat map of the gates, blocks × modules"),
    unit: UnitKind = typer.Option(UnitKind.module, "--unit", help="one gate per weight matrix, or one per block"),
    rank: int = typer.Option(8, "--rank", help="LoRA rank in stage 1"),
    lora_alpha: Optional[float] = typer.Option(None, "--lora-alpha", help="LoRA scaling alpha (default 2 × rank)"),
    lr: float = typer.Option(1e-3, "--lr", help="stage-1 learning rate (constant)"),
    epsilon: float = typer.Option(0.05, "--epsilon", help="stage 1 stops when the windowed mean loss changes by less than this (relative)"),
    patience: int = typer.Option(2, "--patience", help="... for this many consecutive windows"),
    window: int = typer.Option(20, "--window", help="steps per window"),
    max_steps: int = typer.Option(300, "--max-steps", help="stage-1 step cap"),
    gate_steps: int = typer.Option(60, "--gate-steps", help="stage-2 steps (learning the gates)"),
    gate_lr: float = typer.Option(0.1, "--gate-lr", help="stage-2 learning rate of the gate logits"),
    budget: float = typer.Option(0.25, "--budget", help="share of units the penalty lets stay open"),
    penalty: float = typer.Option(1.0, "--penalty", help="λ in λ·N·max(0, mean σ(s) − budget)²"),
    batch_size: int = typer.Option(8, "--batch-size"),
    max_length: int = typer.Option(256, "--max-length", help="truncate examples to this many tokens"),
    seed: int = typer.Option(0, "--seed"),
    dtype: DType = typer.Option(DType.float32, "--dtype", help="training dtype (float32 on CPU)"),
    force: bool = typer.Option(False, "--force", help="replace an existing --out / --plot"),
) -> None:
    """Rank the weight matrices (or blocks) a fine-tune on DATA needs: LoRA, then gates σ(s) on its updates."""
    from rich.console import Console

    from lm_eval_layers.training import ila_report
    from lm_eval_layers.training.ila import ILASettings
    from lm_eval_layers.training.ila_run import run as run_ila

    quiet_training_logs()
    with user_errors():
        settings = ILASettings(
            rank=rank, alpha=lora_alpha, lr=lr, epsilon=epsilon, patience=patience, window=window, max_steps=max_steps,
            gate_steps=gate_steps, gate_lr=gate_lr, budget=budget, penalty=penalty, unit=unit, batch_size=batch_size,
            max_length=max_length, seed=seed, dtype=dtype.value,
        )
        document = run_ila(model, data, out, plot, settings, console, force=force)
    Console().print(ila_report.table(document))
    console.print(f"wrote {out}" + (f" and {plot}" if plot else ""))


@app.command("compare")
def compare(
    files: List[Path] = typer.Argument(..., help="ila.json files (two or more), and optionally scores.json files of `surgery score --unit block`"),
    out: Optional[Path] = typer.Option(None, "--out", help="also write the comparison as JSON"),
) -> None:
    """Overlap of ILA rankings (Jaccard, chance beside it); per-block totals vs `surgery score` values."""
    from rich.console import Console
    from rich.table import Table

    from lm_eval_layers.errors import UsageError
    from lm_eval_layers.importance.scoring import SCHEMA as SCORES_SCHEMA
    from lm_eval_layers.training import ila_compare, ila_report

    with user_errors():
        runs, scores = [], []
        for path in files:
            document = ila_report.load_json(path)
            if document.get("schema") == SCORES_SCHEMA:
                scores.append((str(path), document))
            else:
                runs.append((str(path), ila_report.validate(document, path)))
        if not runs or len(runs) + len(scores) < 2:
            raise UsageError("compare needs two ila.json files, or one with a scores.json of `surgery score`")
        pairs = ila_compare.compare_runs(runs)
        against = [ila_compare.compare_scores(name, doc, s_name, s_doc) for name, doc in runs for s_name, s_doc in scores]
        if out is not None:
            ila_report.write(out, {"pairs": pairs, "scores": against})
    stdout = Console()
    if pairs:
        t = Table(title="ILA top sets: Jaccard overlap (chance = expected Jaccard of two random K-of-N sets)")
        for col in ("A", "B", "top", "K of N", "Jaccard", "chance"):
            t.add_column(col, justify="left" if col in ("A", "B") else "right")
        for r in pairs:
            t.add_row(r["a"], r["b"], r["top"], f"{r['k']} of {r['n']}", f"{r['jaccard']:.3f}", f"{r['chance']:.3f}")
        stdout.print(t)
    if against:
        t = Table(title="per-block ILA totals vs `surgery score` values (top-K overlap, chance K/N)")
        for col in ("ILA", "scores", "method", "Spearman ρ", *(f"top {r['top']}" for r in against[0]["top_k"])):
            t.add_column(col, justify="left" if col in ("ILA", "scores", "method") else "right")
        for r in against:
            t.add_row(r["ila"], r["scores"], str(r["method"]), f"{r['spearman']:+.3f}",
                      *(f"{o['overlap']:.2f} ({o['chance']:.2f})" for o in r["top_k"]))
        stdout.print(t)
    if out is not None:
        console.print(f"wrote {out}")

