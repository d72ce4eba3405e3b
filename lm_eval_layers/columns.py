"""Per-example metric columns: what one variant scored on each document of a task.

Both evaluation paths (prepared requests and lm-eval's own loop) and the `surgery score` store
use these columns, under lm-eval's bare metric names: `acc`, `acc_norm` (from the task's own
`process_results`), plus smooth metrics from the same requests: `loglik` (log-likelihood of the
gold answer), `margin` (over the best wrong answer) and `chance` (accuracy of guessing).
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np
from lm_eval.api.metrics import mean

Columns = dict[str, list[float]]  # metric -> per-example values, in document order


def gold_index(task: Any, doc: dict) -> int | None:
    """The index of the right answer of a multiple-choice document, as lm-eval scores it."""
    if task.OUTPUT_TYPE != "multiple_choice":
        return None
    target = task.doc_to_target(doc)
    if isinstance(target, str):
        choices = task.doc_to_choice(doc)
        target = choices.index(target) if target in choices else int(target) if target.isdigit() else None
    return int(target) if isinstance(target, (int, np.integer)) else None


def example_columns(task: Any, doc: dict, items: dict[str, Any], loglikelihoods: list[float]) -> dict[str, float]:
    """One document's columns: the task's per-example metrics that lm-eval averages, and the
    smooth ones from the answers' log-likelihoods."""
    aggregation = task.aggregation()
    out = {k: float(v) for k, v in items.items() if aggregation.get(k) is mean and isinstance(v, (int, float, bool))}
    gold = gold_index(task, doc)
    if gold is not None and 0 <= gold < len(loglikelihoods) and len(loglikelihoods) > 1:
        out["loglik"] = loglikelihoods[gold]
        out["margin"] = loglikelihoods[gold] - max(ll for j, ll in enumerate(loglikelihoods) if j != gold)
        out["chance"] = 1 / len(loglikelihoods)
    elif len(loglikelihoods) == 1:
        out["loglik"] = loglikelihoods[0]
    return out


def by_metric(rows: Iterable[dict[str, float]]) -> Columns:
    """Per-example dicts (in document order) as one column per metric that every example has."""
    rows = list(rows)
    keys = [k for k in rows[0] if all(k in r for r in rows)] if rows else []
    return {k: [r[k] for r in rows] for k in keys}


def value_of(columns: dict[str, Columns], metric: str) -> float:
    """Mean over tasks of each task's mean per-example value."""
    return float(np.mean([np.mean(task[metric]) for task in columns.values()]))
