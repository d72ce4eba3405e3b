"""`surgery score`: which layers matter. Parses the options, loads the model once, scores the
units with the library (`lm_eval_layers.importance`, `lm_eval_layers.similarity`) and reports:
a table, scores.json and an optional PNG bar chart.

Under `torchrun` / `accelerate launch` every process evaluates its share of the coalitions and
rank 0 stores them and reports (`lm_eval_layers.distributed`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
from rich.table import Table

from lm_eval_layers.data import ENV
from lm_eval_layers.errors import UsageError
from lm_eval_layers.importance.scoring import DEFAULT_ESTIMATOR, Estimator, Method
from lm_eval_layers.importance.task_game import Metric, Unit
from lm_eval_layers.similarity import Position
from lm_eval_layers.precision import DType
from surgery.options import ModelArg, console, user_errors


def score(
    model: str = ModelArg,
    method: Method = typer.Option(Method.shapley, "--method", help="how units are scored"),
    unit: Unit = typer.Option(Unit.block, "--unit", help="whole blocks, or both halves of every block (attn/mlp)"),
    tasks: str = typer.Option("arc_easy_local", "--tasks", help="comma-separated lm-eval tasks (the shipped *_local tasks are always found)"),
    include_path: Optional[Path] = typer.Option(None, "--include-path", help="a folder of extra task YAMLs"),
    limit: Optional[int] = typer.Option(100, "--limit", help="documents per task"),
    metric: Metric = typer.Option(Metric.acc, "--metric", help="per-example metric the game averages"),
    budget: int = typer.Option(400, "--budget", help="coalition evaluations for --method shapley"),
    estimator: str = typer.Option(DEFAULT_ESTIMATOR.value, "--estimator",
                                  help=f"Shapley estimator: {'|'.join(e.value for e in Estimator)}, or shapiq:NAME (optional extra)"),
    tol: Optional[float] = typer.Option(None, "--tol", help="stop once the widest 95% coalition-sampling half-width is ≤ TOL (or the budget is spent)"),
    seed: int = typer.Option(0, "--seed"),
    level: int = typer.Option(3, "--level", help="window length for --method window"),
    position: Position = typer.Option(Position.last, "--position", help="angular distance at the last token or all tokens"),
    out: Path = typer.Option(Path("scores.json"), "--out", help="scores JSON (evaluations go to the same name .sqlite)"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="PNG bar chart with error bars"),
    resume: bool = typer.Option(False, "--resume", help="reuse the evaluations stored next to --out"),
    force: bool = typer.Option(False, "--force", help="allow --method exact above 16 units"),
    dtype: DType = typer.Option(DType.float32, "--dtype"),
    batch_size: int = typer.Option(32, "--batch-size"),
    calibration: Optional[Path] = typer.Option(None, "--calibration", help="text file for angular / bi"),
) -> None:
    """Layer importance: Shapley values with confidence intervals, ablation, angular distance, block influence."""
    from lm_eval_layers import distributed

    names = [t for t in tasks.split(",") if t]
    with user_errors():
        _check_options(method, unit, budget, level, estimator, tol)
        if method.is_similarity:
            text = _calibration_text(calibration)
        else:
            manager = _task_manager(include_path, names)
        rank, world = distributed.setup()
        try:
            if rank == 0:
                _check_store(method, out, resume)
            lm = _load(model, dtype.value, batch_size)
            if method.is_similarity:
                result = _by_similarity(lm, model, method, position, text) if rank == 0 else None
            else:
                result = _by_game(lm, model, dtype.value, method, unit, names, manager, limit, metric, budget,
                                  estimator, tol, seed, level, force, out, rank, world)
        finally:
            distributed.finish(world)
        if result is None:  # another process of a distributed run: rank 0 reports
            return
        _write_json(result, out)
        if plot:
            draw(result, plot)
    Console().print(table(result))
    eff = result["efficiency"]
    console.print(f"Σφ = {eff['sum_phi']:.4f}, v(N) − v(∅) = {eff['v_full_minus_v_empty']:.4f}; "
                  f"{result['evaluations']} coalitions; written {out}" + (f" and {plot}" if plot else ""))


def _check_options(method: Method, unit: Unit, budget: int, level: int, estimator: str, tol: float | None) -> None:
    """What can be refused before anything loads."""
    from lm_eval_layers.importance.scoring import check_estimator
    from lm_eval_layers.importance.stopping import check_tol

    check_estimator(estimator)
    if tol is not None:
        check_tol(tol, method.value, estimator)
    if budget < 4:
        raise UsageError("--budget must be at least 4 evaluations")
    if level < 1:
        raise UsageError("--level must be at least 1")
    if method.is_similarity and unit != Unit.block:
        raise UsageError(f"--method {method.value} scores blocks; use --unit block")


def _check_store(method: Method, out: Path, resume: bool) -> None:
    store = out.with_suffix(".sqlite")
    if not method.is_similarity and store.exists() and not resume:
        raise UsageError(f"{store} already holds evaluations; pass --resume to reuse them, or choose another --out")


def _task_manager(include_path: Path | None, names: list[str]) -> Any:
    from lm_eval_layers.task_suite import check_task_names, task_manager

    manager = task_manager(include_path)
    check_task_names(manager, names)
    return manager


def _load(model: str, dtype: str, batch_size: int) -> Any:
    from lm_eval_layers import distributed
    from lm_eval_layers.model import LayeredLM

    with console.status(f"loading {model}…"):
        lm = LayeredLM(pretrained=model, dtype=dtype, device=distributed.device(), batch_size=batch_size)
    lm._rank, lm._world_size = 0, 1  # every process is a whole replica: lm-eval must not shard requests
    return lm


def _common(lm: Any, model: str, unit: Unit, method: Method, seed: int) -> dict[str, Any]:
    from lm_eval_layers.arch import num_layers

    return dict(model=model, model_type=lm.model.config.model_type, num_layers=num_layers(lm.model.config),
                unit=unit.value, method=method.value, seed=seed)


def _by_similarity(lm: Any, model: str, method: Method, position: Position, text: str) -> dict[str, Any]:
    from lm_eval_layers.importance.estimators import Estimate
    from lm_eval_layers.importance.scoring import report
    from lm_eval_layers.similarity import block_similarity, calibration_batches

    with console.status(f"{method.value} on calibration text…"):
        sims = block_similarity(lm.model, calibration_batches(lm.tokenizer, text), position.value)
    values = np.array(sims[method.value])
    est = Estimate(method.value, values, np.zeros(len(values)), 0, float("nan"), float("nan"))
    return report(est, None, estimator=None, metric=None, tasks=[], limit=None, budget=None, chance=None,
                  extra={"position": position.value}, **_common(lm, model, Unit.block, method, 0))


def _by_game(lm: Any, model: str, dtype: str, method: Method, unit: Unit, tasks: list[str], manager: Any,
             limit: int | None, metric: Metric, budget: int, estimator: str, tol: float | None, seed: int, level: int,
             force: bool, out: Path, rank: int, world: int) -> dict[str, Any] | None:
    """Evaluate the method's coalitions round by round (split across processes); rank 0
    estimates after each round and decides when to stop, then reports."""
    from lm_eval_layers import distributed
    from lm_eval_layers.default_model import resolve_alias
    from lm_eval_layers.evaluate import Evaluator
    from lm_eval_layers.identity import model_identity
    from lm_eval_layers.importance import stopping
    from lm_eval_layers.importance.games import CachedGame, from_key
    from lm_eval_layers.importance.scoring import chance_level, check_exact, estimate, report, score_units
    from lm_eval_layers.importance.store import Store
    from lm_eval_layers.importance.task_game import TaskGame, num_players

    common = _common(lm, model, unit, method, seed)
    n = num_players(unit, common["num_layers"])
    if method == Method.exact:
        check_exact(n, force)
    with console.status("preparing requests and caching the full model's hidden states…"):
        evaluator = Evaluator(lm, tasks, manager, limit)
    if evaluator.fallback and rank == 0:
        console.print(f"lm-eval's own loop for every variant: {evaluator.fallback}")
    store = None
    if rank == 0:
        path, gguf = resolve_alias(model, None)
        context = {"model": model_identity(str(path), gguf_file=gguf), "dtype": dtype, "tasks": sorted(tasks),
                   "limit": limit, "unit": unit.value}
        out.parent.mkdir(parents=True, exist_ok=True)
        store = Store(out.with_suffix(".sqlite"), context)
    game = TaskGame(lambda plan: evaluator.evaluate(plan).examples, common["num_layers"], unit.value, metric.value,
                    store)  # type: ignore[arg-type]
    rounds = stopping.plan(n, method.value, budget, estimator, seed, level, stopping.ROUNDS if tol else 1)
    per_process, reused = [0] * world, 0
    columns = ("{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True, disable=rank != 0) as progress:
        what = "evaluating coalitions" + (f" ({world} processes)" if world > 1 else "")
        bar = progress.add_task(what, total=sum(len(todo) for _, todo in rounds))

        def evaluate(planned: list[int]) -> None:
            nonlocal reused
            todo = distributed.broadcast(
                [k for k in planned if store.get(game.name(from_key(k, n))) is None] if store is not None else None, world)
            reused += len(planned) - len(todo)
            progress.advance(bar, len(planned) - len(todo))
            counts = distributed.evaluate_shared(
                todo, lambda k: game.compute(from_key(k, n)), lambda k, scores: game.commit(from_key(k, n), scores),
                rank, world, on_round=lambda count: progress.advance(bar, count))
            per_process[:] = [a + b for a, b in zip(per_process, counts)]

        def show(width: float) -> None:
            progress.update(bar, description=f"{what}, widest 95% half-width {width:.4f}" + (f" (tol {tol})" if tol else ""))

        stop = stopping.run(rounds, evaluate,
                            lambda b: estimate(method.value, CachedGame(game, n), b, estimator, seed, level) if rank == 0 else None,
                            tol, lambda decision: distributed.broadcast(decision, world), show)
    if rank != 0:
        return None
    est, _, sample_se = score_units(game, method.value, stop.budget, estimator, seed, level, force)
    shapley = method == Method.shapley
    extra = {"new_evaluations": sum(per_process), "reused": reused, "evaluations_per_process": per_process}
    if tol is not None:
        extra.update(tol=tol, stop_reason=stop.reason, rounds=stop.round, rounds_planned=stop.rounds,
                     round_budget=stop.budget, widest_half_width=stop.half_width)
    return report(est, sample_se, estimator=estimator if shapley else None, metric=metric.value, tasks=tasks,
                  limit=limit, budget=budget if shapley else None, chance=chance_level(game), extra=extra, **common)


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


def _write_json(result: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.partial")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out)


def table(result: dict[str, Any]) -> Table:
    t = Table(title=f"{result['method']} ({result.get('estimator') or '-'}) of {result['model']}, metric {result.get('metric')}")
    for col in ("rank", "unit", "value", "± coalitions", "± examples"):
        t.add_column(col, justify="right")
    for u in sorted(result["units"], key=lambda u: u["rank"]):
        t.add_row(str(u["rank"]), u["name"], f"{u['value']:.4f}", f"{1.96 * u['stderr']:.4f}",
                  f"{1.96 * u['sample_stderr']:.4f}" if "sample_stderr" in u else "-")
    return t


def draw(result: dict[str, Any], path: Path) -> None:
    """Bar chart of the values with 95% error bars (coalition sampling and examples combined)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    units = result["units"]
    x = np.arange(len(units))
    values = np.array([u["value"] for u in units])
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
