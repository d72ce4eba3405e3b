"""`surgery score`: which layers matter. Loads the model once, evaluates coalitions as in-memory
variants on real lm-eval tasks (stored in SQLite next to --out), and writes scores.json, a table
and a PNG bar chart."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
from rich.table import Table

from lm_eval_layers.data import ENV
from lm_eval_layers.importance.estimators import Estimate
from lm_eval_layers.importance.scoring import METHODS, check_exact, chance_level, report, score_units
from lm_eval_layers.importance.value import METRICS, UNITS, Store, TaskGame, by_metric, example_scores, num_players
from lm_eval_layers.errors import UsageError


@dataclass
class ScoreOptions:
    """The options of `surgery score`; their defaults and help live on the command (cli.py)."""

    model: str
    method: str
    unit: str
    tasks: tuple[str, ...]
    include_path: Path | None
    limit: int | None
    metric: str
    budget: int
    estimator: str
    seed: int
    level: int
    position: str
    out: Path
    plot: Path | None
    resume: bool
    force: bool
    dtype: str
    batch_size: int
    calibration: Path | None


def validate(o: ScoreOptions) -> None:
    """Every option checked before the model loads."""
    checks = [
        (o.method in METHODS, f"--method {o.method!r} is unknown; use one of {', '.join(METHODS)}"),
        (o.unit in UNITS, f"--unit {o.unit!r} is unknown; use block, attn or mlp"),
        (o.metric in METRICS, f"--metric {o.metric!r} is unknown; use one of {', '.join(METRICS)}"),
        (o.estimator in ("regression", "permutation"), f"--estimator {o.estimator!r} is unknown; use regression or permutation"),
        (o.position in ("last", "all"), f"--position {o.position!r} is unknown; use last or all"),
        (o.budget >= 4, "--budget must be at least 4 evaluations"),
        (o.level >= 1, "--level must be at least 1"),
        (o.method not in ("angular", "bi") or o.unit == "block", f"--method {o.method} scores blocks; use --unit block"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    store = o.out.with_suffix(".sqlite")
    if o.method not in ("angular", "bi") and store.exists() and not o.resume:
        raise UsageError(f"{store} already holds evaluations; pass --resume to reuse them, or choose another --out")


def run(o: ScoreOptions, console: Console) -> dict | None:
    """Score the units. Under `torchrun` / `accelerate launch` every process evaluates its share
    of the coalitions; rank 0 stores them, writes the results and returns them (others: None)."""
    from lm_eval.tasks import TaskManager

    from lm_eval_layers.arch import num_layers
    from lm_eval_layers.importance import distributed
    from lm_eval_layers.importance.games import from_key
    from lm_eval_layers.importance.scoring import planned_coalitions
    from lm_eval_layers.model import LayeredLM

    validate(o)
    rank, world = distributed.setup()
    with console.status(f"loading {o.model}…"):
        lm = LayeredLM(pretrained=o.model, dtype=o.dtype, device=distributed.device(), batch_size=o.batch_size)
    lm._rank, lm._world_size = 0, 1  # every process is a whole replica: lm-eval must not shard requests
    depth = num_layers(lm.model.config)
    model_type = lm.model.config.model_type
    n = num_players(o.unit, depth)
    if o.method == "exact":
        try:
            check_exact(n, o.force)
        except ValueError as e:
            raise UsageError(str(e)) from None
    common = dict(model=o.model, model_type=model_type, num_layers=depth, unit=o.unit, method=o.method, seed=o.seed)
    if o.method in ("angular", "bi"):
        if rank != 0:
            return None
        from lm_eval_layers.importance.similarity import block_similarity, calibration_batches

        text = _calibration_text(o.calibration)
        sims = block_similarity(lm.model, calibration_batches(lm.tokenizer, text), o.position)
        values = np.array(sims[o.method])
        est = Estimate(o.method, values, np.zeros(n), 0, float("nan"), float("nan"))
        result = report(est, None, estimator=None, metric=None, tasks=[], limit=None, budget=None, chance=None,
                        extra={"position": o.position}, **common)
    else:
        manager = TaskManager(include_path=str(o.include_path) if o.include_path else None)
        tasks = list(o.tasks)
        evaluate = _evaluator(lm, tasks, manager, o.limit, console)
        context = {"model": o.model, "dtype": o.dtype, "tasks": sorted(tasks), "limit": o.limit, "unit": o.unit}
        store = None
        if rank == 0:
            o.out.parent.mkdir(parents=True, exist_ok=True)
            store = Store(o.out.with_suffix(".sqlite"), context)
        game = TaskGame(evaluate, depth, o.unit, o.metric, store)  # type: ignore[arg-type]
        planned = planned_coalitions(n, o.method, o.budget, o.estimator, o.seed, o.level)
        todo = distributed.broadcast(
            [k for k in planned if store.get(game.name(from_key(k, n))) is None] if store is not None else None, world)
        columns = ("{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console, transient=True, disable=rank != 0) as progress:
            what = f"evaluating coalitions ({len(planned) - len(todo)} stored" + (f", {world} processes)" if world > 1 else ")")
            bar = progress.add_task(what, total=len(todo))
            per_process = distributed.evaluate_shared(
                todo, lambda k: game.compute(from_key(k, n)), lambda k, scores: game.commit(from_key(k, n), scores),
                rank, world, on_round=lambda count: progress.advance(bar, count))
        distributed.finish(world)
        if rank != 0:
            return None
        est, used, sample_se = score_units(game, o.method, o.budget, o.estimator, o.seed, o.level, o.force)
        result = report(est, sample_se, estimator=o.estimator if o.method == "shapley" else None, metric=o.metric,
                        tasks=tasks, limit=o.limit, budget=o.budget if o.method == "shapley" else None,
                        chance=chance_level(game),
                        extra={"new_evaluations": sum(per_process), "reused": len(planned) - len(todo),
                               "evaluations_per_process": per_process},
                        **common)
    tmp = o.out.with_suffix(".json.partial")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(o.out)
    if o.plot:
        plot(result, o.plot)
    return result


def _evaluator(lm, tasks: list[str], manager, limit: int | None, console: Console):
    """Per-example scores of a variant: the fast path (prepared requests, prefix reuse) for
    log-likelihood tasks, else lm-eval's own loop."""
    from lm_eval_layers.evaluate import evaluate_plans
    from lm_eval_layers.fast import FastEvaluator, PreparedTasks, UnsupportedTask

    try:
        with console.status("preparing requests and caching the full model's hidden states…"):
            fast = FastEvaluator(lm, PreparedTasks(lm, tasks, manager, limit))
        return lambda plan: fast.evaluate(plan)[1]
    except UnsupportedTask as e:
        console.print(f"slow path: {e}")

    def slow(plan):
        samples = evaluate_plans(lm, [("coalition", plan)], tasks, manager, limit=limit, log_samples=True)[0].samples
        return {task: by_metric([example_scores(s) for s in sorted(rows, key=lambda s: s["doc_id"])])
                for task, rows in samples.items()}

    return slow


def _calibration_text(path: Path | None) -> str:
    if path is not None:
        if not path.is_file():
            raise UsageError(f"--calibration {path} does not exist; give a text file")
        return path.read_text(encoding="utf-8")
    root = os.environ.get(ENV)
    raw = Path(root) / "wikitext2" / "wiki.test.raw" if root else None
    if raw is None or not raw.is_file():
        raise UsageError(f"angular/bi need calibration text: pass --calibration FILE or set {ENV} to a data folder with wikitext2/")
    return raw.read_text(encoding="utf-8")


def table(result: dict) -> Table:
    t = Table(title=f"{result['method']} ({result.get('estimator') or '-'}) of {result['model']}, metric {result.get('metric')}")
    for col in ("rank", "unit", "value", "± coalitions", "± examples"):
        t.add_column(col, justify="right")
    for u in sorted(result["units"], key=lambda u: u["rank"]):
        t.add_row(str(u["rank"]), u["name"], f"{u['value']:.4f}", f"{1.96 * u['stderr']:.4f}",
                  f"{1.96 * u['sample_stderr']:.4f}" if "sample_stderr" in u else "-")
    return t


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    units = result["units"]
    x = np.arange(len(units))
    values = np.array([u["value"] for u in units])
    # 95% error bars from both sources of error: coalition sampling and benchmark examples
    err = 1.96 * np.hypot([u["stderr"] for u in units], [u.get("sample_stderr", 0.0) for u in units])
    fig, ax = plt.subplots(figsize=(max(6, 0.28 * len(units)), 3.6), dpi=120)
    ax.bar(x, values, yerr=err, capsize=2, color="#4477aa")
    if result.get("chance") is not None and result.get("v_full") is not None:
        loss = result["v_full"] - result["chance"]
        ax.axhline(loss, ls="--", color="#cc3311", lw=1, label=f"v(N) − chance = {loss:.3f}")
        ax.legend(loc="upper right", fontsize=8)
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xticks(x, [u["name"].replace("block ", "") for u in units], rotation=90, fontsize=7)
    ax.set_ylabel(f"{result['method']} value ({result.get('metric') or 'distance'}), 95% CI")
    ax.set_title(f"{result['model']}: {result['method']} per {result['unit']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
