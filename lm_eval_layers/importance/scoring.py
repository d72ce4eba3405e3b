"""Score the units of a loaded model: run a method against the task game, add benchmark-sample
uncertainty from the stored per-example scores, and build the documented scores.json.

scores.json (schema `lm-eval-layers/scores/v1`): model, model_type, num_layers, unit, method,
estimator, metric, tasks, limit, budget, evaluations (coalitions used), seed, v_empty, v_full,
chance (accuracy of guessing, when defined), efficiency {sum_phi, v_full_minus_v_empty, gap},
new_evaluations, reused, evaluations_per_process; with `--tol` also tol, stop_reason
("tolerance" or "budget"), rounds (the round reported), rounds_planned, round_budget and
widest_half_width (of the coalition-sampling 95% intervals at that round); and `units`: one entry per unit in unit order with name, index, value, stderr, ci_low, ci_high
(coalition-sampling error), sample_stderr, sample_ci_low, sample_ci_high (bootstrap over
examples), rank (1 = most important).
"""

from __future__ import annotations

from enum import Enum
from typing import Any

import numpy as np

from lm_eval_layers.columns import value_of
from lm_eval_layers.errors import UsageError
from lm_eval_layers.importance import estimators, shapiq_adapter
from lm_eval_layers.importance.games import CachedGame, key
from lm_eval_layers.importance.task_game import TaskGame, unit_names

SCHEMA = "lm-eval-layers/scores/v1"
EXACT_LIMIT = 16


class Method(str, Enum):
    """How units are scored: games on tasks (Shapley, exact, leave-one-out, the window
    heuristic) or representation similarity on calibration text (angular distance, block
    influence)."""

    shapley = "shapley"
    exact = "exact"
    ablation = "ablation"
    window = "window"
    angular = "angular"
    bi = "bi"

    @property
    def is_similarity(self) -> bool:
        return self in (Method.angular, Method.bi)


class Estimator(str, Enum):
    """Shapley estimators for `Method.shapley` (besides shapiq's, `shapiq:NAME`): regression-
    adjusted Monte Carlo with a boosted-trees or 3-additive surrogate, paired KernelSHAP,
    antithetic permutations."""

    ramc = "ramc"
    ramc_kadd = "ramc-kadd"
    regression = "regression"
    permutation = "permutation"


DEFAULT_ESTIMATOR = Estimator.ramc


def check_estimator(estimator: str) -> str:
    """A built-in estimator or `shapiq:NAME`, checked before anything loads."""
    if estimator.startswith(shapiq_adapter.PREFIX):
        shapiq_adapter.check_name(estimator)
    elif estimator not in {e.value for e in Estimator}:
        raise UsageError(f"--estimator {estimator!r} is not one of {', '.join(e.value for e in Estimator)}, "
                         f"or shapiq:NAME ({'|'.join(shapiq_adapter.APPROXIMATORS)})")
    return estimator


def estimate(method: str, game: CachedGame, budget: int, estimator: str, seed: int, level: int,
             bootstrap: int = 200) -> estimators.Estimate:
    """One method on one game (the same call on resampled games gives the sample error)."""
    if method == "exact":
        return estimators.exact(game)
    if method == "ablation":
        return estimators.ablation(game)
    if method == "window":
        return estimators.window(game, level)
    if estimator.startswith(shapiq_adapter.PREFIX):
        return shapiq_adapter.approximate(game, budget, seed, estimator)
    if estimator == Estimator.permutation.value:
        return estimators.permutation(game, budget, seed)
    if estimator == Estimator.ramc.value:
        return estimators.ramc(game, budget, seed)
    if estimator == Estimator.ramc_kadd.value:
        return estimators.ramc(game, budget, seed, surrogate="kadd")
    return estimators.regression(game, budget, seed, bootstrap=bootstrap)


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


def score_units(task_game: TaskGame, method: str, budget: int, estimator: str, seed: int, level: int,
                force: bool = False) -> tuple[estimators.Estimate, CachedGame, np.ndarray]:
    if method == "exact":
        check_exact(task_game.n, force)
    game = CachedGame(task_game, task_game.n)
    est = estimate(method, game, budget, estimator, seed, level)
    sample_se = sample_error(task_game, list(game.values), method, budget, estimator, seed, level)
    return est, game, sample_se


def report(est: estimators.Estimate, sample_se: np.ndarray | None, *, model: str, model_type: str | None,
           num_layers: int, unit: str, method: str, estimator: str | None, metric: str | None, tasks: list[str],
           limit: int | None, budget: int | None, seed: int, chance: float | None, extra: dict | None = None) -> dict[str, Any]:
    names = unit_names(unit, num_layers)
    lo, hi = est.ci()
    order = np.argsort(-est.values, kind="stable")
    rank = np.empty(len(order), int)
    rank[order] = np.arange(1, len(order) + 1)
    units = []
    for i, name in enumerate(names):
        entry = {"name": name, "index": i, "value": float(est.values[i]), "stderr": float(est.stderr[i]),
                 "ci_low": float(lo[i]), "ci_high": float(hi[i]), "rank": int(rank[i])}
        if sample_se is not None:
            entry.update(sample_stderr=float(sample_se[i]), sample_ci_low=float(est.values[i] - 1.96 * sample_se[i]),
                         sample_ci_high=float(est.values[i] + 1.96 * sample_se[i]))
        units.append(entry)
    return {
        "schema": SCHEMA, "model": model, "model_type": model_type, "num_layers": num_layers, "unit": unit,
        "method": method, "estimator": estimator, "metric": metric, "tasks": tasks, "limit": limit,
        "budget": budget, "evaluations": est.evaluations, "seed": seed, "v_empty": est.v_empty, "v_full": est.v_full,
        "chance": chance,
        "efficiency": {"sum_phi": float(est.values.sum()), "v_full_minus_v_empty": est.v_full - est.v_empty,
                       "gap": est.efficiency_gap},
        **(extra or {}),
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
