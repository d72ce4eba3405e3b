"""`--method evolve`: EvoPress-style evolutionary search over removal sets (Sieberling et al.,
"EvoPress: Towards Optimal Dynamic Model Compression via Evolutionary Search").

Each generation draws `offspring` children of the current best set, each one mutation away
from it: one removed unit swapped for a kept, unprotected one, the child still meeting the
budget. Selection is multi-stage: every child is screened on the first few calibration windows
(a second engine on those windows, so a screen costs their share of a block pass), the
`survivors` best are scored on the full calibration set, and the best of them and the parent
becomes the parent (a tie keeps the parent). Elitism makes the result never worse than the
starting set on the full objective.

The starting set is what `last` removes (the deepest units that meet the budget): it costs one
evaluation and no search, works for blocks, halves and --params budgets alike, and "Reassessing
Layer Pruning in LLMs" finds it a strong plan on its own, so the search starts near a good one
rather than spending its bounded evaluations climbing out of a random set. (Starting from
greedy would cost more than the whole evolution; `bi` ranks whole blocks only.)

Bounds: at most `generations` generations, each scoring at most `offspring` children on the
screening windows and `survivors` on the full set, so at most 1 + generations × (offspring +
survivors) evaluations; a set is never drawn twice, and the search ends early when every swap
of the parent has been drawn. Children are drawn with numpy's generator seeded by --seed from a
list in stack order, so a seed gives one result.
"""

from __future__ import annotations

import time

import numpy as np

from lm_eval_layers.search.evaluations import set_key
from lm_eval_layers.search.methods import Problem, Progress, Step, _done, margin_interval
from lm_eval_layers.search.removable import Unit, block_of


def stack_order(units: list[Unit]) -> list[Unit]:
    return sorted(units, key=lambda u: (block_of(u), str(u)))


def start_set(problem: Problem) -> list[Unit]:
    """The deepest removable units that meet the budget (what `last` removes)."""
    removed: list[Unit] = []
    for unit in reversed(problem.candidates):
        if _done(problem, removed):
            break
        removed.append(unit)
    return stack_order(removed)


def swaps(problem: Problem, parent: list[Unit]) -> list[list[Unit]]:
    """Every set one swap away from `parent` that still meets the budget, in stack order."""
    kept = [u for u in problem.candidates if u not in parent]
    out = []
    for gone in parent:
        for back in kept:
            child = stack_order([u for u in parent if u != gone] + [back])
            if problem.budget.met(len(child), problem.kept(child), problem.total_params):
                out.append(child)
    return out


def evolve(problem: Problem, generations: int, offspring: int, survivors: int,
           progress: Progress = lambda *a: None) -> list[Step]:
    """One step for the starting set (generation 0), then one per generation: its best set so far."""
    full = problem.evaluations
    screen = problem.screening or full
    start, rng = time.perf_counter(), np.random.default_rng(problem.seed)
    parent = start_set(problem)
    (parent_scores,) = full.score_all([(parent, parent)])  # under torchrun: rank 0's, on every rank
    seen, evaluated = {set_key(parent)}, 1
    steps = [Step(parent, problem.per_token(parent_scores), None, None, problem.block_passes,
                  time.perf_counter() - start, problem.kept(parent), generation=0, evaluations=evaluated)]
    for generation in range(1, generations + 1):
        pool = [c for c in swaps(problem, parent) if set_key(c) not in seen]
        if not pool:
            break
        picks = sorted(rng.choice(len(pool), size=min(offspring, len(pool)), replace=False).tolist())
        children = [pool[i] for i in picks]
        seen.update(set_key(c) for c in children)
        what = f"generation {generation}/{generations}: screening"
        screened = list(zip(children, screen.score_all([(c, parent) for c in children],
                                                        lambda done: progress(what, done, len(children)))))
        evaluated += len(children)
        best = sorted(screened, key=lambda item: (float(item[1].sum()), set_key(item[0])))[:survivors]
        if screen is not full:
            best = list(zip([c for c, _ in best], full.score_all([(c, parent) for c, _ in best])))
            evaluated += len(best)
        ranked = sorted([(parent, parent_scores, 0)] + [(c, s, 1) for c, s in best],
                        key=lambda item: (float(item[1].sum()), item[2], set_key(item[0])))
        (parent, parent_scores, _), (other, other_scores, _) = ranked[0], ranked[1]
        runner_up = {"removed": other, "objective": problem.per_token(other_scores)}
        steps.append(Step(parent, problem.per_token(parent_scores), runner_up,
                          margin_interval(problem, parent_scores, other_scores), problem.block_passes,
                          time.perf_counter() - start, problem.kept(parent), generation=generation,
                          evaluations=evaluated))
        progress(f"generation {generation}/{generations}: best {steps[-1].objective:.4f}", generation, generations)
    return steps


def evaluation_bound(generations: int, offspring: int, survivors: int) -> int:
    """The most evaluations `evolve` runs (screening and full)."""
    return 1 + generations * (offspring + survivors)

