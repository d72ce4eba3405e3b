"""Prepared requests for many variants of one loaded model (the engine behind `evaluate.py`).

Prepared requests are log-likelihood requests batched by shared context (`loglikelihood.py`:
each context computed once, logits only at continuation positions, little padding); the
`layered` plugin prepares each call's requests (`fast=False` switches that off), and here they
are prepared once for every variant: lm-eval builds the documents and requests once and they
are tokenised once, exactly as the `hf` model tokenises them. Each variant then runs
only what it needs: the full model's hidden states at block boundaries are cached (within a
memory budget), so a variant starts at its first slot that differs from the full model, e.g.
leaving out block k computes only the blocks after k.
Supports `loglikelihood` and `multiple_choice` tasks (not `loglikelihood_rolling` or generation).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Iterator

import torch
from lm_eval_layers.arch import layout_for
from lm_eval_layers.compat.harness import encoded_requests
from lm_eval_layers.hooks import pre_hooks, record_input, replace_input
from lm_eval_layers.loglikelihood import Around, Request, attention_window, make_batches, run_batches
from lm_eval_layers.plan import LayerPlan, Slot
from lm_eval_layers.variant import apply_plan

SUPPORTED = ("loglikelihood", "multiple_choice")


class UnsupportedTask(Exception):
    """A task prepared requests cannot score (rolling log-likelihood or generation); the
    evaluator then runs lm-eval's own loop."""


class PreparedRequests:
    """The requests of a task set, built by lm-eval once and tokenised like `hf` does."""

    def __init__(self, lm: Any, tasks: dict[str, Any], limit: int | None, batch_size: int = 64,
                 max_batch_tokens: int = 8192) -> None:
        self.tasks = tasks  # leaf task objects by name
        self.docs: dict[str, dict[int, dict]] = {}
        self.requests: list[Request] = []
        self.keys: list[tuple[str, int, int]] = []  # (task, doc_id, choice index) of each request
        instances = []
        for name, task in self.tasks.items():
            if task.OUTPUT_TYPE not in SUPPORTED:
                raise UnsupportedTask(f"task {name} is {task.OUTPUT_TYPE}; prepared requests score loglikelihood and multiple_choice tasks")
            task.build_all_requests(limit=limit, rank=0, world_size=1)
            self.docs[name] = {inst.doc_id: inst.doc for inst in task.instances}
            instances += task.instances
            self.keys += [(name, inst.doc_id, inst.idx) for inst in task.instances]
        self.requests = [Request.from_tokens(ctx, cont, lm.max_length) for ctx, cont in encoded_requests(lm, instances)]
        self.batches = make_batches(self.requests, batch_size, max_batch_tokens, attention_window(lm.model.config))

    @property
    def tokens(self) -> int:
        """Token positions one pass of the model runs over every batch (shared contexts once)."""
        return sum(b.tensors["ids"].numel() + (b.tensors["ctx"].numel() if b.tensors["ctx"] is not None else 0)
                   for b in self.batches)


class PreparedEngine:
    """Evaluates variants of `lm`'s model on prepared requests, reusing the full model's prefix."""

    def __init__(self, lm: Any, prepared: PreparedRequests, cache_bytes: int = 4 << 30) -> None:
        self.lm, self.prepared = lm, prepared
        self.model = lm.model
        self.layout = layout_for(self.model)
        self.num_layers = len(self.layout.find_blocks(self.model))
        self.boundaries: dict[int, dict[tuple[int, str], torch.Tensor]] = {}  # k -> input of block k, per pass
        self.blocks_run = self.num_layers  # blocks computed by the last variant (prefix reuse shows here)
        self._full = self._cache_full_model(cache_bytes)

    def _run(self, around: Around | None = None) -> list[tuple[float, bool]]:
        return run_batches(self.model, self.prepared.batches, len(self.prepared.requests), self.lm.softmax_dtype, around)

    def _cache_full_model(self, budget: int) -> list[tuple[float, bool]]:
        """The full model's results, recording the inputs of blocks 1..k (as many as fit)."""
        blocks = self.layout.find_blocks(self.model)
        per_boundary = self.prepared.tokens * self.model.config.hidden_size * next(self.model.parameters()).element_size()
        count = min(self.num_layers - 1, budget // max(per_boundary, 1))
        self.boundaries = {k: {} for k in range(1, count + 1)}

        @contextlib.contextmanager
        def capture(b: int, stage: str) -> Iterator[None]:
            with pre_hooks([(blocks[k], record_input(functools.partial(self.boundaries[k].__setitem__, (b, stage))))
                            for k in self.boundaries]):
                yield

        return self._run(capture)

    # -- variants -----------------------------------------------------------------------------

    def loglikelihoods(self, plan: LayerPlan) -> list[tuple[float, bool]]:
        """(log-likelihood, is_greedy) of every prepared request under the plan's variant."""
        if plan.is_identity:
            self.blocks_run = 0
            return list(self._full)
        prefix = 0
        while prefix < len(plan.slots) - 1 and plan.slots[prefix] == Slot((prefix,)) and prefix + 1 in self.boundaries:
            prefix += 1
        rest = LayerPlan(plan.num_layers, plan.slots[prefix:])
        self.blocks_run = len(rest.slots)

        @contextlib.contextmanager
        def resume(b: int, stage: str) -> Iterator[None]:
            first = self.layout.find_blocks(self.model)[0]
            with pre_hooks([(first, replace_input(self.boundaries[prefix][(b, stage)]))]):
                yield

        with apply_plan(self.model, rest):
            return self._run(resume if prefix else None)

    def responses(self, plan: LayerPlan) -> dict[tuple[str, int], list[tuple[float, bool]]]:
        """Each document's (log-likelihood, is_greedy) answers, in choice order, by (task, doc_id)."""
        by_doc: dict[tuple[str, int], list[tuple[int, tuple[float, bool]]]] = {}
        for (task, doc_id, idx), res in zip(self.prepared.keys, self.loglikelihoods(plan)):
            by_doc.setdefault((task, doc_id), []).append((idx, res))
        return {k: [res for _, res in sorted(v)] for k, v in by_doc.items()}
