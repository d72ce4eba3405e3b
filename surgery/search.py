"""`surgery search`: which units to remove for a budget. Parses the settings, runs the
library's search (`lm_eval_layers.search.driver.find_plan`) and reports: a table of the steps,
search.json and an optional PNG of the objective against units removed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lm_eval_layers.search.settings import SearchSettings
from surgery.options import Bars, command, console, quiet_training_logs, results, user_errors


@command(SearchSettings)
def search(settings: SearchSettings) -> None:
    """Choose what to cut: greedy (SLEB), beam, evolve (EvoPress), rankings or the deepest units, to --remove K units or keep --params P%."""
    from rich.progress import BarColumn, MofNCompleteColumn, TimeElapsedColumn

    from lm_eval_layers.outputs import write_json
    from lm_eval_layers.search.driver import find_plan

    quiet_training_logs()  # our bar, not transformers' loading bars
    with user_errors(kept=settings.store_path):
        with Bars("{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=True) as bars:
            bar = bars.add_task("loading the model", total=None)
            doc = find_plan(settings, lambda what, done, total: bars.update(bar, description=what, completed=done, total=total))
        if doc is None:  # another process of a torchrun search: rank 0 writes and reports
            return
        write_json(settings.out, doc)
        if settings.plot:
            draw(doc, settings.plot)
    results.print(table(doc))
    console.print(f"{doc['description']}; {doc['params']:,} of {doc['total_params']:,} parameters kept; "
                  f"{doc['block_passes']:.0f} block passes in {doc['search_seconds']:.1f} s; "
                  f"{doc['evaluations']['computed']} candidates evaluated, {doc['evaluations']['stored']} read back from "
                  f"{settings.store_path}; written {settings.out}"
                  + (f" and {settings.plot}" if settings.plot else ""))


def table(doc: dict[str, Any]) -> Any:
    from rich.table import Table

    t = Table(title=f"{doc['method']} search of {doc['model']} ({doc['unit']} units; {doc['minimised']['meaning']}: "
                    f"full model {doc['full_objective']:.4f})")
    evolve = any("generation" in s for s in doc["steps"])  # a step per generation: its best set
    for col in ("generation" if evolve else "step", "removed", doc["minimised"]["label"], "runner-up", "margin 95% CI",
                "params kept", "block passes"):
        t.add_column(col, justify="right")
    for i, s in enumerate(doc["steps"], 1):
        runner = f"{s['runner_up']['removed']} ({s['runner_up']['objective']:.4f})" if s["runner_up"] else "-"
        ci = f"[{s['margin_ci'][0]:.4f}, {s['margin_ci'][1]:.4f}]" if s["margin_ci"] else "-"
        t.add_row(str(s["generation"] if evolve else i), ",".join(map(str, s["removed"])) if evolve else str(s["removed"][-1]),
                  f"{s['objective']:.4f}", runner, ci,
                  f"{s['params'] / doc['total_params']:.1%}", f"{s['block_passes']:.0f}")
    return t


def draw(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evolve = any("generation" in s for s in doc["steps"])
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    if evolve:  # the best set's objective per generation
        ax.plot([s["generation"] for s in doc["steps"]], [s["objective"] for s in doc["steps"]], marker="o", color="#4477aa")
        ax.axhline(doc["full_objective"], ls="--", color="#888888", lw=1, label="full model")
        ax.legend(loc="upper right", fontsize=8)
        ax.set_xlabel(f"generation ({len(doc['steps'][-1]['removed'])} {doc['unit']} units removed)")
    else:
        xs = [0] + [len(s["removed"]) for s in doc["steps"]]
        ys = [doc["full_objective"]] + [s["objective"] for s in doc["steps"]]
        ax.plot(xs, ys, marker="o", color="#4477aa")
        for x, y, s in zip(xs[1:], ys[1:], doc["steps"]):
            ax.annotate(str(s["removed"][-1]), (x, y), textcoords="offset points", xytext=(0, 5), ha="center", fontsize=7)
        ax.set_xlabel(f"{doc['unit']} units removed")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # units and generations are counts
    ax.set_ylabel(doc["minimised"]["label"])
    ax.set_title(f"{doc['model']}: {doc['method']} search", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
