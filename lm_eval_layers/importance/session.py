"""A scoring run on a loaded model, start to end: what `surgery score` runs, what a Python
caller runs without the CLI, and what a search over layer plans can reuse.

    settings = ScoreSettings("smollm2", method=Method.ablation, limit=50)
    check_before_loading(settings)
    document = score_model(load_model(settings), settings, open_store(settings))

Game methods evaluate their coalitions round by round (more than one round with `--tol`),
split across the processes of a `torchrun` / `accelerate launch` run (`distributed.py`); rank 0
keeps every result in the store, estimates after each round, decides when to stop and builds
the scores.json document (`scoring.py`). Angular distance and block influence need only forward
passes of the full model on calibration text.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lm_eval_layers import distributed
from lm_eval_layers.errors import UsageError
from lm_eval_layers.importance.settings import Method, ScoreSettings
from lm_eval_layers.importance.store import Store
from lm_eval_layers.outputs import check_file


class Progress:
    """What a scoring run reports while it works; this one says nothing. Subclass it, or pass
    any object with these three methods, to show them (`surgery score` draws progress bars)."""

    def stage(self, text: str) -> None:
        """A step without a count begins; it ends when the next report comes."""

    def note(self, text: str) -> None:
        """Something the user should read once (e.g. why lm-eval's own loop runs)."""

    def coalitions(self, done: int, total: int, widest: float | None) -> None:
        """`done` of `total` coalitions evaluated or found stored; `widest` 95% half-width of the
        last estimate (with `--tol`), None before the first."""


def check_before_loading(settings: ScoreSettings) -> Any:
    """What can be refused before a model loads, beyond the settings' own checks: unknown task
    names, an existing --out without --force, stored evaluations without --resume. Returns the
    lm-eval task manager of a game method (None for angular / bi)."""
    check_file(settings.out, settings.force)
    if settings.method.is_similarity:
        return None
    store = settings.store_path
    if store.exists() and not settings.resume:
        raise UsageError(f"{store} already holds evaluations; pass --resume to reuse them, or choose another --out")
    from lm_eval_layers.task_suite import check_task_names, task_manager

    manager = task_manager(settings.include_path)
    check_task_names(manager, settings.task_names)
    return manager


def load_model(settings: ScoreSettings) -> Any:
    """The model as a `LayeredLM` on this process's device (its own GPU under a launcher)."""
    from lm_eval_layers.model import LayeredLM

    return LayeredLM(pretrained=settings.model, dtype=settings.dtype.value, device=distributed.device(),
                     batch_size=settings.batch_size)


def open_store(settings: ScoreSettings) -> Store:
    """The store next to --out, answering only for these model files, dtype, tasks, limit and unit."""
    from lm_eval_layers.default_model import resolve_alias
    from lm_eval_layers.identity import model_identity

    path, gguf = resolve_alias(settings.model, None)
    context = {"model": model_identity(str(path), gguf_file=gguf), "dtype": settings.dtype.value,
               "tasks": sorted(settings.task_names), "limit": settings.limit, "unit": settings.players.value}
    return Store(settings.store_path, context)


def score_model(lm: Any, settings: ScoreSettings, store: Store | None = None, progress: Progress | None = None,
                manager: Any = None) -> dict[str, Any] | None:
    """Score the units of `lm` (a `LayeredLM`) as `settings` say. Returns the scores.json
    document on rank 0 and None on the other processes of a distributed run. `store` (rank 0)
    keeps the evaluated coalitions; without one they are kept in memory for this call."""
    rank, world = distributed.current()
    progress = progress if progress is not None and rank == 0 else Progress()
    distributed.one_replica(lm)
    if settings.method.is_similarity:
        return _by_similarity(lm, settings, progress) if rank == 0 else None
    if rank == 0 and store is None:
        store = Store(None, {})
    return _by_game(lm, settings, store, progress, manager, rank, world)


def _header(lm: Any, settings: ScoreSettings) -> dict[str, Any]:
    from lm_eval_layers.arch import num_layers

    return dict(model=settings.model, model_type=lm.model.config.model_type, num_layers=num_layers(lm.model.config))


def _by_similarity(lm: Any, settings: ScoreSettings, progress: Progress) -> dict[str, Any]:
    from lm_eval_layers.calibration import parse_shape, read_calibration
    from lm_eval_layers.importance.scoring import similarity_report
    from lm_eval_layers.similarity import block_similarity, calibration_batches

    method = settings.method
    text = read_calibration(settings.calibration)
    progress.stage(f"{method.value} on {text.path.name}")
    count, size = parse_shape(settings.tokens)
    batches = calibration_batches(lm.tokenizer, text.text, tokens=size, count=count)
    sims = block_similarity(lm.model, batches, settings.position.value)
    calibration = {"path": str(text.path), "sha256": text.sha256, "windows": sum(len(b) for b in batches),
                   "tokens": int(batches[0].shape[1])}
    return similarity_report(sims[method.value], method=method, extra={"position": settings.position.value,
                                                                        "calibration": calibration},
                             **_header(lm, settings))


def _metric_on_the_full_model(game: Any, rank: int, world: int) -> bool:
    """v(N)'s columns come first, so a metric some task does not report is refused before any
    other coalition runs and before anything is stored. True when v(N) was evaluated here."""
    from lm_eval_layers.importance.task_game import check_metric

    problem, evaluated = None, False
    if rank == 0:
        full = np.ones(game.n, bool)
        scores = game.store.get(game.name(full))
        if scores is None:
            scores, evaluated = game.compute(full), True
        try:
            check_metric(scores, game.metric)
        except UsageError as e:
            problem = str(e)
        else:
            if evaluated:
                game.commit(full, scores)
    problem = distributed.broadcast(problem, world)
    if problem:
        raise UsageError(problem)
    return evaluated


def _task_game(lm: Any, settings: ScoreSettings, store: Store | None, progress: Progress, manager: Any,
               num_layers: int) -> Any:
    """The game over lm-eval's tasks: requests prepared and the full model's hidden states cached
    once for every coalition, and the store narrowed to these tasks' configs and documents (an
    edited task is never answered from it)."""
    from lm_eval_layers.evaluate import Evaluator
    from lm_eval_layers.importance.task_game import TaskGame

    if manager is None:
        from lm_eval_layers.task_suite import task_manager

        manager = task_manager(settings.include_path)
    progress.stage("preparing requests and caching the full model's hidden states")
    evaluator = Evaluator(lm, settings.task_names, manager, settings.limit)
    if store is not None:
        store = store.within({"task_identity": evaluator.identity})
    if evaluator.fallback:
        progress.note(f"lm-eval's own loop for every variant: {evaluator.fallback}")
    return TaskGame(lambda plan: evaluator.evaluate(plan).examples, num_layers, settings.players, settings.metric.value,
                    store)  # type: ignore[arg-type]  (None on ranks other than 0: they never store)


def _by_game(lm: Any, settings: ScoreSettings, store: Store | None, progress: Progress, manager: Any, rank: int,
             world: int) -> dict[str, Any] | None:
    """Evaluate the method's coalitions round by round (split across processes); rank 0
    estimates after each round and decides when to stop, then reports."""
    from lm_eval_layers.importance import stopping
    from lm_eval_layers.importance.games import CachedGame, from_key, key
    from lm_eval_layers.importance.scoring import check_exact, estimate

    header = _header(lm, settings)
    method, tol = settings.method, settings.tol
    estimator, seed, level = settings.shapley_estimator or "", settings.seed, settings.level
    n = settings.players.players(header["num_layers"])
    if method is Method.exact:
        check_exact(n, settings.force)
    game = _task_game(lm, settings, store, progress, manager, header["num_layers"])
    fresh = {key(np.ones(n, bool))} if _metric_on_the_full_model(game, rank, world) else set()
    rounds = stopping.plan(n, method.value, settings.budget, estimator, seed, level, stopping.ROUNDS if tol else 1)
    per_process, reused, done = [len(fresh)] + [0] * (world - 1), 0, 0
    total, widest = sum(len(todo) for _, todo in rounds), None

    def evaluate(planned: list[int]) -> None:
        nonlocal reused, done
        todo = distributed.broadcast(
            [k for k in planned if game.store.get(game.name(from_key(k, n))) is None] if game.store is not None else None,
            world)
        skipped = set(planned) - set(todo)
        reused += len(skipped - fresh)
        done += len(skipped)
        progress.coalitions(done, total, widest)

        def advanced(count: int) -> None:
            nonlocal done
            done += count
            progress.coalitions(done, total, widest)

        counts = distributed.evaluate_shared(
            todo, lambda k: game.compute(from_key(k, n)), lambda k, scores: game.commit(from_key(k, n), scores),
            rank, world, on_round=advanced)
        per_process[:] = [a + b for a, b in zip(per_process, counts)]

    def show(width: float) -> None:
        nonlocal widest
        widest = width
        progress.coalitions(done, total, widest)

    stop = stopping.run(rounds, evaluate,
                        lambda b: estimate(method, CachedGame(game, n), b, estimator, seed, level) if rank == 0 else None,
                        tol, lambda decision: distributed.broadcast(decision, world), show)
    if rank != 0:
        return None
    counts = {"new_evaluations": sum(per_process), "reused": reused, "evaluations_per_process": per_process}
    return _game_report(game, settings, stop, counts, header)


def _game_report(game: Any, settings: ScoreSettings, stop: Any, counts: dict[str, Any],
                 header: dict[str, Any]) -> dict[str, Any]:
    """The scores.json document of a game method (rank 0): the units' values at the budget the
    run stopped at, what it evaluated or reused (`counts`), and with --tol why it stopped."""
    from lm_eval_layers.importance.scoring import chance_level, finite, report, score_units

    method, seed, tol = settings.method, settings.seed, settings.tol
    est, _, sample_se = score_units(game, method, stop.budget, settings.shapley_estimator or "", seed, settings.level,
                                    settings.force)
    shapley = method is Method.shapley
    extra = dict(counts)
    if tol is not None:
        extra.update(tol=tol, stop_reason=stop.reason, rounds=stop.round, rounds_planned=stop.rounds,
                     round_budget=stop.budget, widest_half_width=finite(stop.half_width))
    return report(est, sample_se, estimator=settings.shapley_estimator, metric=settings.metric.value,
                  tasks=settings.task_names, limit=settings.limit, budget=settings.budget if shapley else None,
                  chance=chance_level(game), unit=settings.players, method=method, seed=seed, extra=extra, **header)
