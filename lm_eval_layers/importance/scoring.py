"""Score the units of a loaded model: run a method against the task game, add benchmark-sample
uncertainty from the stored per-example scores, and build the documented scores.json.

scores.json (schema `lm-eval-layers/scores/v1`): model, model_type, num_layers, unit (`block`, or
`halves`; files of earlier versions say `attn` or `mlp` for halves), method, estimator, metric,
tasks, limit, budget, evaluations (coalitions used), seed, v_empty, v_full, chance (accuracy of
guessing, when defined), efficiency {sum_phi, v_full_minus_v_empty, gap}, new_evaluations,
reused, evaluations_per_process; with `--tol` also tol, stop_reason ("tolerance" or "budget"),
rounds (the round reported), rounds_planned, round_budget and widest_half_width (of the
coalition-sampling 95% intervals at that round); and `units`: one entry per unit in unit order
with name, index, value, stderr, ci_low, ci_high (coalition-sampling error), sample_stderr,
sample_ci_low, sample_ci_high (bootstrap over examples), rank (1 = most important).
`angular` and `bi` add position and calibration {path, sha256, windows, tokens}.

A value that does not exist is null, never NaN: for angular/bi the game's values (v_empty,
v_full, chance, efficiency, estimator, metric, budget) and the intervals; for an estimate from a
single sample, its interval.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from lm_eval_layers.columns import value_of
from lm_eval_layers.errors import UsageError
from lm_eval_layers.importance import estimators, shapiq_adapter
from lm_eval_layers.importance.games import CachedGame, key
from lm_eval_layers.importance.settings import EXACT_LIMIT, Estimator, Method, Unit, estimator_name
from lm_eval_layers.importance.task_game import TaskGame

SCHEMA = "lm-eval-layers/scores/v1"

# The Shapley estimators by name, each called as (game, budget, seed, bootstrap resamples).
SHAPLEY: dict[Estimator, Callable[[CachedGame, int, int, int], estimators.Estimate]] = {
    Estimator.ramc: lambda game, budget, seed, _: estimators.ramc(game, budget, seed),
    Estimator.ramc_kadd: lambda game, budget, seed, _: estimators.ramc(game, budget, seed, surrogate="kadd"),
    Estimator.regression: lambda game, budget, seed, bootstrap: estimators.regression(game, budget, seed, bootstrap=bootstrap),
    Estimator.permutation: lambda game, budget, seed, _: estimators.permutation(game, budget, seed),
}


def estimate(method: Method | str, game: CachedGame, budget: int, estimator: str, seed: int, level: int,
             bootstrap: int = 200) -> estimators.Estimate:
    """One method on one game (the same call on resampled games gives the sample error). An
    unknown estimator is a `UsageError`, never another estimator."""
    method = Method(method)
    if method is Method.exact:
        return estimators.exact(game)
    if method is Method.ablation:
        return estimators.ablation(game)
    if method is Method.window:
        return estimators.window(game, level)
    if method is not Method.shapley:
        raise UsageError(f"--method {method.value} measures calibration text, not a game on tasks")
    name = estimator_name(estimator)
    if name.startswith(shapiq_adapter.PREFIX):
        return shapiq_adapter.approximate(game, budget, seed, name)
    return SHAPLEY[Estimator(name)](game, budget, seed, bootstrap)


def check_exact(n: int, force: bool) -> None:
    if n > EXACT_LIMIT and not force:
        raise UsageError(
            f"exact Shapley values of {n} units need 2^{n} = {2 ** n:,} evaluations; use --method shapley "
            "with a --budget, or pass --force"
        )


def sample_error(task_game: TaskGame, used: list[int], method: str, budget: int, estimator: str, seed: int,
                 level: int, resamples: int = 100) -> np.ndarray:
    """φ recomputed on bootstrap resamples of the examples: no new model calls, since every
    estimator picks its coalitions independently of the values it sees."""
    n = task_game.n
    stored = {k: task_game.scores(((k >> np.arange(n)) & 1).astype(bool)) for k in used}
    rng = np.random.default_rng(seed + 1)
    first = next(iter(stored.values()))
    sizes = {task: len(m[task_game.metric]) for task, m in first.items()}
    out = []
    for _ in range(resamples):
        picks = {task: rng.integers(0, size, size) for task, size in sizes.items()}
        values = {
            k: float(np.mean([np.mean(np.asarray(s[t][task_game.metric])[picks[t]]) for t in s])) for k, s in stored.items()
        }
        game = CachedGame(lambda rows: np.array([values[key(r)] for r in rows]), n)
        out.append(estimate(method, game, budget, estimator, seed, level, bootstrap=0).values)
    return np.array(out).std(axis=0, ddof=1)


def planned_coalitions(n: int, method: str, budget: int, estimator: str, seed: int, level: int) -> list[int]:
    """The coalitions (bitmasks) `method` evaluates, in its order: estimators choose them
    without looking at values, so a zero game reveals them before any model call."""
    game = CachedGame(lambda rows: np.zeros(len(rows)), n)
    estimate(method, game, budget, estimator, seed, level, bootstrap=0)
    return list(game.values)


def score_units(task_game: TaskGame, method: Method | str, budget: int, estimator: str, seed: int, level: int,
                force: bool = False) -> tuple[estimators.Estimate, CachedGame, np.ndarray]:
    if Method(method) is Method.exact:
        check_exact(task_game.n, force)
    game = CachedGame(task_game, task_game.n)
    est = estimate(method, game, budget, estimator, seed, level)
    sample_se = sample_error(task_game, list(game.values), method, budget, estimator, seed, level)
    return est, game, sample_se


def finite(x: float) -> float | None:
    """`x`, or None where it does not exist (an interval from one sample is infinite)."""
    return float(x) if math.isfinite(x) else None


def _ranked(names: list[str], values: np.ndarray) -> list[dict[str, Any]]:
    order = np.argsort(-values, kind="stable")
    rank = np.empty(len(order), int)
    rank[order] = np.arange(1, len(order) + 1)
    return [{"name": name, "index": i, "value": float(values[i]), "rank": int(rank[i])} for i, name in enumerate(names)]


def report(est: estimators.Estimate, sample_se: np.ndarray | None, *, model: str, model_type: str | None,
           num_layers: int, unit: Unit, method: Method, estimator: str | None, metric: str, tasks: list[str],
           limit: int | None, budget: int | None, seed: int, chance: float | None, extra: dict | None = None) -> dict[str, Any]:
    """scores.json of a game method (the schema above)."""
    lo, hi = est.ci()
    units = _ranked(unit.names(num_layers), est.values)
    for i, entry in enumerate(units):
        entry.update(stderr=finite(est.stderr[i]), ci_low=finite(lo[i]), ci_high=finite(hi[i]))
        if sample_se is not None:
            entry.update(sample_stderr=float(sample_se[i]), sample_ci_low=float(est.values[i] - 1.96 * sample_se[i]),
                         sample_ci_high=float(est.values[i] + 1.96 * sample_se[i]))
    return {
        "schema": SCHEMA, "model": model, "model_type": model_type, "num_layers": num_layers, "unit": unit.value,
        "method": method.value, "estimator": estimator, "metric": metric, "tasks": tasks, "limit": limit,
        "budget": budget, "evaluations": est.evaluations, "seed": seed, "v_empty": est.v_empty, "v_full": est.v_full,
        "chance": chance,
        "efficiency": {"sum_phi": float(est.values.sum()), "v_full_minus_v_empty": est.v_full - est.v_empty,
                       "gap": est.efficiency_gap},
        **(extra or {}),
        "units": units,
    }


def similarity_report(values: list[float], *, model: str, model_type: str | None, num_layers: int, method: Method,
                      extra: dict[str, Any]) -> dict[str, Any]:
    """scores.json of angular / bi: the same keys, null where a game's quantity does not exist."""
    units = _ranked(Unit.block.names(num_layers), np.asarray(values, dtype=float))
    for entry in units:
        entry.update(stderr=None, ci_low=None, ci_high=None)
    return {
        "schema": SCHEMA, "model": model, "model_type": model_type, "num_layers": num_layers, "unit": Unit.block.value,
        "method": method.value, "estimator": None, "metric": None, "tasks": [], "limit": None, "budget": None,
        "evaluations": 0, "seed": None, "v_empty": None, "v_full": None, "chance": None, "efficiency": None,
        **extra,
        "units": units,
    }


def chance_level(task_game: TaskGame) -> float | None:
    """Accuracy of guessing, from the full model's stored examples (None for smooth metrics)."""
    if task_game.metric not in ("acc", "acc_norm"):
        return None
    scores = task_game.scores(np.ones(task_game.n, bool))
    if not all("chance" in m for m in scores.values()):
        return None
    return value_of(scores, "chance")
