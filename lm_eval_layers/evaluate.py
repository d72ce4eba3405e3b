"""Evaluate several variants of one loaded model on lm-eval tasks (the model is loaded once)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import lm_eval
from lm_eval.tasks import TaskManager

from lm_eval_layers.model import LayeredLM
from lm_eval_layers.plan import LayerPlan, PlanSpec


@dataclass
class VariantResult:
    name: str
    plan: LayerPlan
    metrics: dict[str, dict[str, Any]]  # task -> lm-eval's metrics ("acc,none": 0.5, …)
    seconds: float
    samples: dict[str, list[dict[str, Any]]] = field(default_factory=dict, repr=False)


def evaluate_plans(
    lm: LayeredLM,
    plans: Iterable[tuple[str, PlanSpec | LayerPlan]],
    tasks: list[str],
    task_manager: TaskManager,
    limit: int | float | None = None,
    log_samples: bool = False,
) -> list[VariantResult]:
    """Run lm-eval on each (name, plan) in turn, switching the variant in place between runs."""
    results = []
    try:
        for name, spec in plans:
            plan = lm.use_plan(spec)
            start = time.perf_counter()
            out = lm_eval.simple_evaluate(
                model=lm, tasks=tasks, limit=limit, task_manager=task_manager, log_samples=log_samples,
                bootstrap_iters=0,
            )
            results.append(
                VariantResult(name, plan, out["results"], time.perf_counter() - start, out.get("samples", {}))
            )
    finally:
        lm.use_plan(LayerPlan.identity(lm.plan.num_layers))
    return results
