"""The game on a real model: v(S) = a metric of the variant that keeps exactly the units in S,
measured on real lm-eval tasks. Every evaluated coalition is kept in the store with its
per-example columns (all metrics), so runs resume, budgets extend, and benchmark-sample error
can be bootstrapped over examples without new model calls.
"""

from __future__ import annotations

from enum import Enum
from typing import Callable

import numpy as np

from lm_eval_layers.columns import Columns, value_of
from lm_eval_layers.errors import UsageError
from lm_eval_layers.importance.games import key
from lm_eval_layers.importance.store import Store
from lm_eval_layers.plan import LayerPlan, Slot


class Unit(str, Enum):
    """What a player is: a whole block, or one half (attention / MLP branch) of every block."""

    block = "block"
    attn = "attn"
    mlp = "mlp"


class Metric(str, Enum):
    """The per-example column a game averages (see `columns.py`)."""

    acc = "acc"
    acc_norm = "acc_norm"
    loglik = "loglik"
    margin = "margin"


def num_players(unit: str, num_layers: int) -> int:
    """Blocks are players for `block`; for `attn` / `mlp`, both halves of every block are
    players, ordered attn0, mlp0, attn1, mlp1, …"""
    return num_layers if unit == "block" else 2 * num_layers


def unit_names(unit: str, num_layers: int) -> list[str]:
    if unit == "block":
        return [f"block {i}" for i in range(num_layers)]
    return [f"{half} {i}" for i in range(num_layers) for half in ("attn", "mlp")]


def coalition_plan(coalition: np.ndarray, unit: str, num_layers: int) -> LayerPlan:
    """The variant keeping exactly the units in `coalition`.

    A block without either half is dropped (same function, less work), except when that would
    drop every block: then the halves are removed instead, so v(∅) is the embeddings alone.
    """
    kept = np.asarray(coalition, dtype=bool)
    if unit == "block":
        attn = mlp = kept
    else:
        attn, mlp = kept[0::2], kept[1::2]
    gone = ~attn & ~mlp
    drop_whole = not bool(gone.all())
    slots = []
    for i in range(num_layers):
        if gone[i] and drop_whole:
            continue
        slots.append(Slot((i,), drop_attn=not attn[i], drop_mlp=not mlp[i]))
    return LayerPlan(num_layers, tuple(slots))


class TaskGame:
    """v(S) on lm-eval tasks. `evaluate(plan)` returns per-task, per-metric example scores."""

    def __init__(
        self,
        evaluate: Callable[[LayerPlan], dict[str, Columns]],
        num_layers: int,
        unit: str,
        metric: str,
        store: Store,
    ) -> None:
        self.evaluate, self.num_layers, self.unit, self.metric, self.store = evaluate, num_layers, unit, metric, store
        self.n = num_players(unit, num_layers)

    def name(self, coalition: np.ndarray) -> str:
        """The coalition's key in the store (hex bitmask)."""
        return format(key(coalition), f"0{(self.n + 3) // 4}x")

    def compute(self, coalition: np.ndarray) -> dict[str, Columns]:
        """Evaluate the coalition's variant (no store involved)."""
        return self.evaluate(coalition_plan(coalition, self.unit, self.num_layers))

    def commit(self, coalition: np.ndarray, scores: dict[str, Columns]) -> None:
        self.store.put(self.name(coalition), scores)

    def scores(self, coalition: np.ndarray) -> dict[str, Columns]:
        found = self.store.get(self.name(coalition))
        if found is None:
            found = self.compute(coalition)
            self.commit(coalition, found)
        return found

    def __call__(self, coalitions: np.ndarray) -> np.ndarray:
        out = []
        for c in np.atleast_2d(coalitions):
            scores = self.scores(c)
            if any(self.metric not in m for m in scores.values()):
                raise UsageError(f"metric {self.metric!r} is not reported by every task; use one of {', '.join(m.value for m in Metric)}")
            out.append(value_of(scores, self.metric))
        return np.array(out)
