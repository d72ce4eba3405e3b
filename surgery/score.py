"""`surgery score`: which layers matter. The options are `ScoreSettings`' fields; the run is the
library's (`lm_eval_layers.importance.session`); this module shows its progress and reports: a
table, scores.json and an optional PNG bar chart.

Under `torchrun` / `accelerate launch` every process evaluates its share of the coalitions and
rank 0 stores them and reports. Importing this module costs no torch, transformers, lm-eval or
datasets: `--help` and argument errors need none of them.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, TaskID, TimeElapsedColumn
from rich.table import Table

from lm_eval_layers.importance.settings import ScoreSettings
from surgery.options import Bars, command, console, results, user_errors


@command(ScoreSettings)
def score(settings: ScoreSettings) -> None:
    """Layer importance: Shapley values with confidence intervals, ablation, angular distance, block influence."""
    with user_errors(kept=None if settings.method.is_similarity else settings.store_path):
        from lm_eval_layers import distributed
        from lm_eval_layers.importance import session
        from lm_eval_layers.outputs import write_json

        manager = session.check_before_loading(settings)
        rank, world = distributed.setup()
        try:
            columns = ("{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
            with Bars(*columns, transient=True, disable=rank != 0) as bars:
                progress = _Progress(bars, world, settings.tol, quiet=rank != 0)
                progress.stage(f"loading {settings.model}")
                lm = session.load_model(settings)
                store = session.open_store(settings) if rank == 0 and not settings.method.is_similarity else None
                result = session.score_model(lm, settings, store, progress, manager)
        finally:
            distributed.finish(world)
        if result is None:  # another process of a distributed run: rank 0 reports
            return
        write_json(settings.out, result)
        if settings.plot:
            draw(result, settings.plot)
    results.print(table(result))
    console.print(f"{summary(result)}; written {settings.out}" + (f" and {settings.plot}" if settings.plot else ""))


class _Progress:
    """The library's progress reports (`session.Progress`) as bars, or plain lines when stderr
    is not a terminal."""

    def __init__(self, bars: Bars, world: int, tol: float | None, quiet: bool) -> None:
        self.bars, self.tol, self.quiet = bars, tol, quiet
        self.what = "evaluating coalitions" + (f" ({world} processes)" if world > 1 else "")
        self.step: TaskID | None = None
        self.step_text, self.step_start = "", 0.0
        self.bar: TaskID | None = None

    def _end_step(self) -> None:
        """Remove the finished step's bar; without a terminal, say how long it took (said at the
        end, so a step that fails leaves only its `error:` line)."""
        if self.step is not None:
            if not self.bars.console.is_terminal and not self.quiet:
                self.bars.console.print(f"{self.step_text}… {time.monotonic() - self.step_start:.0f} s", highlight=False)
            self.bars.remove_task(self.step)
            self.step = None

    def stage(self, text: str) -> None:
        self._end_step()
        self.step, self.step_text, self.step_start = self.bars.add_task(f"{text}…", total=None), text, time.monotonic()

    def note(self, text: str) -> None:
        if not self.quiet:
            self.bars.console.print(text, highlight=False)

    def coalitions(self, done: int, total: int, widest: float | None) -> None:
        self._end_step()
        what = self.what if widest is None else (
            f"{self.what}, widest 95% half-width {widest:.4f}" + (f" (tol {self.tol})" if self.tol else ""))
        if self.bar is None:
            self.bar = self.bars.add_task(what, total=total)
        self.bars.update(self.bar, completed=done, total=total, description=what)


def _number(value: float | None, scale: float = 1.0) -> str:
    return "-" if value is None else f"{scale * value:.4f}"


def table(result: dict[str, Any]) -> Table:
    """The units by rank with their 95% half-widths; columns and title parts that do not exist
    for the method (no estimator, metric or intervals for angular / bi) are left out."""
    estimator = f" ({result['estimator']})" if result.get("estimator") else ""
    metric = f", metric {result['metric']}" if result.get("metric") else ""
    t = Table(title=f"{result['method']}{estimator} of {result['model']}{metric}")
    units = sorted(result["units"], key=lambda u: u["rank"])
    extra = [(name, field) for name, field in (("± coalitions", "stderr"), ("± examples", "sample_stderr"))
             if any(u.get(field) for u in units)]  # ablation's coalition error is 0: no column of zeros
    for col in ("rank", "unit", "value", *(name for name, _ in extra)):
        t.add_column(col, justify="right")
    for u in units:
        t.add_row(str(u["rank"]), u["name"], f"{u['value']:.4f}", *(_number(u.get(field), 1.96) for _, field in extra))
    return t


def summary(result: dict[str, Any]) -> str:
    """One line: the efficiency check and the coalitions of a game; the text of angular / bi."""
    calibration = result.get("calibration")
    if calibration:
        return (f"{result['method']} on {calibration['windows']} windows of {calibration['tokens']} tokens of "
                f"{calibration['path']}")
    eff = result["efficiency"]
    reused = f", {result['reused']} of them read back from the store (--resume)" if result.get("reused") else ""
    if result["method"] not in ("shapley", "exact"):  # efficiency (Σφ = v(N) − v(∅)) is a property of Shapley values only
        return f"{result['evaluations']} coalitions{reused}"
    return (f"Σφ = {eff['sum_phi']:.4f}, v(N) − v(∅) = {eff['v_full_minus_v_empty']:.4f}; "
            f"{result['evaluations']} coalitions{reused}")


def draw(result: dict[str, Any], path: Path) -> None:
    """Bar chart of the values with 95% error bars (coalition sampling and examples combined)."""
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    units = result["units"]
    x = np.arange(len(units))
    values = np.array([u["value"] for u in units])
    err = 1.96 * np.hypot([u.get("stderr") or 0.0 for u in units], [u.get("sample_stderr") or 0.0 for u in units])
    fig, ax = plt.subplots(figsize=(max(6, 0.28 * len(units)), 3.6), dpi=120)
    ax.bar(x, values, yerr=err, capsize=2, color="#4477aa")
    if result.get("chance") is not None and result.get("v_full") is not None:
        loss = result["v_full"] - result["chance"]
        ax.axhline(loss, ls="--", color="#cc3311", lw=1, label=f"v(N) − chance = {loss:.3f}")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)  # beside the axes: covers no bar
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xticks(x, [u["name"].removeprefix("block ") for u in units], rotation=90, fontsize=7)
    ax.set_ylabel(f"{result['method']} value ({result.get('metric') or 'distance'}), 95% CI")
    ax.set_title(f"{result['model']}: {result['method']} per {result['unit']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")  # the legend outside the axes included
    plt.close(fig)
