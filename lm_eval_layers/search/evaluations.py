"""Every candidate a search scores, by its removal set: computed once on an engine, kept in a
`Store` (the one `surgery score` keeps its coalitions in), so a killed search resumes without
re-running what it already measured, and a method that meets a set twice runs it once.

A removal set is keyed in stack order ("3,7", "attn.4,mlp.4"; "" is the full model), prefixed by
the windows it was scored on ("full:" or "screen4:"), so screening scores never stand in for full
ones. The store's context (model files, calibration, objective, dtype, unit) is the caller's.
The engine is re-based to a candidate's reference only when the candidate must be computed: a
resumed search whose candidates are all stored runs no block beyond the engines' own start (none
on calibration text; the full model's pass over the prepared requests for a task objective).

Under `torchrun` (`distributed.py`), `score_all` splits the sets a step needs and has not
stored across the processes (every W-th; each holds a replica of the model and its own engine);
every process then receives every score from rank 0, so all take the same decision, and rank
0's store keeps them. Block passes count the split work of every process; what each process
repeats (the full model's pass, the rankings of `last`, `bi`, `angular` and `scores:FILE`, which
do not split) is counted once.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from lm_eval_layers import distributed
from lm_eval_layers.importance.store import Store
from lm_eval_layers.plan import LayerPlan
from lm_eval_layers.search.engine import CalibrationEngine
from lm_eval_layers.search.removable import Unit, block_of


def set_key(removed: Iterable[Unit]) -> str:
    """A removal set in stack order, whatever order it was removed in."""
    return ",".join(str(u) for u in sorted(set(removed), key=lambda u: (block_of(u), str(u))))


class Evaluations:
    """Per-window scores of removal sets on `engine`, stored under `name`."""

    def __init__(self, engine: CalibrationEngine, plan: Callable[[list[Unit]], LayerPlan], store: Store | None = None,
                 name: str = "full") -> None:
        self.engine, self.plan, self.name = engine, plan, name
        self.store = store if store is not None else Store(None, {})
        self.computed = 0  # sets run on the engines (of every process, on rank 0) in this run
        self.stored = 0  # sets read back from the store, written there by an earlier run
        self._here: set[str] = set()  # keys computed or read back in this process (counted once)

    def score(self, removed: list[Unit], reference: list[Unit] | None = None) -> torch.Tensor:
        """The scores of `removed`; computed, if not stored, from the engine re-based to
        `reference` (the set it differs from least; `removed` itself re-bases to it)."""
        key = self._key(removed)
        hit = self.store.get(key)
        if hit is not None:
            self.stored += key not in self._here
            self._here.add(key)
            return torch.tensor(hit["window"], dtype=torch.float64)
        return self._keep(key, self._compute(removed, reference))

    def score_all(self, items: list[tuple[list[Unit], list[Unit] | None]],
                  progress: Callable[[int], None] = lambda done: None) -> list[torch.Tensor]:
        """The scores of many (set, reference) pairs, in order, split across the processes of a
        distributed run; `progress(done)` on rank 0."""
        rank, world = distributed.current()
        if world == 1:
            out = []
            for done, (removed, reference) in enumerate(items, 1):
                out.append(self.score(removed, reference))
                progress(done)
            return out
        keys = [self._key(removed) for removed, _ in items]
        missing: list[int] | None = None
        if rank == 0:
            missing = [i for i, key in enumerate(keys) if key not in keys[:i] and self.store.get(key) is None]
        missing = distributed.broadcast(missing, world)  # rank 0's store decides what is computed
        before, computed, done = self.engine.block_passes, {}, [len(items) - len(missing)]

        def compute(i: int) -> tuple[list[float], float]:
            passes = self.engine.block_passes
            return [float(x) for x in self._compute(*items[i]).double()], self.engine.block_passes - passes

        def advanced(count: int) -> None:
            done[0] += count
            progress(done[0])

        distributed.evaluate_shared(missing, compute, computed.__setitem__, rank, world, advanced)
        computed = distributed.broadcast(computed, world)
        self.engine.block_passes = before + sum(passes for _, passes in computed.values())
        if rank == 0:
            for i, (window, _) in computed.items():
                self._keep(keys[i], torch.tensor(window, dtype=torch.float64))
        windows = distributed.broadcast([[float(x) for x in self.score(*item)] for item in items] if rank == 0 else None, world)
        if rank != 0:  # this process's in-memory store answers later calls for these sets
            for key, window in zip(keys, windows):
                self.store.put(key, {"window": window})
        return [torch.tensor(window, dtype=torch.float64) for window in windows]

    def _key(self, removed: list[Unit]) -> str:
        return f"{self.name}:{set_key(removed)}"

    def _compute(self, removed: list[Unit], reference: list[Unit] | None) -> torch.Tensor:
        if not removed:
            return self.engine.full_scores
        if reference is not None and set_key(reference) == set_key(removed):
            return self.engine.rebase(self.plan(removed))
        if reference is not None:
            self.engine.start_from(self.plan(reference))
        return self.engine.score(self.plan(removed))

    def _keep(self, key: str, scores: torch.Tensor) -> torch.Tensor:
        self.store.put(key, {"window": [float(x) for x in scores.double()]})
        self.computed += 1
        self._here.add(key)
        return scores.double().cpu()

    @property
    def count(self) -> int:
        return self.computed + self.stored
