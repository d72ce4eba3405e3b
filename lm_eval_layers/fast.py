"""Fast repeated evaluation of many variants of one loaded model on the same requests.

lm-eval builds the documents and requests once and they are tokenised once, exactly as the
`hf` model tokenises them. Each variant then runs only what it needs:
- logits only at continuation positions (`logits_to_keep`), not the full vocabulary everywhere;
- prefix reuse: the full model's hidden states at block boundaries are cached (within a memory
  budget), so a variant starts at its first slot that differs from the full model, e.g. leaving
  out block k computes only the blocks after k;
- each context computed once per document (its choices run on top of its KV cache), and only
  contexts of equal length batched together, so no context is padded.
Results go through each task's own `process_results`, so metrics are lm-eval's.
Supports `loglikelihood` and `multiple_choice` tasks (not `loglikelihood_rolling` or generation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.tasks import TaskManager, get_task_dict

from lm_eval_layers.arch import layout_for
from lm_eval_layers.importance.value import example_scores
from lm_eval_layers.plan import LayerPlan, Slot
from lm_eval_layers.variant import apply_plan

SUPPORTED = ("loglikelihood", "multiple_choice")


class UnsupportedTask(ValueError):
    """A task the fast path cannot score (rolling log-likelihood or generation)."""


@dataclass
class Request:
    task: str
    doc_id: int
    idx: int
    ctx: tuple[int, ...]  # context as the model sees it (left-truncated like `hf` when too long)
    cont: list[int]


@dataclass
class Batch:
    """Documents whose contexts have the same length: each context is run once, then all the
    documents' continuations run on top of the contexts' KV caches."""

    contexts: list[tuple[int, ...]]
    rows: list[int]  # request indices
    group: list[int]  # for each row, the index of its context in `contexts`


def _leaves(task_dict: dict) -> dict[str, Any]:
    out = {}
    for name, value in task_dict.items():
        if isinstance(value, dict):
            out.update(_leaves(value))
        else:
            out[getattr(name, "group_name", name) if not isinstance(name, str) else name] = value
    return out


class PreparedTasks:
    """The requests of a task set, built by lm-eval once and tokenised like `hf` does."""

    def __init__(self, lm: Any, tasks: list[str], task_manager: TaskManager, limit: int | None,
                 batch_size: int = 64, max_batch_tokens: int = 8192) -> None:
        self.tasks = _leaves(get_task_dict(tasks, task_manager))
        self.docs: dict[str, dict[int, dict]] = {}
        self.requests: list[Request] = []
        for name, task in self.tasks.items():
            if task.OUTPUT_TYPE not in SUPPORTED:
                raise UnsupportedTask(f"task {name} is {task.OUTPUT_TYPE}; the fast path scores loglikelihood and multiple_choice tasks")
            task.build_all_requests(limit=limit, rank=0, world_size=1)
            self.docs[name] = {}
            for inst in task.instances:
                self.docs[name][inst.doc_id] = inst.doc
                context, continuation = inst.args
                ctx, cont = self._encode(lm, context, continuation)
                whole = (ctx + cont)[-(lm.max_length + 1):]
                self.requests.append(Request(name, inst.doc_id, inst.idx, tuple(whole[: len(whole) - len(cont)]), cont))
        # Requests sharing a context (the choices of a document) share its computation; contexts of
        # equal length are batched together, so no context is padded and positions stay exact.
        by_context: dict[tuple[int, ...], list[int]] = {}
        for i, r in enumerate(self.requests):
            by_context.setdefault(r.ctx, []).append(i)
        by_length: dict[int, list[tuple[int, ...]]] = {}
        for ctx in by_context:
            by_length.setdefault(len(ctx), []).append(ctx)
        self.batches: list[Batch] = []
        for length in sorted(by_length, reverse=True):
            batch: Batch | None = None
            for ctx in by_length[length]:
                rows = by_context[ctx]
                width = length + max(len(self.requests[i].cont) for i in rows)
                if batch is None or len(batch.rows) + len(rows) > batch_size or (len(batch.rows) + len(rows)) * width > max_batch_tokens:
                    batch = Batch([], [], [])
                    self.batches.append(batch)
                batch.group += [len(batch.contexts)] * len(rows)
                batch.contexts.append(ctx)
                batch.rows += rows

    @staticmethod
    def _encode(lm: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval's own tokenisation of a request (HFLM.loglikelihood)."""
        if context == "":
            cont = lm.tok_encode(continuation)
            return ([lm.prefix_token_id], cont) if lm.prefix_token_id != cont[0] else (cont[:1], cont[1:])
        return lm._encode_pair(context, continuation)


class FastEvaluator:
    """Evaluates variants of `lm`'s model on prepared requests, reusing the full model's prefix."""

    def __init__(self, lm: Any, prepared: PreparedTasks, cache_bytes: int = 4 << 30) -> None:
        self.lm, self.prepared = lm, prepared
        self.model = lm.model
        self.layout = layout_for(self.model)
        self.num_layers = len(self.layout.find_blocks(self.model))
        self.device = self.model.device
        self.boundaries: dict[int, dict[tuple[int, str], torch.Tensor]] = {}  # k -> input of block k, per pass
        self._capture = None
        self._full: list[tuple[float, bool]] | None = None
        self.blocks_run = self.num_layers  # blocks computed by the last variant (prefix reuse shows here)
        self._cache_full_model(cache_bytes)

    # -- model passes -------------------------------------------------------------------------

    def _pass(self, ids: torch.Tensor, key: tuple[int, str], first: int, **kwargs: Any):
        """One forward pass; with `first` > 0 the first block's input is that cached boundary."""
        handle = None
        if first > 0:
            block = self.layout.find_blocks(self.model)[0]
            handle = block.register_forward_pre_hook(_replace_input(self.boundaries[first][key]), with_kwargs=True)
        elif self._capture is not None:
            handle = self._capture(key)
        try:
            return self.model(ids.to(self.device), **kwargs)
        finally:
            if handle is not None:
                for h in handle if isinstance(handle, list) else [handle]:
                    h.remove()

    @torch.no_grad()
    def _run(self, first: int = 0) -> list[tuple[float, bool]]:
        """All requests through the current model: each batch's contexts once, then every
        continuation on top of its context's KV cache (only where it has more than one token)."""
        results: list[tuple[float, bool] | None] = [None] * len(self.prepared.requests)
        for b, batch in enumerate(self.prepared.batches):
            reqs = [self.prepared.requests[i] for i in batch.rows]
            out = self._pass(torch.tensor(batch.contexts), (b, "ctx"), first, use_cache=True, logits_to_keep=1)
            rows = [reqs[k].cont[:-1] for k in range(len(reqs))]
            cont_logits = None
            width = max(len(r) for r in rows)
            if width:
                ids = torch.zeros(len(rows), width, dtype=torch.long)
                for k, r in enumerate(rows):
                    ids[k, : len(r)] = torch.tensor(r, dtype=torch.long)
                cache = out.past_key_values
                cache.reorder_cache(torch.tensor(batch.group, device=self.device))
                cont_logits = self._pass(ids, (b, "cont"), first, past_key_values=cache, use_cache=True).logits
            for k, (i, r) in enumerate(zip(batch.rows, reqs)):
                parts = [out.logits[batch.group[k], -1:]]
                if len(r.cont) > 1:
                    parts.append(cont_logits[k, : len(r.cont) - 1])
                results[i] = self._score(torch.cat(parts), r.cont)
        return results  # type: ignore[return-value]

    def _score(self, logits: torch.Tensor, cont: list[int]) -> tuple[float, bool]:
        """(sum of continuation log-probs, all greedy), as HFLM computes them."""
        lp = F.log_softmax(logits, dim=-1, dtype=self.lm.softmax_dtype)
        target = torch.tensor(cont, device=lp.device)
        return float(lp.gather(1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all())

    @torch.no_grad()
    def _cache_full_model(self, budget: int) -> None:
        blocks = self.layout.find_blocks(self.model)
        tokens = sum(len(b.contexts) * len(b.contexts[0]) + len(b.rows) * max(len(self.prepared.requests[i].cont) for i in b.rows)
                     for b in self.prepared.batches)
        per_boundary = tokens * self.model.config.hidden_size * next(self.model.parameters()).element_size()
        count = min(self.num_layers - 1, budget // max(per_boundary, 1))
        self.boundaries = {k: {} for k in range(1, count + 1)}

        def capture(key: tuple[int, str]) -> list:
            return [blocks[k].register_forward_pre_hook(_capture(self.boundaries[k], key), with_kwargs=True)
                    for k in self.boundaries]

        self._capture = capture
        try:
            self._full = self._run()
        finally:
            self._capture = None

    # -- variants -----------------------------------------------------------------------------

    def loglikelihoods(self, plan: LayerPlan) -> list[tuple[float, bool]]:
        """(log-likelihood, is_greedy) of every prepared request under the plan's variant."""
        if plan.is_identity:
            assert self._full is not None
            self.blocks_run = 0
            return list(self._full)
        prefix = 0
        while prefix < len(plan.slots) - 1 and plan.slots[prefix] == Slot((prefix,)) and prefix + 1 in self.boundaries:
            prefix += 1
        rest = LayerPlan(plan.num_layers, plan.slots[prefix:])
        self.blocks_run = len(rest.slots)
        with apply_plan(self.model, rest):
            return self._run(first=prefix)

    def evaluate(self, plan: LayerPlan) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, list[float]]]]:
        """lm-eval's metrics per task (means) and every example's scores, for one variant."""
        results = self.loglikelihoods(plan)
        by_doc: dict[tuple[str, int], list[tuple[int, tuple[float, bool]]]] = {}
        for req, res in zip(self.prepared.requests, results):
            by_doc.setdefault((req.task, req.doc_id), []).append((req.idx, res))
        metrics: dict[str, dict[str, float]] = {}
        examples: dict[str, dict[str, list[float]]] = {}
        for name, task in self.prepared.tasks.items():
            rows = []
            for doc_id in sorted(self.prepared.docs[name]):
                doc = self.prepared.docs[name][doc_id]
                resps = [res for _, res in sorted(by_doc[(name, doc_id)])]
                scores = {k: float(v) for k, v in task.process_results(doc, resps).items() if isinstance(v, (int, float, bool))}
                rows.append({**scores, **example_scores({**scores, "filtered_resps": resps}, _gold(task, doc))})
            keys = [k for k in rows[0] if all(k in r for r in rows)]
            examples[name] = {k: [r[k] for r in rows] for k in keys}
            metrics[name] = {k: sum(v) / len(v) for k, v in examples[name].items()}
        return metrics, examples


def _gold(task: Any, doc: dict) -> int | None:
    """The index of the right answer, as lm-eval's multiple_choice scoring finds it."""
    if task.OUTPUT_TYPE != "multiple_choice":
        return None
    target = task.doc_to_target(doc)
    if isinstance(target, str):
        choices = task.doc_to_choice(doc)
        target = choices.index(target) if target in choices else int(target) if target.isdigit() else None
    return target if isinstance(target, int) else None


def _capture(store: dict, key: tuple[int, str]):
    def hook(_module, args, kwargs):
        store[key] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

    return hook


def _replace_input(cached: torch.Tensor):
    def hook(_module, args, kwargs):
        if args:
            return (cached, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": cached}

    return hook
