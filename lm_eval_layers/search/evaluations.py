"""Every candidate a search scores, by its removal set: computed once on an engine, kept in a
`Store` (the one `surgery score` keeps its coalitions in), so a killed search resumes without
re-running what it already measured, and a method that meets a set twice runs it once.

A removal set is keyed in stack order ("3,7", "attn.4,mlp.4"; "" is the full model), prefixed by
the windows it was scored on ("full:" or "screen4:"), so screening scores never stand in for full
ones. The store's context (model files, calibration, objective, dtype, unit) is the caller's.
The engine is re-based to a candidate's reference only when the candidate must be computed: a
resumed search whose candidates are all stored runs no block at all.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from lm_eval_layers.importance.store import Store
from lm_eval_layers.plan import LayerPlan
from lm_eval_layers.search.engine import CalibrationEngine
from lm_eval_layers.search.units import Unit, block_of


def set_key(removed: Iterable[Unit]) -> str:
    """A removal set in stack order, whatever order it was removed in."""
    return ",".join(str(u) for u in sorted(set(removed), key=lambda u: (block_of(u), str(u))))


class Evaluations:
    """Per-window scores of removal sets on `engine`, stored under `name`."""

    def __init__(self, engine: CalibrationEngine, plan: Callable[[list[Unit]], LayerPlan], store: Store | None = None,
                 name: str = "full") -> None:
        self.engine, self.plan, self.name = engine, plan, name
        self.store = store if store is not None else Store(None, {})
        self.computed = 0  # sets run on the engine in this process
        self.stored = 0  # sets read back from the store, written there by an earlier run
        self._here: set[str] = set()  # keys computed or read back in this process (counted once)

    def score(self, removed: list[Unit], reference: list[Unit] | None = None) -> torch.Tensor:
        """The scores of `removed`; computed, if not stored, from the engine re-based to
        `reference` (the set it differs from least; `removed` itself re-bases to it)."""
        key = f"{self.name}:{set_key(removed)}"
        hit = self.store.get(key)
        if hit is not None:
            self.stored += key not in self._here
            self._here.add(key)
            return torch.tensor(hit["window"], dtype=torch.float64)
        if not removed:
            scores = self.engine.full_scores
        elif reference is not None and set_key(reference) == set_key(removed):
            scores = self.engine.rebase(self.plan(removed))
        else:
            if reference is not None:
                self.engine.rebase(self.plan(reference))
            scores = self.engine.score(self.plan(removed))
        self.store.put(key, {"window": [float(x) for x in scores.double()]})
        self.computed += 1
        self._here.add(key)
        return scores.double().cpu()

    @property
    def count(self) -> int:
        return self.computed + self.stored
