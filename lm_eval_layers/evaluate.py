"""Evaluate variants of one loaded model on lm-eval tasks: (model, tasks, plans) → per-task
metrics and per-example columns, under lm-eval's bare metric names (`acc`, `acc_norm`,
`perplexity`, …; columns in `columns.py`).

The demo, `surgery score`, training reports and the benchmarks all evaluate through
`Evaluator`. It prepares the requests once and reuses them for every variant (`prepared.py`:
shared contexts, the full model's prefix reused) when every task is a log-likelihood or
multiple-choice task; otherwise it runs lm-eval's own loop per variant and `Evaluator.fallback` says why.
Metrics are the tasks' own (`process_results` and their aggregations) on either path.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterable

from lm_eval_layers.columns import Columns, by_metric, example_columns
from lm_eval_layers.plan import LayerPlan, PlanSpec
from lm_eval_layers.task_suite import load_tasks, task_manager


@dataclass
class VariantResult:
    name: str
    plan: LayerPlan
    metrics: dict[str, dict[str, float]]  # task -> metric -> the task's aggregate
    examples: dict[str, Columns]  # task -> metric -> per-example value, in document order
    seconds: float
    samples: dict[str, list[dict[str, Any]]] = field(default_factory=dict, repr=False)  # lm-eval's loop only


class Evaluator:
    """Evaluates variants of `lm` (a `LayeredLM`) on one set of tasks and documents.

    `prepared=False` forces lm-eval's own loop (`simple_evaluate` per variant). The model is
    switched to its full form while evaluating and left in it.
    """

    def __init__(self, lm: Any, tasks: list[str], manager: Any = None, limit: int | float | None = None,
                 prepared: bool = True) -> None:
        from lm_eval_layers.prepared import PreparedEngine, PreparedRequests, UnsupportedTask

        self.lm, self.limit = lm, limit
        self.manager = manager or task_manager()
        self.task_names = list(tasks)
        self.tasks = load_tasks(self.manager, self.task_names)
        self.lm.use_plan(LayerPlan.identity(lm.plan.num_layers))
        self.fallback: str | None = None
        self.engine: PreparedEngine | None = None
        if not prepared:
            self.fallback = "prepared requests switched off"
            return
        try:
            self.engine = PreparedEngine(lm, PreparedRequests(lm, self.tasks, None if limit is None else int(limit)))
        except UnsupportedTask as e:
            self.fallback = str(e)

    @property
    def identity(self) -> str:
        """What a stored score answers for besides the model: each task's config (prompts, splits,
        metrics, loader) and the documents evaluated (prepared path), so an edited task YAML or
        other data is never answered from a store."""
        from lm_eval_layers.identity import digest

        docs = self.engine.prepared.docs if self.engine is not None else {}
        return digest({"limit": self.limit, "docs": docs,
                       "configs": {name: task.dump_config() for name, task in self.tasks.items()}})

    def evaluate(self, plan: LayerPlan | PlanSpec, name: str = "", log_samples: bool = False) -> VariantResult:
        """One variant's metrics and columns (`log_samples`: keep lm-eval's samples, own loop only)."""
        if isinstance(plan, PlanSpec):
            plan = plan.resolve(self.lm.plan.num_layers)
        start = time.perf_counter()
        run = self._prepared if self.engine is not None else self._lm_eval_loop
        metrics, examples, samples = run(plan, log_samples)
        return VariantResult(name, plan, metrics, examples, time.perf_counter() - start, samples)

    def evaluate_all(self, plans: Iterable[tuple[str, LayerPlan | PlanSpec]], log_samples: bool = False) -> list[VariantResult]:
        return [self.evaluate(plan, name, log_samples) for name, plan in plans]

    def _prepared(self, plan: LayerPlan, _log_samples: bool) -> tuple[dict, dict, dict]:
        assert self.engine is not None
        responses = self.engine.responses(plan)
        metrics, examples = {}, {}
        for name, task in self.tasks.items():
            items: dict[str, list[Any]] = {}
            rows = []
            for doc_id, doc in sorted(self.engine.prepared.docs[name].items()):
                answers = responses[(name, doc_id)]
                result = task.process_results(doc, answers)
                for metric, value in result.items():
                    items.setdefault(metric, []).append(value)
                rows.append(example_columns(task, doc, result, [ll for ll, _ in answers]))
            aggregation = task.aggregation()
            metrics[name] = {m: float(aggregation[m](values)) for m, values in items.items() if m in aggregation}
            examples[name] = by_metric(rows)
        return metrics, examples, {}

    def _lm_eval_loop(self, plan: LayerPlan, log_samples: bool) -> tuple[dict, dict, dict]:
        import lm_eval

        self.lm.use_plan(plan)
        try:
            out = lm_eval.simple_evaluate(model=self.lm, tasks=self.task_names, limit=self.limit,
                                          task_manager=self.manager, log_samples=True, bootstrap_iters=0)
        finally:
            self.lm.use_plan(LayerPlan.identity(plan.num_layers))
        examples = {}
        for name, samples in out["samples"].items():
            task = self.tasks[name]
            examples[name] = by_metric(
                example_columns(task, s["doc"], s, _loglikelihoods(s["filtered_resps"]))
                for s in sorted(samples, key=lambda s: s["doc_id"])
            )
        metrics = {name: _bare_names(values) for name, values in out["results"].items() if name in self.tasks}
        return metrics, examples, out["samples"] if log_samples else {}


def _bare_names(results: dict[str, Any]) -> dict[str, float]:
    """lm-eval's `"acc,none"` keys as `"acc"` (other filters keep their suffix); no stderr."""
    out = {}
    for key, value in results.items():
        metric, _, filt = key.partition(",")
        if filt and "_stderr" not in metric and isinstance(value, (int, float)):
            out[metric if filt == "none" else key] = float(value)
    return out


def _loglikelihoods(responses: list[Any]) -> list[float]:
    """The log-likelihoods in a sample's filtered responses: (ll, is_greedy) pairs or bare
    floats (rolling); none for generations."""
    values = [r[0] if isinstance(r, (list, tuple)) and r else r for r in responses]
    return [float(v) for v in values if isinstance(v, (int, float))]
