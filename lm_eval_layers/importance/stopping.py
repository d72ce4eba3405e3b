"""The stop rule of `surgery score --tol`: evaluate in rounds until the widest 95% interval of
the Shapley values is narrow enough, or the budget is spent.

Rounds are planned before any value is seen: round r evaluates the estimator's coalitions at
budget b_r, and b_1 < b_2 < … < b_R = budget are chosen so that each round's list extends the
previous one (the estimators that allow `--tol` draw their coalitions as a prefix of one
stream). So the distributed split and the resume work per round as they do for one list, and
the bootstrap over examples runs once, on the list of the round that stopped.

`Estimator.nested` names those estimators; `ScoreSettings` refuses `--tol` with the others.

The interval the rule reads is the coalition-sampling one (the estimator's own 95% interval):
it is what more coalitions shrink. The examples' error does not shrink with coalitions (only
with `--limit`), so it is reported but never waited for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from lm_eval_layers.importance.estimators import Estimate, enumerable
from lm_eval_layers.importance.scoring import planned_coalitions

MIN_ROUNDS = 3
ROUNDS = 8


def round_budgets(n: int, budget: int, rounds: int = ROUNDS) -> list[int]:
    """Equal steps up to `budget`, the first large enough to leave leave-one-out's 2n+2
    coalitions and a few pairs; fewer rounds when the budget is small."""
    first = min(budget, 2 * n + 2 + 8)
    if rounds <= 1 or enumerable(n, budget) or budget <= first:
        return [budget]
    step = max(1, math.ceil((budget - first) / (rounds - 1)))
    return sorted({*range(first, budget, step), budget})


def plan(n: int, method: str, budget: int, estimator: str, seed: int, level: int,
         rounds: int = ROUNDS) -> list[tuple[int, list[int]]]:
    """(budget of the round, coalitions it adds) for every round, before any evaluation."""
    out: list[tuple[int, list[int]]] = []
    before: set[int] = set()
    for b in round_budgets(n, budget, rounds):
        now = planned_coalitions(n, method, b, estimator, seed, level)
        if not before <= set(now):
            raise AssertionError(f"{estimator}: coalitions at budget {b} do not extend the previous round's")
        out.append((b, [k for k in now if k not in before]))
        before |= set(now)
    return out


def widest_half_width(est: Estimate, level: float = 0.95) -> float:
    """The widest half-width of the estimate's coalition-sampling intervals."""
    lo, hi = est.ci(level)
    return float(np.max((hi - lo) / 2))


@dataclass
class Stop:
    round: int  # 1-based, the round whose estimate is reported
    rounds: int  # planned
    budget: int  # of that round
    reason: str  # "tolerance" or "budget"
    half_width: float  # widest 95% half-width at that round


def run(rounds: list[tuple[int, list[int]]], evaluate: Callable[[list[int]], None],
        estimate_at: Callable[[int], Estimate | None], tol: float | None, share: Callable[[object], object],
        on_estimate: Callable[[float], None] = lambda w: None, min_rounds: int = MIN_ROUNDS) -> Stop:
    """Evaluate round after round; after each, `estimate_at(budget)` (None on all but rank 0)
    decides, and `share` gives every process rank 0's decision. Without `tol`, all rounds run."""
    for r, (b, todo) in enumerate(rounds, start=1):
        evaluate(todo)
        last = r == len(rounds)
        if tol is None and not last:
            continue
        est = estimate_at(b)
        decision = None
        if est is not None:  # rank 0
            width = widest_half_width(est)
            on_estimate(width)
            met = tol is not None and r >= min_rounds and width <= tol
            decision = (met or last, "tolerance" if met else "budget", width)
        done, reason, width = share(decision)  # type: ignore[misc]
        if done:
            return Stop(r, len(rounds), b, reason, float(width))
    raise AssertionError("the last round always stops")
