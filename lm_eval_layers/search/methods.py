"""Search methods over removal sets, all on one `CalibrationEngine` and one budget.

- `greedy` (SLEB; BlockPruner with `--unit halves`): at each step remove the unit whose removal
  scores best, re-scoring every remaining unit after each removal.
- `beam:B`: keep the B best removal sets per step (greedy is B = 1).
- `last` ("Reassessing Layer Pruning in LLMs"): remove the deepest units.
- `bi` (ShortGPT): remove blocks in order of block influence, lowest first.
- `scores:FILE`: remove units in the order of a `surgery score` ranking, lowest value first.
- `angular` (Gromov et al., "The Unreasonable Ineffectiveness of the Deeper Layers"): remove the
  contiguous run of n blocks whose input and output are closest in angular distance at the last
  token, d(l, n) = E_windows[arccos(cos(h_l, h_{l+n})) / π], the smallest n that meets the budget.
- `evolve` (EvoPress): mutate a removal set, keep the best (`evolve.py`).
Every method stops when the budget is met or no unit is left to remove, so each loop is bounded
by the number of units. Candidates are scored through `Evaluations`: each set once, stored.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from lm_eval_layers.importance.store import Store
from lm_eval_layers.plan import LayerPlan
from lm_eval_layers.search.engine import CalibrationEngine
from lm_eval_layers.search.evaluations import Evaluations
from lm_eval_layers.search.removable import Unit, plan_without

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
    runner_up: dict | None  # {"removed": unit (a set for evolve), "objective": x}: the best other choice at this step
    margin_ci: list[float] | None  # 95% bootstrap interval over windows of runner-up − chosen
    block_passes: float  # cumulative
    seconds: float  # cumulative
    params: int  # kept
    generation: int | None = None  # evolve: the generation whose best set this is (0: the starting set)
    evaluations: int | None = None  # evolve: candidates scored so far (screening and full)


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
    store: Store | None = None  # None: the evaluations are kept in memory, for this problem
    screen_engine: CalibrationEngine | None = None  # evolve's screening windows (a prefix of the engine's)
    evaluations: Evaluations = field(init=False)
    screening: Evaluations | None = field(init=False)

    def __post_init__(self) -> None:
        store = self.store if self.store is not None else Store(None, {})
        object.__setattr__(self, "evaluations", Evaluations(self.engine, self.plan, store, "full"))
        screen = self.screen_engine
        object.__setattr__(self, "screening", None if screen is None else
                           Evaluations(screen, self.plan, store, f"screen{screen.windows}"))

    @property
    def block_passes(self) -> float:
        """Block passes so far; a pass over the screening windows counts as their share of the windows."""
        screen = self.screen_engine
        extra = 0.0 if screen is None else screen.block_passes * screen.windows / self.engine.windows
        return self.engine.block_passes + extra

    def plan(self, removed: list[Unit]) -> LayerPlan:
        return plan_without(self.engine.num_layers, removed, self.model_type)

    def kept(self, removed: list[Unit]) -> int:
        return self.total_params - sum(self.sizes[u] for u in removed)

    def per_token(self, scores: torch.Tensor) -> float:
        return float(scores.sum()) / self.engine.positions


Progress = Callable[[str, int, int], None]  # (what, done, total)


def greedy(problem: Problem, beam: int = 1, progress: Progress = lambda *a: None) -> list[Step]:
    """Greedy (beam = 1) or beam search; each step keeps the `beam` best distinct removal sets."""
    evaluations, start = problem.evaluations, time.perf_counter()
    members: list[tuple[list[Unit], torch.Tensor]] = [([], evaluations.score([]))]
    steps: list[Step] = []
    while not _done(problem, members[0][0]):
        todo: dict[frozenset, tuple[list[Unit], list[Unit]]] = {}
        for removed, _ in members:
            for unit in problem.candidates:
                if unit not in removed:
                    todo.setdefault(frozenset([*removed, unit]), ([*removed, unit], removed))
        what = f"step {len(steps) + 1}: {len(members[0][0]) + 1} removed"
        results = evaluations.score_all(list(todo.values()), lambda done: progress(what, done, len(todo)))
        scored = [(removed, scores) for (removed, _), scores in zip(todo.values(), results)]
        if not scored:
            break
        ranked = sorted(scored, key=lambda item: float(item[1].sum()))
        members = ranked[:beam]
        steps.append(_step(problem, ranked, start))
    return steps


def last(problem: Problem, progress: Progress = lambda *a: None) -> list[Step]:
    """Remove the deepest removable units first."""
    return ranked(problem, list(reversed(problem.candidates)), progress)


def ranked(problem: Problem, order: list[Unit], progress: Progress = lambda *a: None) -> list[Step]:
    """Remove units in the given order until the budget is met; each step's plan is scored."""
    start = time.perf_counter()
    removed: list[Unit] = []
    steps: list[Step] = []
    for unit in order:
        if _done(problem, removed):
            break
        removed = [*removed, unit]
        scores = problem.evaluations.score(removed, reference=removed)
        steps.append(_step(problem, [(removed, scores)], start))
        progress(f"removing in ranked order: {unit}", len(removed), len(order))
    return steps


def block_influence_order(problem: Problem) -> list[Unit]:
    """Removable blocks by ShortGPT's block influence on the calibration windows, lowest first."""
    from lm_eval_layers.similarity import block_similarity

    bi = block_similarity(problem.engine.model, problem.engine.batches)["bi"]
    problem.engine.calibration_pass()
    return sorted(problem.candidates, key=lambda u: (bi[int(u)], int(u)))


def scores_order(problem: Problem, values: tuple[float, ...]) -> list[Unit]:
    """Removable units by a scores file's values (in the units' stack order), lowest first."""
    from lm_eval_layers.search.removable import all_units

    index = {u: i for i, u in enumerate(all_units(problem.engine.num_layers, isinstance(problem.candidates[0], str)))}
    return sorted(problem.candidates, key=lambda u: (values[index[u]], index[u]))


def angular(problem: Problem, progress: Progress = lambda *a: None) -> list[Step]:
    """Gromov et al.'s contiguous run: one full pass records each block's input (and the last
    block's output) at the last token; the closest run of the smallest length that meets the
    budget is removed in one step."""
    engine, start = problem.engine, time.perf_counter()
    states = _last_token_states(engine)  # [L + 1, windows, d]: h_0 … h_L
    engine.calibration_pass()
    removable = set(problem.candidates)
    for n in range(1, len(problem.candidates) + 1):
        runs = [list(range(l, l + n)) for l in range(engine.num_layers - n + 1) if removable.issuperset(range(l, l + n))]
        runs = [r for r in runs if problem.budget.met(n, problem.kept(r), problem.total_params)]
        if runs:
            cos = torch.stack([torch.nn.functional.cosine_similarity(states[r[0]], states[r[-1] + 1], dim=-1) for r in runs])
            distance = (torch.arccos(cos.clamp(-1, 1)) / torch.pi).mean(-1)
            best = runs[int(distance.argmin())]
            progress("angular distance of contiguous runs", 1, 1)
            return [_step(problem, [(best, problem.evaluations.score(best, reference=best))], start)]
    return []


def _last_token_states(engine: CalibrationEngine) -> torch.Tensor:
    from lm_eval_layers.hooks import block_input, pre_hooks

    blocks = engine.layout.find_blocks(engine.model)
    rows: list[list[torch.Tensor]] = [[] for _ in range(engine.num_layers + 1)]

    def pre(k: int):
        def hook(_m, args, kwargs):
            rows[k].append(block_input(args, kwargs)[:, -1].float())
        return hook

    def post(_m, _args, _kwargs, out):
        rows[-1].append((out[0] if isinstance(out, tuple) else out)[:, -1].float())

    handle = blocks[-1].register_forward_hook(post, with_kwargs=True)
    try:
        with pre_hooks([(block, pre(k)) for k, block in enumerate(blocks)]):
            for ids in engine.batches:
                engine.model(input_ids=ids, use_cache=False)
    finally:
        handle.remove()
    return torch.stack([torch.cat(r) for r in rows])


def _done(problem: Problem, removed: list[Unit]) -> bool:
    return (problem.budget.met(len(removed), problem.kept(removed), problem.total_params)
            or len(removed) >= len(problem.candidates))


def _step(problem: Problem, ranked: list[tuple[list[Unit], torch.Tensor]], start: float) -> Step:
    removed, scores = ranked[0]
    runner_up = margin = None
    if len(ranked) > 1:
        other, other_scores = ranked[1]
        runner_up = {"removed": other[-1], "objective": problem.per_token(other_scores)}
        margin = margin_interval(problem, scores, other_scores)
    return Step(list(removed), problem.per_token(scores), runner_up, margin, problem.block_passes,
                time.perf_counter() - start, problem.kept(removed))


def margin_interval(problem: Problem, scores: torch.Tensor, other: torch.Tensor) -> list[float]:
    """95% bootstrap interval over windows of the per-token margin other − chosen."""
    diff = (other - scores).numpy()
    rng = np.random.default_rng(problem.seed)
    draws = rng.integers(0, len(diff), size=(BOOTSTRAP, len(diff)))
    boot = diff[draws].sum(axis=1) / problem.engine.positions
    return [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))]
