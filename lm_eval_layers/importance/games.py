"""Cooperative games over layer units, kept apart from the estimators (as in shapiq).

A game maps boolean coalition rows (m × n: which units are kept) to values. `CachedGame`
evaluates each distinct coalition once and counts evaluations, which is the budget estimators
spend. Synthetic games with known Shapley values test and benchmark the estimators without a
model.
"""

from __future__ import annotations

from typing import Callable, Protocol

import numpy as np


class Game(Protocol):
    n: int

    def __call__(self, coalitions: np.ndarray) -> np.ndarray: ...


def key(coalition: np.ndarray) -> int:
    """A coalition as an integer bitmask (player i is bit i)."""
    return int(np.dot(coalition.astype(np.int64), 1 << np.arange(len(coalition), dtype=np.int64)))


def from_key(k: int, n: int) -> np.ndarray:
    return ((k >> np.arange(n)) & 1).astype(bool)


class CachedGame:
    """Each distinct coalition is evaluated once; `evaluations` is what the estimator spent."""

    def __init__(self, game: Game | Callable[[np.ndarray], np.ndarray], n: int | None = None) -> None:
        self.game = game
        self.n = n if n is not None else game.n  # type: ignore[union-attr]
        self.values: dict[int, float] = {}

    @property
    def evaluations(self) -> int:
        return len(self.values)

    def __call__(self, coalitions: np.ndarray) -> np.ndarray:
        coalitions = np.atleast_2d(np.asarray(coalitions, dtype=bool))
        keys = [key(c) for c in coalitions]
        missing = list(dict.fromkeys(k for k in keys if k not in self.values))
        if missing:
            rows = np.array([from_key(k, self.n) for k in missing])
            for k, v in zip(missing, np.asarray(self.game(rows), dtype=float)):
                self.values[k] = float(v)
        return np.array([self.values[k] for k in keys])


class QuadraticGame:
    """v(S) = Σ_{i∈S} w_i + Σ_{i<j∈S} J_ij: additive values plus pairwise interactions.

    Shapley values in closed form: φ_i = w_i + ½ Σ_j J_ij.
    """

    def __init__(self, weights: np.ndarray, interactions: np.ndarray | None = None) -> None:
        self.n = len(weights)
        self.w = np.asarray(weights, dtype=float)
        J = np.zeros((self.n, self.n)) if interactions is None else np.asarray(interactions, dtype=float)
        self.J = np.triu(J, 1) + np.triu(J, 1).T

    def __call__(self, coalitions: np.ndarray) -> np.ndarray:
        x = np.atleast_2d(coalitions).astype(float)
        return x @ self.w + 0.5 * np.einsum("mi,ij,mj->m", x, self.J, x)

    @property
    def shapley(self) -> np.ndarray:
        return self.w + 0.5 * self.J.sum(axis=1)


class CornerstoneGame:
    """A layer-like game: accuracy falls to `chance` without any cornerstone unit, otherwise a
    saturating function of the kept units' weights (higher-order interactions everywhere)."""

    def __init__(self, weights: np.ndarray, cornerstones: list[int], chance: float = 0.25, top: float = 0.7) -> None:
        self.n = len(weights)
        self.w = np.asarray(weights, dtype=float)
        self.cornerstones = list(cornerstones)
        self.chance, self.top = chance, top

    def __call__(self, coalitions: np.ndarray) -> np.ndarray:
        x = np.atleast_2d(coalitions).astype(bool)
        alive = x[:, self.cornerstones].all(axis=1)
        strength = x.astype(float) @ self.w / self.w.sum()
        return self.chance + alive * (self.top - self.chance) * strength**2


class NoisyGame:
    """A game observed with fixed per-coalition noise (like a benchmark's sample error)."""

    def __init__(self, game: Game, sigma: float, seed: int = 0) -> None:
        self.n, self.game, self.sigma, self.seed = game.n, game, sigma, seed

    def __call__(self, coalitions: np.ndarray) -> np.ndarray:
        x = np.atleast_2d(coalitions)
        noise = np.array([np.random.default_rng([self.seed, key(c)]).normal(0, self.sigma) for c in x])
        return self.game(x) + noise


class RedundantPairsGame:
    """A layer-like game of interchangeable units: consecutive units 2k, 2k+1 form a pair that
    contributes its weight while either member is kept (removing one of two redundant blocks
    costs little, removing both costs a lot), through a saturating curve from `chance` to `top`."""

    def __init__(self, weights: np.ndarray, chance: float = 0.25, top: float = 0.7, rate: float = 3.0) -> None:
        self.n = len(weights)
        self.w = np.asarray(weights, dtype=float)
        self.chance, self.top, self.rate = chance, top, rate

    def __call__(self, coalitions: np.ndarray) -> np.ndarray:
        x = np.atleast_2d(coalitions).astype(bool)
        pairs = np.arange(self.n) // 2
        groups = np.zeros((len(x), pairs[-1] + 1), bool)
        np.logical_or.at(groups.T, pairs, x.T)
        pair_w = np.bincount(pairs, self.w)
        strength = (1 - np.exp(-self.rate * groups @ pair_w / pair_w.sum())) / (1 - np.exp(-self.rate))
        return self.chance + (self.top - self.chance) * strength


class CornerstoneTailGame:
    """A layer-like game: without the cornerstone unit accuracy is `chance`; with it, the other
    units add weights that fall off along the stack (a long tail of small late units) through a
    saturating curve, so each unit matters less the more others are kept."""

    def __init__(self, n: int, cornerstone: int = 0, decay: float = 0.15, chance: float = 0.25, top: float = 0.7,
                 rate: float = 2.5) -> None:
        self.n, self.cornerstone = n, cornerstone
        self.w = np.exp(-decay * np.arange(n))
        self.w[cornerstone] = 0.0
        self.chance, self.top, self.rate = chance, top, rate

    def __call__(self, coalitions: np.ndarray) -> np.ndarray:
        x = np.atleast_2d(coalitions).astype(bool)
        share = x.astype(float) @ self.w / self.w.sum()
        strength = 0.2 + 0.8 * (1 - np.exp(-self.rate * share)) / (1 - np.exp(-self.rate))
        return self.chance + x[:, self.cornerstone] * (self.top - self.chance) * strength
