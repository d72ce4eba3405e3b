"""The game on a real model: v(S) = a metric of the variant that keeps exactly the units in S,
measured with lm-eval on real tasks. Every evaluated coalition is stored in SQLite with its
per-example scores (all metrics), so runs resume, budgets extend, and benchmark-sample error
can be bootstrapped over examples without new model calls.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any, Callable

import numpy as np

from lm_eval_layers.importance.games import key
from lm_eval_layers.plan import LayerPlan, Slot

UNITS = ("block", "attn", "mlp")
METRICS = ("acc", "acc_norm", "loglik", "margin")


def num_players(unit: str, num_layers: int) -> int:
    """Blocks are players for `block`; for `attn` / `mlp`, both halves of every block are
    players, ordered attn0, mlp0, attn1, mlp1, … (DESIGN.md 2)."""
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


def example_scores(sample: dict[str, Any], gold: int | None = None) -> dict[str, float]:
    """All metrics of one logged lm-eval sample: acc, acc_norm, and the smooth ones from the
    same requests (log-likelihood of the gold answer and its margin over the best wrong one).
    `gold` is the answer's index; by default the sample's `target` when it is one."""
    out = {m: float(sample[m]) for m in ("acc", "acc_norm") if m in sample}
    if gold is None:
        target = sample.get("target")
        gold = int(target) if isinstance(target, (int, np.integer)) or (isinstance(target, str) and target.isdigit()) else None
    lls = [float(r[0]) for r in sample.get("filtered_resps", [])]
    if gold is not None and 0 <= gold < len(lls) and len(lls) > 1:
        out["loglik"] = lls[gold]
        out["margin"] = lls[gold] - max(ll for j, ll in enumerate(lls) if j != gold)
        out["chance"] = 1 / len(lls)  # accuracy of guessing among the choices
    elif len(lls) == 1:
        out["loglik"] = lls[0]
    return out


def by_metric(rows: list[dict[str, float]]) -> dict[str, list[float]]:
    """Per-example score dicts (in document order) as one list per metric every example has."""
    keys = [k for k in rows[0] if all(k in r for r in rows)]
    return {k: [r[k] for r in rows] for k in keys}


class Store:
    """SQLite store of evaluated coalitions; each is committed as soon as it is measured."""

    def __init__(self, path: Path, context: dict[str, Any]) -> None:
        self.path = path
        self.context = json.dumps(context, sort_keys=True)
        self.db = sqlite3.connect(str(path))
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS coalitions (context TEXT, coalition TEXT, scores TEXT, PRIMARY KEY (context, coalition))"
        )
        self.db.commit()

    def __len__(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM coalitions WHERE context = ?", (self.context,)).fetchone()[0]

    def get(self, coalition: str) -> dict[str, dict[str, list[float]]] | None:
        row = self.db.execute(
            "SELECT scores FROM coalitions WHERE context = ? AND coalition = ?", (self.context, coalition)
        ).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, coalition: str, scores: dict[str, dict[str, list[float]]]) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO coalitions VALUES (?, ?, ?)", (self.context, coalition, json.dumps(scores))
        )
        self.db.commit()


def value_of(scores: dict[str, dict[str, list[float]]], metric: str) -> float:
    """Mean over tasks of each task's mean per-example score."""
    per_task = [np.mean(by_metric[metric]) for by_metric in scores.values()]
    return float(np.mean(per_task))


class TaskGame:
    """v(S) on lm-eval tasks. `evaluate(plan)` returns per-task, per-metric example scores."""

    def __init__(
        self,
        evaluate: Callable[[LayerPlan], dict[str, dict[str, list[float]]]],
        num_layers: int,
        unit: str,
        metric: str,
        store: Store,
    ) -> None:
        self.evaluate, self.num_layers, self.unit, self.metric, self.store = evaluate, num_layers, unit, metric, store
        self.n = num_players(unit, num_layers)
        self.new_evaluations = 0

    def name(self, coalition: np.ndarray) -> str:
        """The coalition's key in the store (hex bitmask)."""
        return format(key(coalition), f"0{(self.n + 3) // 4}x")

    def compute(self, coalition: np.ndarray) -> dict[str, dict[str, list[float]]]:
        """Evaluate the coalition's variant (no store involved)."""
        return self.evaluate(coalition_plan(coalition, self.unit, self.num_layers))

    def commit(self, coalition: np.ndarray, scores: dict[str, dict[str, list[float]]]) -> None:
        self.store.put(self.name(coalition), scores)
        self.new_evaluations += 1

    def scores(self, coalition: np.ndarray) -> dict[str, dict[str, list[float]]]:
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
                raise ValueError(f"metric {self.metric!r} is not reported by every task; use one of {', '.join(METRICS)}")
            out.append(value_of(scores, self.metric))
        return np.array(out)
