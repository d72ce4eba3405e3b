"""Task objectives of a search: plans scored on lm-eval tasks through the prepared-requests
`Evaluator` (requests built and tokenised once; a variant runs from its first slot that differs
from the full model), behind the interface the methods use on calibration text.

The objective is an error to minimise, each task counting equally whatever its size. Per
document i of task t (one of T tasks with n_t documents), the score is

    acc, acc_norm:  (1 − m_i) / (T · n_t)        m_i the task's own per-document 0/1 metric
    loglik:         −ℓ_i / (T · n_t)             ℓ_i the log-likelihood of the gold answer

so a plan's scores sum to the mean over tasks of the mean error (`positions` is 1), and a
step's margin is bootstrapped over documents as it is over windows on calibration text.
Block passes count one block over every prepared request as 1 (a ranking's pass over the
calibration windows as its share of those tokens).

The calibration windows stay with the engine: `bi` and `angular` rank blocks on them, and the
ranked plans are then scored on the tasks.
"""

from __future__ import annotations

from typing import Any

import torch

from lm_eval_layers.arch import layout_for
from lm_eval_layers.plan import LayerPlan

TASK_OBJECTIVES = ("acc", "acc_norm", "loglik")


class TaskEngine:
    """Scores plans of `lm` (a `LayeredLM`) on `evaluator`'s documents for a task `objective`."""

    def __init__(self, lm: Any, evaluator: Any, objective: str, calibration: torch.Tensor, batch_size: int = 4) -> None:
        from lm_eval_layers.importance.task_game import check_metric

        if objective not in TASK_OBJECTIVES:
            raise ValueError(f"objective {objective!r}: use one of {', '.join(TASK_OBJECTIVES)}")
        self.lm, self.evaluator, self.objective = lm, evaluator, objective
        self.model = lm.model
        self.layout = layout_for(self.model)
        self.num_layers = len(self.layout.find_blocks(self.model))
        device = next(self.model.parameters()).device
        self.batches = [b.to(device) for b in calibration.split(batch_size)]
        self.block_passes = float(self.num_layers)  # the full model's pass that prepared requests cache
        full = evaluator.evaluate(LayerPlan.identity(self.num_layers)).examples
        check_metric(full, objective, "--objective", TASK_OBJECTIVES)  # a task without the metric is refused before any search
        self.sizes = {task: len(columns[objective]) for task, columns in full.items()}
        self.windows = sum(self.sizes.values())  # documents: what a margin is bootstrapped over
        self.positions = 1
        self.full_scores = self._errors(full)
        self.reference, self.reference_scores = LayerPlan.identity(self.num_layers), self.full_scores
        prepared = evaluator.engine.prepared.tokens if evaluator.engine is not None else calibration.numel()
        self.calibration_share = calibration.numel() / prepared  # a calibration pass, in this engine's unit

    def _errors(self, examples: dict[str, dict[str, list[float]]]) -> torch.Tensor:
        parts = []
        for task, n in self.sizes.items():
            values = torch.tensor(examples[task][self.objective], dtype=torch.float64)
            error = -values if self.objective == "loglik" else 1 - values
            parts.append(error / (len(self.sizes) * n))
        return torch.cat(parts)

    def score(self, plan: LayerPlan) -> torch.Tensor:
        """Per-document error of `plan`'s variant."""
        examples = self.evaluator.evaluate(plan).examples
        engine = self.evaluator.engine
        self.block_passes += engine.blocks_run if engine is not None else len(plan.slots)
        return self._errors(examples)

    def start_from(self, plan: LayerPlan) -> None:
        """Nothing to do: variants start from the full model's cached prefix whatever the reference."""

    def calibration_pass(self) -> None:
        """Count a ranking's pass of the whole stack over the calibration windows, scaled to one
        block over every prepared request = 1."""
        self.block_passes += self.num_layers * self.calibration_share

    def rebase(self, plan: LayerPlan) -> torch.Tensor:
        """`plan`'s scores, run once per reference (re-basing is scoring here)."""
        if plan != self.reference:
            self.reference, self.reference_scores = plan, self.score(plan)
        return self.reference_scores
