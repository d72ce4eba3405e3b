"""Search methods over removal sets, all on one `CalibrationEngine` and one budget.

- `greedy` (SLEB; BlockPruner with `--unit halves`): at each step remove the unit whose removal
  scores best, re-scoring every remaining unit after each removal.
- `beam:B`: keep the B best removal sets per step (greedy is B = 1).
- `last` ("Reassessing Layer Pruning in LLMs"): remove the deepest units.
Every method stops when the budget is met or no unit is left to remove, so each loop is bounded
by the number of units.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from lm_eval_layers.plan import LayerPlan
from lm_eval_layers.search.engine import CalibrationEngine
from lm_eval_layers.search.units import Unit, plan_without

BOOTSTRAP = 1000  # resamples of the windows for a step's margin interval


@dataclass(frozen=True)
class Budget:
    """Remove `remove` units, or as many as it takes to keep at most `keep_share` of the parameters."""

    remove: int | None = None
    keep_share: float | None = None

    def met(self, removed: int, kept_params: int, total_params: int) -> bool:
        if self.remove is not None:
            return removed >= self.remove
        assert self.keep_share is not None
        return kept_params <= self.keep_share * total_params


@dataclass
class Step:
    removed: list[Unit]  # units removed so far, in removal order
    objective: float  # per token
    runner_up: dict | None  # {"removed": unit, "objective": x}: the best other choice at this step
    margin_ci: list[float] | None  # 95% bootstrap interval over windows of runner-up − chosen
    block_passes: float  # cumulative
    seconds: float  # cumulative
    params: int  # kept


@dataclass(frozen=True)
class Problem:
    """What every method needs: the engine, the removable units, sizes and the budget."""

    engine: CalibrationEngine
    candidates: list[Unit]  # removable, in stack order
    sizes: dict[Unit, int]  # parameters per unit
    total_params: int
    budget: Budget
    model_type: str | None
    seed: int = 0

    def plan(self, removed: list[Unit]) -> LayerPlan:
        return plan_without(self.engine.num_layers, removed, self.model_type)

    def kept(self, removed: list[Unit]) -> int:
        return self.total_params - sum(self.sizes[u] for u in removed)

    def per_token(self, scores: torch.Tensor) -> float:
        return float(scores.sum()) / self.engine.positions


Progress = Callable[[str, int, int], None]  # (what, done, total)


def greedy(problem: Problem, beam: int = 1, progress: Progress = lambda *a: None) -> list[Step]:
    """Greedy (beam = 1) or beam search; each step keeps the `beam` best distinct removal sets."""
    engine, start = problem.engine, time.perf_counter()
    members: list[tuple[list[Unit], torch.Tensor]] = [([], engine.full_scores)]
    steps: list[Step] = []
    while not _done(problem, members[0][0]):
        scored: dict[frozenset, tuple[list[Unit], torch.Tensor]] = {}
        todo = [(removed, u) for removed, _ in members for u in problem.candidates if u not in removed]
        done = 0
        for removed, _ in members:
            engine.rebase(problem.plan(removed))
            for unit in problem.candidates:
                if unit in removed:
                    continue
                key = frozenset([*removed, unit])
                if key not in scored:
                    scored[key] = ([*removed, unit], engine.score(problem.plan([*removed, unit])))
                done += 1
                progress(f"step {len(steps) + 1}: {len(removed) + 1} removed", done, len(todo))
        if not scored:
            break
        ranked = sorted(scored.values(), key=lambda item: float(item[1].sum()))
        members = ranked[:beam]
        steps.append(_step(problem, ranked, start))
    engine.rebase(problem.plan(members[0][0]))
    return steps


def last(problem: Problem, progress: Progress = lambda *a: None) -> list[Step]:
    """Remove the deepest removable units first; each step's plan is scored for the record."""
    engine, start = problem.engine, time.perf_counter()
    removed: list[Unit] = []
    steps: list[Step] = []
    for unit in reversed(problem.candidates):
        if _done(problem, removed):
            break
        removed = [*removed, unit]
        scores = engine.rebase(problem.plan(removed))
        steps.append(_step(problem, [(removed, scores)], start))
        progress("removing the deepest units", len(removed), len(problem.candidates))
    return steps


def _done(problem: Problem, removed: list[Unit]) -> bool:
    return (problem.budget.met(len(removed), problem.kept(removed), problem.total_params)
            or len(removed) >= len(problem.candidates))


def _step(problem: Problem, ranked: list[tuple[list[Unit], torch.Tensor]], start: float) -> Step:
    removed, scores = ranked[0]
    runner_up = margin = None
    if len(ranked) > 1:
        other, other_scores = ranked[1]
        runner_up = {"removed": other[-1], "objective": problem.per_token(other_scores)}
        diff = (other_scores - scores).numpy()
        rng = np.random.default_rng(problem.seed)
        draws = rng.integers(0, len(diff), size=(BOOTSTRAP, len(diff)))
        boot = diff[draws].sum(axis=1) / problem.engine.positions
        margin = [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))]
    return Step(list(removed), problem.per_token(scores), runner_up, margin, problem.engine.block_passes,
                time.perf_counter() - start, problem.kept(removed))
