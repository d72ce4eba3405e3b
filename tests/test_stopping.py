"""The stop rule of `surgery score --tol` on synthetic games: rounds extend each other, the rule
stops when the widest interval is narrow enough (not before the minimum number of rounds), and
the decision depends only on stored values (so a resumed run stops at the same round)."""

from __future__ import annotations

import numpy as np
import pytest

from lm_eval_layers.errors import UsageError
from lm_eval_layers.importance import stopping
from lm_eval_layers.importance.games import CachedGame, CornerstoneGame, from_key
from lm_eval_layers.importance.scoring import estimate
from lm_eval_layers.importance.settings import Estimator, ScoreSettings

NESTED = [e.value for e in Estimator if e.nested]


def game(n: int = 12) -> CornerstoneGame:
    w = np.random.default_rng(0).gamma(2.0, 0.02, n)
    w[0] *= 5
    return CornerstoneGame(w, [0, 1])


@pytest.mark.parametrize("estimator", NESTED)
def test_rounds_extend_each_other(estimator):
    rounds = stopping.plan(12, "shapley", 600, estimator, 3, 0)
    assert len(rounds) == stopping.ROUNDS and rounds[-1][0] == 600
    added = [k for _, todo in rounds for k in todo]
    assert len(added) == len(set(added))  # no round repeats another's coalition
    from lm_eval_layers.importance.scoring import planned_coalitions

    assert set(added) == set(planned_coalitions(12, "shapley", 600, estimator, 3, 0))


def _run(g, estimator: str, budget: int, tol: float | None, stored: dict[int, float]) -> stopping.Stop:
    n = g.n
    rounds = stopping.plan(n, "shapley", budget, estimator, 1, 0, rounds=stopping.ROUNDS if tol else 1)
    cached = CachedGame(lambda rows: np.array([stored[int(np.dot(r, 1 << np.arange(n)))] for r in rows]), n)

    def evaluate(todo):
        for k in todo:
            stored.setdefault(k, float(g(from_key(k, n)[None])[0]))

    return stopping.run(rounds, evaluate, lambda b: estimate("shapley", cached, b, estimator, 1, 0), tol, lambda d: d)


@pytest.mark.parametrize("estimator", ["ramc", "permutation"])
def test_the_rule_stops_when_the_widest_interval_is_narrow_enough(estimator):
    g = game()
    full = _run(g, estimator, 1500, None, {})
    assert full.reason == "budget" and full.round == 1
    widths = []
    stored: dict[int, float] = {}
    rounds = stopping.plan(12, "shapley", 1500, estimator, 1, 0)
    for b, _ in rounds:
        _run_until = _run(g, estimator, b, None, stored)  # the estimate each round would see
        widths.append(_run_until.half_width)
    tol = widths[4] * 1.0001  # met from round 5 on (widths shrink as rounds add coalitions)
    first = next(r for r, w in enumerate(widths, start=1) if r >= stopping.MIN_ROUNDS and w <= tol)
    stop = _run(g, estimator, 1500, tol, {})
    assert stop.reason == "tolerance" and stop.round == first <= 5 and stop.half_width <= tol
    assert stop.budget == rounds[first - 1][0]
    loose = _run(g, estimator, 1500, 10.0, {})  # met at once, yet the minimum number of rounds runs
    assert loose.round == stopping.MIN_ROUNDS and loose.reason == "tolerance"
    tight = _run(g, estimator, 1500, 1e-9, {})
    assert tight.reason == "budget" and tight.round == len(rounds)


def test_a_resumed_run_stops_at_the_same_round():
    g = game()
    stored: dict[int, float] = {}
    first = _run(g, "ramc", 1500, 0.01, stored)
    kept = dict(list(stored.items())[: len(stored) // 2])  # killed half-way: half the values stored
    again = _run(g, "ramc", 1500, 0.01, kept)
    assert (again.round, again.reason, again.half_width) == (first.round, first.reason, first.half_width)
    assert kept.keys() == stored.keys()


def test_only_nested_estimators_can_run_in_rounds():
    """`Estimator.nested` is a property of the estimator, checked here against its coalitions."""
    assert NESTED == ["ramc", "ramc-kadd", "permutation"]
    with pytest.raises(AssertionError, match="do not extend the previous round's"):
        stopping.plan(12, "shapley", 600, Estimator.regression.value, 3, 0)


def test_tol_is_refused_where_rounds_cannot_extend_each_other():
    for method, estimator, message in [("shapley", "regression", "--tol needs --method shapley with --estimator ramc|ramc-kadd|permutation"),
                                       ("exact", "ramc", "--tol needs --method shapley"),
                                       ("shapley", "shapiq:kernelshap", "--tol needs|needs shapiq")]:
        with pytest.raises(UsageError, match=message):
            ScoreSettings("m", method=method, estimator=estimator, tol=0.01)
    with pytest.raises(UsageError, match="positive"):
        ScoreSettings("m", tol=0)
    assert ScoreSettings("m", estimator="RAMC", tol=0.01).shapley_estimator == "ramc"
