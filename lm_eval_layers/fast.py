"""Fast repeated evaluation of many variants of one loaded model on the same requests.

lm-eval builds the documents and requests once and they are tokenised once, exactly as the
`hf` model tokenises them. Each variant then runs only what it needs:
- logits only at continuation positions (`logits_to_keep`), not the full vocabulary everywhere;
- prefix reuse: the full model's hidden states at block boundaries are cached (within a memory
  budget), so a variant starts at its first slot that differs from the full model, e.g. leaving
  out block k computes only the blocks after k;
- batches of similar length, so little padding is computed.
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
    tokens: list[int]  # model input: (context + continuation)[-(max_length + 1):][:-1]
    cont: list[int]


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
                 batch_size: int = 32, max_batch_tokens: int = 8192) -> None:
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
                self.requests.append(Request(name, inst.doc_id, inst.idx, (ctx + cont)[-(lm.max_length + 1):][:-1], cont))
        # Rows whose continuations start at the same position share a batch (the choices of one
        # document do), so the logits kept per batch are about the continuations alone.
        def start(i: int) -> int:
            return len(self.requests[i].tokens) - len(self.requests[i].cont)

        order = sorted(range(len(self.requests)), key=lambda i: (-start(i), -len(self.requests[i].tokens)))
        self.batches: list[list[int]] = []
        for i in order:
            batch = self.batches[-1] if self.batches else []
            width = max((len(self.requests[j].tokens) for j in batch), default=0)
            if batch and len(batch) < batch_size and (len(batch) + 1) * max(width, len(self.requests[i].tokens)) <= max_batch_tokens:
                batch.append(i)
            else:
                self.batches.append([i])

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
        self.boundaries: dict[int, list[torch.Tensor]] = {}  # k -> input of block k, per batch
        self._full: list[tuple[float, bool]] | None = None
        self.blocks_run = self.num_layers  # blocks computed by the last variant (prefix reuse shows here)
        self._cache_full_model(cache_bytes)

    # -- model passes -------------------------------------------------------------------------

    def _batch(self, b: int) -> tuple[torch.Tensor, list[Request], torch.Tensor]:
        reqs = [self.prepared.requests[i] for i in self.prepared.batches[b]]
        width = max(len(r.tokens) for r in reqs)
        ids = torch.zeros(len(reqs), width, dtype=torch.long)
        for row, r in enumerate(reqs):
            ids[row, : len(r.tokens)] = torch.tensor(r.tokens)
        start = min(len(r.tokens) - len(r.cont) for r in reqs)
        keep = torch.arange(start, width)
        return ids.to(self.device), reqs, keep

    def _score(self, logits: torch.Tensor, reqs: list[Request], keep: torch.Tensor) -> list[tuple[float, bool]]:
        """(sum of continuation log-probs, all greedy) per request, as HFLM computes them; the
        softmax runs only over the continuation positions."""
        start = int(keep[0])
        rows = [logits[row, len(r.tokens) - start - len(r.cont): len(r.tokens) - start] for row, r in enumerate(reqs)]
        logprobs = F.log_softmax(torch.cat(rows), dim=-1, dtype=self.lm.softmax_dtype)
        out = []
        offset = 0
        for r in reqs:
            lp = logprobs[offset: offset + len(r.cont)]
            offset += len(r.cont)
            cont = torch.tensor(r.cont, device=lp.device)
            greedy = bool((lp.argmax(-1) == cont).all())
            out.append((float(lp.gather(1, cont[:, None]).sum()), greedy))
        return out

    @torch.no_grad()
    def _run(self, first: int = 0) -> list[tuple[float, bool]]:
        """All requests through the current model; the first block's input is the cached
        boundary `first` when `first` > 0 (its earlier blocks are not in the model)."""
        results: list[tuple[float, bool] | None] = [None] * len(self.prepared.requests)
        for b in range(len(self.prepared.batches)):
            ids, reqs, keep = self._batch(b)
            handle = None
            if first > 0:
                cached = self.boundaries[first][b]
                block = self.layout.find_blocks(self.model)[0]
                handle = block.register_forward_pre_hook(_replace_input(cached), with_kwargs=True)
            try:
                logits = self.model(ids, logits_to_keep=keep.to(self.device)).logits
            finally:
                if handle is not None:
                    handle.remove()
            for i, res in zip(self.prepared.batches[b], self._score(logits, reqs, keep)):
                results[i] = res
        return results  # type: ignore[return-value]

    @torch.no_grad()
    def _cache_full_model(self, budget: int) -> None:
        blocks = self.layout.find_blocks(self.model)
        per_boundary = sum(
            len(batch) * max(len(self.prepared.requests[i].tokens) for i in batch) for batch in self.prepared.batches
        ) * self.model.config.hidden_size * next(self.model.parameters()).element_size()
        count = min(self.num_layers - 1, budget // max(per_boundary, 1))
        wanted = range(1, count + 1)
        self.boundaries = {k: [] for k in wanted}
        handles = [blocks[k].register_forward_pre_hook(_capture(self.boundaries[k]), with_kwargs=True) for k in wanted]
        try:
            self._full = self._run()
        finally:
            for h in handles:
                h.remove()

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


def _capture(store: list[torch.Tensor]):
    def hook(_module, args, kwargs):
        store.append((args[0] if args else kwargs["hidden_states"]).detach().clone())

    return hook


def _replace_input(cached: torch.Tensor):
    def hook(_module, args, kwargs):
        if args:
            return (cached, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": cached}

    return hook
