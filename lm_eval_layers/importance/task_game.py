"""The game on a real model: v(S) = a metric of the variant that keeps exactly the units in S,
measured on real lm-eval tasks. Every evaluated coalition is kept in the store with its
per-example columns (all metrics), so runs resume, budgets extend, and benchmark-sample error
can be bootstrapped over examples without new model calls.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from lm_eval_layers.columns import Columns, value_of
from lm_eval_layers.errors import UsageError
from lm_eval_layers.importance.games import key
from lm_eval_layers.importance.settings import Metric, Unit
from lm_eval_layers.importance.store import Store
from lm_eval_layers.plan import LayerPlan, Slot


def check_metric(scores: dict[str, Columns], metric: str, option: str = "--metric",
                 allowed: tuple[str, ...] = tuple(m.value for m in Metric)) -> None:
    """Refuse a metric some task does not report, naming the `allowed` ones every task does."""
    missing = [task for task, columns in scores.items() if metric not in columns]
    if missing:
        common = [m for m in allowed if all(m in columns for columns in scores.values())]
        raise UsageError(f"{option} {metric} is not reported by {', '.join(missing)}; "
                         + (f"use {' or '.join(common)}" if common else "choose other tasks"))


def coalition_plan(coalition: np.ndarray, unit: Unit | str, num_layers: int) -> LayerPlan:
    """The variant keeping exactly the units in `coalition`.

    A block without either half is dropped (same function, less work), except when that would
    drop every block: then the halves are removed instead, so v(∅) is the embeddings alone.
    """
    kept = np.asarray(coalition, dtype=bool)
    if Unit(unit) is Unit.block:
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
        unit: Unit | str,
        metric: str,
        store: Store,
    ) -> None:
        self.evaluate, self.num_layers, self.unit, self.metric, self.store = evaluate, num_layers, Unit(unit), metric, store
        self.n = self.unit.players(num_layers)

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
            check_metric(scores, self.metric)
            out.append(value_of(scores, self.metric))
        return np.array(out)
