"""Estimators that turn evaluations of a game into per-unit values with uncertainty (pure numpy).

- `exact`: the Shapley formula over all 2^n coalitions (ground truth, n ≤ ~16).
- `permutation`: permutation sampling, antithetic by default (each permutation also walked in
  reverse); t-intervals across pairs.
- `regression`: paired KernelSHAP with sizes drawn uniformly (leverage weights) and per-size
  stratified weights, ∅, N and all size-1 / size-(n−1) coalitions when the budget allows, solved
  under Σφ = v(N) − v(∅); bootstrap over sampled pairs.
- `ramc`: regression-adjusted Monte Carlo: exact Shapley values of a surrogate (boosted trees,
  or a 3-additive game) fitted to the game's odd part, plus an unbiased, cross-fitted Monte
  Carlo estimate of the residual's; t-intervals across complementary pairs.
- `window`: the local "efficient sampling" heuristic of "Investigating Layer Importance in Large Language Models", reproduced for comparison.
- `ablation`: leave-one-out, v(N) − v(N∖{i}).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from itertools import combinations

import numpy as np

from lm_eval_layers.importance.games import CachedGame

# Fill whole size strata from the extremes while each costs at most this share of what is left
# (filling more measured worse on cornerstone games: benchmarks/README.md).
FILL = 0.5


@dataclass
class Estimate:
    method: str
    values: np.ndarray
    stderr: np.ndarray
    evaluations: int
    v_empty: float
    v_full: float
    extra: dict = field(default_factory=dict)

    def ci(self, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
        z = _quantile(level, self.extra.get("df"))
        return self.values - z * self.stderr, self.values + z * self.stderr

    @property
    def efficiency_gap(self) -> float:
        """Σφ − (v(N) − v(∅)): zero for Shapley values."""
        return float(self.values.sum() - (self.v_full - self.v_empty))


def _quantile(level: float, df: int | None) -> float:
    """Two-sided critical value: Student t with `df` degrees of freedom, else normal."""
    from scipy import stats

    q = 0.5 + level / 2
    return float(stats.t.ppf(q, df) if df else stats.norm.ppf(q))


def end_values(game: CachedGame) -> tuple[float, float]:
    """v(∅) and v(N), which every estimator reports."""
    n = game.n
    v = game(np.array([np.zeros(n, bool), np.ones(n, bool)]))
    return float(v[0]), float(v[1])


def exact(game: CachedGame) -> Estimate:
    """φ_i = Σ_{S⊆N∖{i}} |S|!(n−|S|−1)!/n! (v(S∪{i}) − v(S)), over all 2^n coalitions."""
    n = game.n
    masks = np.arange(1 << n, dtype=np.int64)
    rows = ((masks[:, None] >> np.arange(n)) & 1).astype(bool)
    values = np.concatenate([game(rows[i:i + 4096]) for i in range(0, len(rows), 4096)])
    sizes = rows.sum(axis=1)
    weight = np.array([math.factorial(s) * math.factorial(n - s - 1) / math.factorial(n) for s in range(n)])
    phi = np.zeros(n)
    for i in range(n):
        without = masks[~rows[:, i]]
        phi[i] = np.sum(weight[sizes[without]] * (values[without | (1 << i)] - values[without]))
    return Estimate("exact", phi, np.zeros(n), game.evaluations, float(values[0]), float(values[-1]))


def enumerable(n: int, budget: int) -> bool:
    """A budget that covers all 2^n coalitions buys the exact values: sampling would only
    re-walk cached coalitions (at no cost, so a budget-driven loop would never end)."""
    return budget >= 1 << n


def _exact_as(method: str, game: CachedGame) -> Estimate:
    est = exact(game)
    est.method, est.extra = method, {"exact": True}
    return est


def permutation(game: CachedGame, budget: int, seed: int = 0, antithetic: bool = True) -> Estimate:
    """Marginal contributions along random orders; with `antithetic`, each order also reversed.
    At most `budget` orders are drawn: orders over cached coalitions are free, and the bound
    keeps the loop finite (and the coalitions at a smaller budget a prefix of those at a larger)."""
    n = game.n
    method = "permutation" if antithetic else "plain-permutation"
    if enumerable(n, budget):
        return _exact_as(method, game)
    rng = np.random.default_rng(seed)
    v_empty, v_full = end_values(game)
    samples: list[np.ndarray] = []
    while len(samples) < max(budget, 1):  # the first order is walked even past a tiny budget
        order = rng.permutation(n)
        walks = [order, order[::-1]] if antithetic else [order]
        rows = []
        for walk in walks:
            x = np.zeros((n + 1, n), bool)
            for step, player in enumerate(walk):
                x[step + 1:, player] = True
            rows.append(x)
        cost = len({int(np.dot(r, 1 << np.arange(n))) for x in rows for r in x} - set(game.values))
        if samples and game.evaluations + cost > budget:
            break
        deltas = []
        for walk, x in zip(walks, rows):
            v = game(x)
            d = np.empty(n)
            d[walk] = np.diff(v)
            deltas.append(d)
        samples.append(np.mean(deltas, axis=0))
    d = np.array(samples)
    k = len(d)
    stderr = d.std(axis=0, ddof=1) / math.sqrt(k) if k > 1 else np.full(n, np.inf)
    return Estimate(method, d.mean(axis=0), stderr, game.evaluations, v_empty, v_full, {"df": k - 1, "samples": k})


def _solve(rows: np.ndarray, y: np.ndarray, w: np.ndarray, total: float) -> np.ndarray:
    """argmin Σ w (xᵀφ − y)² subject to Σφ = total."""
    n = rows.shape[1]
    A = rows.astype(float)
    G = A.T @ (A * w[:, None]) + 1e-10 * np.eye(n)
    b = A.T @ (w * y)
    Ginv_b = np.linalg.solve(G, b)
    Ginv_1 = np.linalg.solve(G, np.ones(n))
    return Ginv_b - Ginv_1 * (Ginv_b.sum() - total) / Ginv_1.sum()


def regression(game: CachedGame, budget: int, seed: int = 0, bootstrap: int = 200) -> Estimate:
    """Paired KernelSHAP with leverage (uniform-size) sampling and the efficiency constraint."""
    n = game.n
    if enumerable(n, budget):
        return _exact_as("regression", game)
    rng = np.random.default_rng(seed)
    v_empty, v_full = end_values(game)
    total = v_full - v_empty
    bits = 1 << np.arange(n, dtype=np.int64)
    # Like KernelSHAP, whole size strata are enumerated from the extremes (1 and n-1, then 2 and
    # n-2, ...) while they fit in half the remaining budget; the other sizes are sampled in
    # complementary pairs, sizes uniform (leverage-score sampling).
    full_sizes: list[int] = []
    left = budget - 2
    for s in range(1, n // 2 + 1):
        cost = math.comb(n, s) * (1 if 2 * s == n else 2)
        if cost > left * FILL:
            break
        full_sizes += [s] if 2 * s == n else [s, n - s]
        left -= cost
    fixed_rows = [np.isin(np.arange(n), c) for s in full_sizes for c in combinations(range(n), s)]
    fixed = np.array(fixed_rows, dtype=bool).reshape(-1, n)
    sizes = [s for s in range(1, n) if s not in full_sizes]
    seen = set((fixed @ bits).tolist())
    pairs: list[np.ndarray] = []
    tries = 0
    while left >= 2 and sizes and tries < 50 * budget:
        tries += 1
        row = np.zeros(n, bool)
        row[rng.choice(n, int(rng.choice(sizes)), replace=False)] = True
        k = int(row @ bits)
        if k in seen:
            continue
        seen.update((k, int(~row @ bits)))
        pairs.append(np.stack([row, ~row]))
        left -= 2
    paired = np.array(pairs).reshape(-1, n) if pairs else np.zeros((0, n), bool)
    rows = np.concatenate([fixed, paired])
    y = game(rows) - v_empty if len(rows) else np.zeros(0)
    y_fixed, y_pairs = y[: len(fixed)], y[len(fixed):].reshape(-1, 2)
    kernel = np.array([0.0] + [(n - 1) / (s * (n - s)) for s in range(1, n)] + [0.0])  # weight of a whole size stratum
    fixed_w = kernel[fixed.sum(1)] / np.array([math.comb(n, int(s)) for s in fixed.sum(1)]) if len(fixed) else np.zeros(0)
    pair_sizes = paired.sum(1).reshape(-1, 2)

    def fit(pick: np.ndarray) -> np.ndarray:
        sz = pair_sizes[pick].reshape(-1)
        counts = np.bincount(sz, minlength=n + 1)
        w = np.concatenate([fixed_w, kernel[sz] / counts[sz]])  # stratum weight shared by its samples
        A = np.concatenate([fixed, paired.reshape(-1, 2, n)[pick].reshape(-1, n)])
        return _solve(A, np.concatenate([y_fixed, y_pairs[pick].reshape(-1)]), w, total)

    everything = np.arange(len(pairs))
    phi = fit(everything) if len(rows) else np.full(n, total / n)
    stderr = np.zeros(n)
    if len(pairs) > 1 and bootstrap:
        boots = np.array([fit(rng.integers(0, len(pairs), len(pairs))) for _ in range(bootstrap)])
        stderr = boots.std(axis=0, ddof=1)
    return Estimate("regression", phi, stderr, game.evaluations, v_empty, v_full, {"pairs": len(pairs)})


def window(game: CachedGame, level: int = 3) -> Estimate:
    """The local heuristic of "Investigating Layer Importance in Large Language Models": for
    unit i, the equal-weight mean of v(N) − v(N∖{i}) and of v(N∖W) − v(N∖(W∪{i})) for every
    contiguous window W (length ≤ level−1) that i extends at its left or right edge. Not
    Shapley-weighted; shipped to reproduce that paper's numbers."""
    n = game.n
    v_empty, v_full = end_values(game)
    full = np.ones(n, bool)

    def removed(units: list[int]) -> np.ndarray:
        r = full.copy()
        r[units] = False
        return r

    phi = np.zeros(n)
    for i in range(n):
        terms = [(removed([]), removed([i]))]
        for length in range(1, level):
            if i - length >= 0:  # window ends just left of i
                w = list(range(i - length, i))
                terms.append((removed(w), removed(w + [i])))
            if i + length < n:  # window starts just right of i
                w = list(range(i + 1, i + 1 + length))
                terms.append((removed(w), removed(w + [i])))
        with_i = game(np.array([a for a, _ in terms]))
        without_i = game(np.array([b for _, b in terms]))
        phi[i] = np.mean(with_i - without_i)
    return Estimate("window", phi, np.zeros(n), game.evaluations, v_empty, v_full, {"level": level})


def ablation(game: CachedGame) -> Estimate:
    """Leave-one-out: v(N) − v(N∖{i})."""
    n = game.n
    v_empty, v_full = end_values(game)
    rows = ~np.eye(n, dtype=bool)
    phi = v_full - game(rows)
    return Estimate("ablation", phi, np.zeros(n), game.evaluations, v_empty, v_full)


# Regression-adjusted Monte Carlo ------------------------------------------------------------
#
# φ(v) = φ(f) + φ(v − f) for any surrogate f: f's Shapley values are exact (closed form), and
# only the residual's are estimated by Monte Carlo, unbiased whatever f is, with variance that
# shrinks as f fits. Shapley values depend only on the odd part o(S) = (v(S) − v(N∖S)) / 2 (the
# even part is its own dual, whose values are its negation), so every sample is a complementary
# pair giving o(S) directly, and f is fitted to o. Sizes 0, 1, n−1 and n are enumerated (the
# 2n+2 coalitions of leave-one-out), so their strata of the Shapley sum are exact; the others
# are sampled.


def _ends_part(n: int, v_empty: float, v_full: float, singles: np.ndarray, complements: np.ndarray) -> np.ndarray:
    """The size-0, 1, n−1, n strata of φ_i = (1/n) Σ_s [mean_{|S|=s, i∈S} v(S) − mean_{|S|=s, i∉S} v(S)]."""
    s, c = singles.sum(), complements.sum()
    return (singles - (s - singles) / (n - 1) + (c - complements) / (n - 1) - complements + v_full - v_empty) / n


class _Trees:
    """Gradient-boosted regression trees on binary inputs, kept as their leaves: each leaf is a
    conjunction (these units kept, those removed) whose Shapley values have a closed form.

    A tree's leaves partition the coalitions, so a tree is applied to many rows at once as one
    table (kept / removed indicator matrices): two matrix products find every row's leaf. Rows
    add their trees' values in tree order, the order of a leaf-by-leaf sum."""

    def __init__(self, trees: int = 100, depth: int = 4, rate: float = 0.1, min_leaf: int = 2) -> None:
        self.trees, self.depth, self.rate, self.min_leaf = trees, depth, rate, min_leaf
        self.leaves: list[tuple[list[int], list[int], float]] = []
        self.tables: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []

    def fit(self, X: np.ndarray, y: np.ndarray) -> "_Trees":
        Xf = X.astype(float)
        residual = y - y.mean()
        self.base = float(y.mean())
        for _ in range(self.trees):
            grown: list[tuple[list[int], list[int], float]] = []
            self._grow(Xf, residual, np.arange(len(y)), [], [], self.depth, grown)
            leaves = [(kept, gone, self.rate * value) for kept, gone, value in grown]
            table = self._table(leaves, X.shape[1])
            residual = residual - self._apply(Xf, table)
            self.leaves += leaves
            self.tables.append(table)
        return self

    @staticmethod
    def _table(leaves: list[tuple[list[int], list[int], float]], n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        kept, gone = np.zeros((n, len(leaves))), np.zeros((n, len(leaves)))
        for j, (k, g, _) in enumerate(leaves):
            kept[k, j], gone[g, j] = 1.0, 1.0
        return kept, kept.sum(axis=0), gone, np.array([value for _, _, value in leaves])

    @staticmethod
    def _apply(Xf: np.ndarray, table: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
        """Each row's leaf value: exactly one leaf holds (all its kept units in, none of its removed)."""
        kept, count, gone, values = table
        hit = ((Xf @ kept) == count) & ((Xf @ gone) == 0)
        return hit.astype(float) @ values

    def _grow(self, X: np.ndarray, r: np.ndarray, idx: np.ndarray, kept: list[int], gone: list[int], depth: int,
              out: list[tuple[list[int], list[int], float]]) -> None:
        rs, Xs = r[idx], X[idx]
        if depth > 0 and len(idx) >= 2 * self.min_leaf:
            right_n = Xs.sum(axis=0)
            right_s = Xs.T @ rs
            left_n, left_s = len(idx) - right_n, rs.sum() - right_s
            ok = (right_n >= self.min_leaf) & (left_n >= self.min_leaf)
            if ok.any():
                gain = np.where(ok, right_s**2 / np.maximum(right_n, 1) + left_s**2 / np.maximum(left_n, 1), -np.inf)
                f = int(np.argmax(gain))
                if gain[f] > rs.sum() ** 2 / len(idx) + 1e-15:
                    on = Xs[:, f] > 0
                    self._grow(X, r, idx[on], kept + [f], gone, depth - 1, out)
                    self._grow(X, r, idx[~on], kept, gone + [f], depth - 1, out)
                    return
        out.append((kept, gone, float(rs.mean())))

    def predict(self, X: np.ndarray) -> np.ndarray:
        Xf = X.astype(float)
        total: np.ndarray | float = 0.0
        for table in self.tables:
            total = total + self._apply(Xf, table)
        return self.base + total

    def shapley(self, n: int) -> np.ndarray:
        """A leaf u(S) = [K ⊆ S, G ∩ S = ∅]: a unit of K gains when it joins last of K before any
        of G, (|K|−1)!|G|!/(|K|+|G|)!; a unit of G loses when it joins first of G after all of K."""
        phi = np.zeros(n)
        for kept, gone, value in self.leaves:
            p, q = len(kept), len(gone)
            if p:
                phi[kept] += value * math.factorial(p - 1) * math.factorial(q) / math.factorial(p + q)
            if q:
                phi[gone] -= value * math.factorial(p) * math.factorial(q - 1) / math.factorial(p + q)
        return phi


class _KAdditive:
    """The odd part of a 3-additive game: z_i and z_i z_j z_k in z = 2x − 1 (the odd part of
    Möbius terms of degree ≤ 3), with the triples limited to those containing a hub (the unit
    whose removal costs most), ridge-regularised. The triples join only when there are at least
    as many fitted pairs as terms: an underdetermined fit extrapolates wildly (measured)."""

    def __init__(self, hub: int, ridge: float = 1e-3) -> None:
        self.hub, self.ridge = hub, ridge

    def _features(self, X: np.ndarray) -> np.ndarray:
        z = 2 * X.astype(float) - 1
        return np.column_stack([z, z[:, self.triples].prod(axis=2)]) if len(self.triples) else z

    def fit(self, X: np.ndarray, y: np.ndarray) -> "_KAdditive":
        n = X.shape[1]
        others = [i for i in range(n) if i != self.hub]
        triples = [(self.hub, i, j) for i, j in combinations(others, 2)]
        enough = len(y) // 2 >= n + len(triples)  # rows come as (S, o) and (N∖S, −o)
        self.triples = np.array(triples if enough else [], dtype=int).reshape(-1, 3)
        F = self._features(X)
        self.coef = np.linalg.solve(F.T @ F + self.ridge * np.eye(F.shape[1]), F.T @ y)
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self._features(X) @ self.coef

    def shapley(self, n: int) -> np.ndarray:
        """φ(z_i) = 2 at i; φ(z_i z_j z_k) = 2/3 at each of i, j, k (when i joins, j and k are
        both before or both after it with probability 2/3, z_j z_k = +1, else −1)."""
        phi = 2 * self.coef[:n].copy()
        np.add.at(phi, self.triples.reshape(-1), np.repeat(self.coef[n:], 3) * 2 / 3)
        return phi


SURROGATES = {"trees": lambda hub: _Trees(), "kadd": lambda hub: _KAdditive(hub)}


def _draw_pairs(head: np.ndarray, budget: int, rng: np.random.Generator) -> np.ndarray:
    """One side of each sampled complementary pair: a uniformly drawn size in 2..n−2, uniform
    within the size, until the new coalitions would pass `budget`. At most `budget` draws
    (repeats are free, so the bound keeps the loop finite), and the pairs at a smaller budget
    are a prefix of those at a larger one."""
    n = head.shape[1]
    sizes = np.arange(2, n - 1)
    bits = 1 << np.arange(n, dtype=np.int64)
    seen = set((head @ bits).tolist())
    rows: list[np.ndarray] = []
    while len(rows) < budget:
        row = np.zeros(n, bool)
        row[rng.choice(n, int(rng.choice(sizes)), replace=False)] = True
        new = {int(row @ bits), int(~row @ bits)} - seen
        if len(seen) + len(new) > budget:
            break
        seen |= new
        rows.append(row)
    return np.array(rows, dtype=bool).reshape(-1, n)


def _middle_part(f: _Trees | _KAdditive, n: int) -> np.ndarray:
    """A surrogate's Shapley values on the sampled strata only: its whole values less its ends
    strata, which the game's own enumerated coalitions give exactly."""
    eye = np.eye(n, dtype=bool)
    f_full = f.predict(np.ones((1, n), bool))[0] - f.predict(np.zeros((1, n), bool))[0]
    f_singles = f.predict(eye) - f.predict(~eye)
    return f.shapley(n) - _ends_part(n, -f_full / 2, f_full / 2, f_singles / 2, -f_singles / 2)


def _cross_fitted(fitted: Callable[[np.ndarray], tuple[_Trees | _KAdditive, np.ndarray]], pairs: np.ndarray,
                  odd: np.ndarray, folds: int, rng: np.random.Generator) -> np.ndarray:
    """Each pair's unbiased estimate of the sampled strata, corrected by a surrogate fitted on the
    other folds: one that had seen the pair would absorb its residual and bias the correction."""
    m, n = pairs.shape
    size = pairs.sum(axis=1, keepdims=True)
    # One pair's unbiased estimate of the sampled strata (the n−3 sizes 2..n−2) for the residual r
    # (odd, so S and N∖S agree).
    weight = (n - 3) * np.where(pairs, 1 / np.maximum(size, 1), -1 / np.maximum(n - size, 1))
    fold = rng.permutation(np.arange(m) % folds)
    h = np.zeros((m, n))
    for k in range(folds):
        test = fold == k
        f, middle = fitted(~test)
        fo = (f.predict(pairs[test]) - f.predict(~pairs[test])) / 2
        h[test] = middle + weight[test] * (odd[test] - fo)[:, None]
    return h


def ramc(game: CachedGame, budget: int, seed: int = 0, surrogate: str = "trees", folds: int = 5) -> Estimate:
    """Regression-adjusted Monte Carlo: exact Shapley values of a surrogate fitted to the odd
    part of the game plus an unbiased Monte Carlo estimate of the residual's, cross-fitted (the
    surrogate that corrects a pair never saw it), with t-intervals across pairs.

    Coalitions: ∅, N, every {i} and N∖{i} (2n+2), then complementary pairs of a uniformly drawn
    size in 2..n−2, uniform within the size; at most `budget` pairs are drawn (repeats are free),
    so the coalitions at a smaller budget are a prefix of those at a larger one. A budget below
    2n+2 runs antithetic permutations instead."""
    n = game.n
    name = "ramc" if surrogate == "trees" else f"ramc-{surrogate}"
    if enumerable(n, budget):
        return _exact_as(name, game)
    if budget < 2 * n + 2 or n < 4:
        est = permutation(game, budget, seed)
        est.method, est.extra = name, {**est.extra, "fallback": "permutation"}
        return est
    rng = np.random.default_rng(seed)
    eye = np.eye(n, dtype=bool)
    head = np.concatenate([np.zeros((1, n), bool), np.ones((1, n), bool), eye, ~eye])
    vh = game(head)
    v_empty, v_full, singles, complements = vh[0], vh[1], vh[2:n + 2], vh[n + 2:]
    exact_part = _ends_part(n, v_empty, v_full, singles, complements)
    pairs = _draw_pairs(head, budget, rng)
    odd = (game(pairs) - game(~pairs)) / 2 if len(pairs) else np.zeros(0)
    # Known odd values from the head: o(N) and o({i}), with o(N∖S) = −o(S).
    head_rows = np.concatenate([np.ones((1, n), bool), eye])
    head_odd = np.concatenate([[(v_full - v_empty) / 2], (singles - complements) / 2])
    hub = int(np.argmax(v_full - complements))

    def fitted(train: np.ndarray) -> tuple[_Trees | _KAdditive, np.ndarray]:
        """The surrogate fitted to the head and the `train` pairs, and its sampled strata."""
        X = np.concatenate([head_rows, pairs[train], ~head_rows, ~pairs[train]])
        y = np.concatenate([head_odd, odd[train], -head_odd, -odd[train]])
        f = SURROGATES[surrogate](hub).fit(X, y)
        return f, _middle_part(f, n)

    m = len(pairs)
    if m < 2:
        _, middle = fitted(np.ones(m, bool))
        return Estimate(name, exact_part + middle, np.full(n, np.inf), game.evaluations, v_empty, v_full, {"pairs": m})
    h = _cross_fitted(fitted, pairs, odd, min(folds, m), rng)
    stderr = h.std(axis=0, ddof=1) / math.sqrt(m)
    return Estimate(name, exact_part + h.mean(axis=0), stderr, game.evaluations, v_empty, v_full,
                    {"df": m - 1, "pairs": m})
