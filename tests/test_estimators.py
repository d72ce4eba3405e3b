"""Estimators against exact Shapley values on synthetic games with known values (pure numpy)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from lm_eval_layers.importance import estimators as E
from lm_eval_layers.importance.games import CachedGame, CornerstoneGame, NoisyGame, QuadraticGame
from lm_eval_layers.errors import UsageError
from lm_eval_layers.importance.scoring import estimate
from lm_eval_layers.importance.settings import Estimator, estimator_name


def weights(n: int, seed: int = 0) -> np.ndarray:
    w = np.random.default_rng(seed).gamma(2.0, 0.02, n)
    w[0] *= 5
    return w


def quadratic(n: int, seed: int = 0) -> QuadraticGame:
    J = np.random.default_rng(seed + 100).normal(0, 0.005, (n, n))
    return QuadraticGame(weights(n, seed), J)


def brute_force(game, n: int) -> np.ndarray:
    """The definition: average marginal contribution over all n! orders."""
    phi = np.zeros(n)
    orders = list(itertools.permutations(range(n)))
    for order in orders:
        x = np.zeros(n, bool)
        before = game(x[None])[0]
        for p in order:
            x[p] = True
            after = game(x[None])[0]
            phi[p] += after - before
            before = after
    return phi / len(orders)


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_exact_equals_the_definition():
    game = CornerstoneGame(weights(6), [0, 2])
    np.testing.assert_allclose(E.exact(CachedGame(game)).values, brute_force(game, 6), atol=1e-12)


@pytest.mark.parametrize("n", [8, 12, 16])
def test_exact_matches_closed_form_of_quadratic_games(n):
    game = quadratic(n)
    est = E.exact(CachedGame(game))
    np.testing.assert_allclose(est.values, game.shapley, atol=1e-12)
    assert abs(est.efficiency_gap) < 1e-12 and est.evaluations == 2**n


@pytest.mark.parametrize("n", [12, 16])
def test_paired_estimators_are_exact_on_quadratic_games(n):
    game = quadratic(n)
    for est in (E.regression(CachedGame(game), 200, seed=1), E.permutation(CachedGame(game), 200, seed=1)):
        np.testing.assert_allclose(est.values, game.shapley, atol=1e-9)


@pytest.mark.parametrize("n", [12, 16])
def test_estimators_approach_exact_values_on_a_cornerstone_game(n):
    game = CornerstoneGame(weights(n), [0, 1])
    truth = E.exact(CachedGame(game)).values
    errors = {
        "regression": np.median([rel_err(E.regression(CachedGame(game), 400, s).values, truth) for s in range(5)]),
        "permutation": np.median([rel_err(E.permutation(CachedGame(game), 400, s).values, truth) for s in range(5)]),
        "plain": np.median([rel_err(E.permutation(CachedGame(game), 400, s, antithetic=False).values, truth) for s in range(5)]),
        "window": rel_err(E.window(CachedGame(game), 3).values, truth),
    }
    assert errors["regression"] < 0.15 and errors["permutation"] < 0.15
    assert errors["window"] > 3 * max(errors["regression"], errors["permutation"])
    assert errors["plain"] > errors["permutation"]
    top = set(np.argsort(-truth)[:2])
    assert set(np.argsort(-E.regression(CachedGame(game), 400, 0).values)[:2]) == top == {0, 1}


def test_budget_is_respected_and_efficiency_holds():
    game = CornerstoneGame(weights(16), [3])
    for budget in (60, 200, 400):
        cached = CachedGame(game)
        est = E.regression(cached, budget, seed=2)
        assert cached.evaluations <= budget
        assert abs(est.efficiency_gap) < 1e-9  # regression solves under Σφ = v(N) − v(∅)
        cached = CachedGame(game)
        E.permutation(cached, budget, seed=2)
        assert cached.evaluations <= budget


def test_confidence_intervals_cover_the_truth_on_a_noisy_game():
    game = NoisyGame(CornerstoneGame(weights(12), [0]), sigma=0.002)
    truth = E.exact(CachedGame(game)).values
    cover = {"regression": [], "permutation": []}
    for seed in range(12):
        for name, est in (("regression", E.regression(CachedGame(game), 300, seed)),
                          ("permutation", E.permutation(CachedGame(game), 300, seed))):
            lo, hi = est.ci()
            cover[name].append(np.mean((truth >= lo) & (truth <= hi)))
    assert np.mean(cover["regression"]) >= 0.85
    assert np.mean(cover["permutation"]) >= 0.8


def test_ablation_and_window_follow_their_definitions():
    game = CornerstoneGame(weights(6), [1])
    full = np.ones(6, bool)
    abl = E.ablation(CachedGame(game))
    for i in range(6):
        x = full.copy()
        x[i] = False
        assert abl.values[i] == pytest.approx(game(full[None])[0] - game(x[None])[0])
    win = E.window(CachedGame(game), level=2)
    # unit 2 with level 2: {} ; W={1} (left) ; W={3} (right)

    def removed(*units):
        x = full.copy()
        x[list(units)] = False
        return game(x[None])[0]

    expected = np.mean([removed() - removed(2), removed(1) - removed(1, 2), removed(3) - removed(3, 2)])
    assert win.values[2] == pytest.approx(expected)


def test_permutation_intervals_are_t_intervals_across_pairs():
    from scipy import stats

    est = E.permutation(CachedGame(CornerstoneGame(weights(8), [0])), 100, seed=0)
    assert est.extra["df"] == est.extra["samples"] - 1 > 3
    lo, hi = est.ci()
    np.testing.assert_allclose((hi - lo) / 2, stats.t.ppf(0.975, est.extra["df"]) * est.stderr, rtol=1e-9)


def _finishes(seconds: int, fn):
    """`fn()` or a test failure after `seconds` (a hang must fail, not stall the suite)."""
    import signal

    def expire(*_):
        raise TimeoutError(f"did not finish in {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        return fn()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("estimator", [e.value for e in Estimator])
def test_every_estimator_terminates_for_any_budget(estimator):
    """A budget ≥ 2^n buys the exact values; smaller budgets, however tiny, still end."""
    game = CornerstoneGame(weights(4), [0])
    truth = E.exact(CachedGame(game)).values
    est = _finishes(20, lambda: estimate("shapley", CachedGame(game), 60, estimator, 0, 3))
    np.testing.assert_allclose(est.values, truth, atol=1e-12)
    assert est.evaluations == 16 and np.all(est.stderr == 0)
    small = CornerstoneGame(weights(3), [1])
    for budget in range(0, 10):
        est = _finishes(20, lambda: estimate("shapley", CachedGame(small), budget, estimator, budget, 3))
        assert est.values.shape == (3,) and np.all(np.isfinite(est.values))


def test_tree_surrogate_shapley_values_are_exact_for_the_trees():
    """The closed form per leaf equals enumeration of the fitted trees as a game."""
    rng = np.random.default_rng(0)
    X = rng.random((200, 7)) < 0.5
    y = CornerstoneGame(weights(7), [0, 1])(X) + rng.normal(0, 0.01, 200)
    trees = E._Trees(trees=20, depth=3).fit(X, y)
    np.testing.assert_allclose(trees.shapley(7), E.exact(CachedGame(trees.predict, 7)).values, atol=1e-12)


def test_kadditive_surrogate_shapley_values_are_exact_for_the_surrogate():
    rng = np.random.default_rng(1)
    X = rng.random((300, 7)) < 0.5
    f = E._KAdditive(hub=2).fit(X, rng.normal(size=300))
    np.testing.assert_allclose(f.shapley(7), E.exact(CachedGame(f.predict, 7)).values, atol=1e-12)


@pytest.mark.parametrize("n", [12, 16])
def test_ramc_is_accurate_efficient_and_exact_where_its_surrogate_fits(n):
    game = CornerstoneGame(weights(n), [0, 1])
    truth = E.exact(CachedGame(game)).values
    ests = [E.ramc(CachedGame(game), 400, s) for s in range(5)]
    assert np.median([rel_err(e.values, truth) for e in ests]) < 0.04
    assert all(abs(e.efficiency_gap) < 1e-12 and e.evaluations <= 400 for e in ests)
    quad = quadratic(n)  # its odd part is additive, which the 3-additive surrogate fits
    assert rel_err(E.ramc(CachedGame(quad), 200, 0, surrogate="kadd").values, quad.shapley) < 1e-3


def test_ramc_intervals_cover_the_truth_on_a_noisy_game():
    game = NoisyGame(CornerstoneGame(weights(12), [0]), sigma=0.002)
    truth = E.exact(CachedGame(game)).values
    cover = []
    for seed in range(10):
        est = E.ramc(CachedGame(game), 300, seed)
        assert est.extra["df"] == est.extra["pairs"] - 1
        lo, hi = est.ci()
        cover.append(np.mean((truth >= lo) & (truth <= hi)))
    assert 0.85 <= np.mean(cover) <= 1.0


def test_ramc_coalitions_at_a_smaller_budget_are_among_those_at_a_larger():
    from lm_eval_layers.importance.scoring import planned_coalitions

    small, large = planned_coalitions(16, "shapley", 200, "ramc", 4, 0), planned_coalitions(16, "shapley", 500, "ramc", 4, 0)
    assert set(small) <= set(large) and len(small) == 200 and len(large) == 500


def test_shapiq_approximators_through_the_adapter():
    """Every `shapiq:NAME` the adapter maps (its constructor options included) runs on the
    installed shapiq within budget; the regression ones land near the exact values. shapiq is in
    the test extra, so it is imported, not skipped: a missing or incompatible shapiq fails here.
    (ProxySPEX also needs lightgbm, which the test extra leaves out.)"""
    import shapiq  # noqa: F401  (in the test extra: never skipped)

    from lm_eval_layers.importance.scoring import planned_coalitions
    from lm_eval_layers.importance.shapiq_adapter import APPROXIMATORS

    game = CornerstoneGame(weights(10), [0, 1])
    truth = E.exact(CachedGame(game)).values
    for name in [n for n, (cls, _) in APPROXIMATORS.items() if cls != "ProxySPEX"]:
        cached = CachedGame(game)
        est = estimate("shapley", cached, 120, f"shapiq:{name}", 0, 3)
        assert est.values.shape == (10,) and 0 < cached.evaluations <= 120, name
        if name in ("kernelshap", "kaddshap", "kaddshap3", "svarm"):
            assert rel_err(est.values, truth) < 0.5, name
        # shapiq picks coalitions without looking at values, as the distributed split needs
        assert set(planned_coalitions(10, "shapley", 120, f"shapiq:{name}", 0, 3)) == set(cached.values), name


def test_a_missing_shapiq_is_one_line_naming_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "shapiq" else real(name, *a))
    with pytest.raises(UsageError, match=r"needs shapiq: pip install lm-eval-layers\[shapiq\]"):
        estimator_name("shapiq:kernelshap")
    assert estimator_name("ramc") == "ramc"


def test_an_unknown_estimator_is_an_error_never_another_estimator():
    game = CachedGame(CornerstoneGame(weights(6), [0]))
    for name in ("mc", "regresion", ""):
        with pytest.raises(UsageError, match="is not one of ramc, ramc-kadd, regression, permutation"):
            estimate("shapley", game, 40, name, 0, 3)
    assert game.evaluations == 0  # refused before it spent anything
    with pytest.raises(UsageError, match="unknown shapiq approximator; use shapiq:kernelshap"):
        estimator_name("shapiq:magic")
    assert [estimator_name(n) for n in ("RAMC", "Ramc-KADD", "Permutation")] == ["ramc", "ramc-kadd", "permutation"]


def test_shapiq_names_in_any_case_and_as_shapiq_class_names(monkeypatch):
    """`shapiq:KernelSHAP` (shapiq's class) and `shapiq:KERNELSHAP` are `shapiq:kernelshap`."""
    import importlib.util

    real = importlib.util.find_spec
    if real("shapiq") is None:  # the names are resolved before shapiq is needed: pretend it is there
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "shapiq" else real(name, *a))
    for given, name in [("shapiq:KernelSHAP", "kernelshap"), ("SHAPIQ:KERNELSHAP", "kernelshap"), ("shapiq:SVARM", "svarm"),
                        ("shapiq:PermutationSamplingSV", "permutation"), ("shapiq:StratifiedSamplingSV", "stratified"),
                        ("shapiq:UnbiasedKernelSHAP", "unbiased-kernelshap"), ("shapiq:kADDSHAP", "kaddshap"),
                        ("shapiq:KaddShap3", "kaddshap3"), ("shapiq:ProxySPEX", "proxyspex")]:
        assert estimator_name(given) == "shapiq:" + name, given
