"""Estimators that turn evaluations of a game into per-unit values with uncertainty (pure numpy).

- `exact`: the Shapley formula over all 2^n coalitions (ground truth, n ≤ ~16).
- `permutation`: permutation sampling, antithetic by default (each permutation also walked in
  reverse); t-intervals across pairs.
- `regression`: paired KernelSHAP with sizes drawn uniformly (leverage weights) and per-size
  stratified weights, ∅, N and all size-1 / size-(n−1) coalitions when the budget allows, solved
  under Σφ = v(N) − v(∅); bootstrap over sampled pairs.
- `window`: the local "efficient sampling" heuristic of "Investigating Layer Importance in Large Language Models", reproduced for comparison.
- `ablation`: leave-one-out, v(N) − v(N∖{i}).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

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


def _ends(game: CachedGame) -> tuple[float, float]:
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
    v_empty, v_full = _ends(game)
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
    v_empty, v_full = _ends(game)
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
    """Seed 1's heuristic: for unit i, the equal-weight mean of v(N) − v(N∖{i}) and of
    v(N∖W) − v(N∖(W∪{i})) for every contiguous window W (length ≤ level−1) that i extends at
    its left or right edge. Not Shapley-weighted; shipped to reproduce their numbers."""
    n = game.n
    v_empty, v_full = _ends(game)
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
    v_empty, v_full = _ends(game)
    rows = ~np.eye(n, dtype=bool)
    phi = v_full - game(rows)
    return Estimate("ablation", phi, np.zeros(n), game.evaluations, v_empty, v_full)
