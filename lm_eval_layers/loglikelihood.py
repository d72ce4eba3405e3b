"""Log-likelihoods of (context, continuation) token requests, each context computed once.

The `hf` model runs every request as one sequence, so a 4-choice question computes its context
four times. Here the distinct contexts of a batch run once (all but their last token), their KV
cache is expanded to one row per request, and a second pass runs each request's last context
token plus its continuation on top; logits exist only at those positions. Contexts of different
lengths share a batch right-padded, with the padding masked and explicit position ids, so every
token sees exactly what it sees alone. Where a sliding window could cut a padded row
differently from the unpadded one, only contexts of equal length are batched together.

These are the prepared requests of `LayeredLM` (lm-eval's loglikelihood requests, per call) and of
the evaluator (`prepared.py`: prepared once for many variants).
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, ContextManager, Iterable, Iterator

import torch
import torch.nn.functional as F

from lm_eval_layers.arch import text_config


@dataclass(frozen=True)
class Request:
    ctx: tuple[int, ...]  # the context as the model sees it (at least one token)
    cont: tuple[int, ...]

    @classmethod
    def from_tokens(cls, context: list[int], continuation: list[int], max_length: int) -> Request:
        """Left-truncated to the model's length exactly like `hf` (`(ctx + cont)[-(max_length + 1):]`)."""
        whole = (list(context) + list(continuation))[-(max_length + 1):]
        return cls(tuple(whole[: len(whole) - len(continuation)]), tuple(continuation))


@dataclass
class Batch:
    """Requests whose contexts run together: `contexts[group[k]]` is row k's context."""

    contexts: list[tuple[int, ...]]
    rows: list[int] = field(default_factory=list)  # request indices
    group: list[int] = field(default_factory=list)
    conts: list[tuple[int, ...]] = field(default_factory=list)

    @cached_property
    def tensors(self) -> dict[str, torch.Tensor | None]:
        """Input tensors, built once and reused by every variant."""
        lengths = [len(c) - 1 for c in self.contexts]  # the context pass leaves out the last token
        past = max(lengths)
        width = max(len(c) for c in self.conts)
        ctx = torch.zeros(len(self.contexts), past, dtype=torch.long)
        for i, c in enumerate(self.contexts):
            ctx[i, : lengths[i]] = torch.tensor(c[:-1], dtype=torch.long)
        ids = torch.zeros(len(self.rows), width, dtype=torch.long)
        targets = torch.zeros(len(self.rows), width, dtype=torch.long)
        valid = torch.zeros(len(self.rows), width, dtype=torch.bool)
        for k, (g, cont) in enumerate(zip(self.group, self.conts)):
            ids[k, : len(cont)] = torch.tensor((self.contexts[g][-1], *cont[:-1]), dtype=torch.long)
            targets[k, : len(cont)] = torch.tensor(cont, dtype=torch.long)
            valid[k, : len(cont)] = True
        padded = len(set(lengths)) > 1
        mask = positions = None
        if padded:  # mask the context padding; positions continue each row's own context
            row_lengths = torch.tensor([lengths[g] for g in self.group])
            mask = torch.cat([torch.arange(past)[None] < row_lengths[:, None], torch.ones(len(self.rows), width, dtype=torch.bool)], 1)
            mask = mask.long()
            positions = row_lengths[:, None] + torch.arange(width)[None]
        row = torch.arange(len(self.rows))[:, None].expand(-1, width)[valid]  # the request of each real token
        return {"ctx": ctx if past else None, "ids": ids, "targets": targets, "valid": valid, "mask": mask,
                "positions": positions, "group": torch.tensor(self.group), "row": row}


def attention_window(config: Any) -> int | None:
    """The narrowest sliding / chunked attention span of the model, if it has one."""
    cfg = text_config(config)
    spans = [getattr(cfg, k, None) for k in ("sliding_window", "attention_chunk_size")]
    spans = [s for s in spans if isinstance(s, int) and s > 0]
    return min(spans) if spans else None


def make_batches(requests: list[Request], batch_size: int, max_tokens: int | None = None,
                 window: int | None = None) -> list[Batch]:
    """Requests grouped by shared context; contexts sorted by length (longest first, so padding
    stays small) and packed up to `batch_size` rows and `max_tokens` padded tokens."""
    by_context: dict[tuple[int, ...], list[int]] = {}
    for i, r in enumerate(requests):
        by_context.setdefault(r.ctx, []).append(i)
    batches: list[Batch] = []
    batch: Batch | None = None
    for ctx in sorted(by_context, key=lambda c: (-len(c), c)):
        rows = by_context[ctx]
        if batch is not None:
            n = len(batch.rows) + len(rows)
            width = len(batch.contexts[0]) + max(len(requests[i].cont) for i in batch.rows + rows)
            fits = n <= batch_size and (max_tokens is None or n * width <= max_tokens)
            same = len(ctx) == len(batch.contexts[0])
            if not fits or not (same or window is None or width < window):
                batch = None
        if batch is None:
            batch = Batch([])
            batches.append(batch)
        batch.group += [len(batch.contexts)] * len(rows)
        batch.contexts.append(ctx)
        batch.rows += rows
        batch.conts += [requests[i].cont for i in rows]
    return batches


Around = Callable[[int, str], ContextManager[Any]]


@torch.no_grad()
def run_batches(model: Any, batches: Iterable[Batch], num_requests: int, softmax_dtype: torch.dtype | None = None,
                around: Around | None = None, progress: Callable[[int], Any] | None = None) -> list[tuple[float, bool]]:
    """(sum of continuation log-probs, all tokens greedy) per request, as `hf` computes them.

    `around(batch_index, "ctx" | "cont")` wraps each model call (the prefix cache hooks in there).
    """
    around = around or (lambda _b, _stage: contextlib.nullcontext())
    device = model.device
    # the context pass needs only the KV cache: skip its logits where the model allows it
    ctx_kwargs = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    results: list[tuple[float, bool] | None] = [None] * num_requests
    for b, batch in enumerate(batches):
        t = {k: (v.to(device) if v is not None else None) for k, v in batch.tensors.items()}
        cache = None
        if t["ctx"] is not None:
            with around(b, "ctx"):
                cache = model(t["ctx"], use_cache=True, **ctx_kwargs).cache
            cache.reorder_cache(t["group"])
        with around(b, "cont"), _head_on(model, t["valid"]) as gathered:
            logits = model(t["ids"], cache=cache, attention_mask=t["mask"], position_ids=t["positions"],
                           use_cache=cache is not None).logits
        if gathered():  # logits of the real continuation tokens only, [1, tokens, vocab]
            lp = F.log_softmax(logits[0], dim=-1, dtype=softmax_dtype or logits.dtype)
        else:
            lp = F.log_softmax(logits, dim=-1, dtype=softmax_dtype or logits.dtype)[t["valid"]]
        targets = t["targets"][t["valid"]]
        token_lp = lp.gather(1, targets[:, None])[:, 0]
        misses = (lp.argmax(-1) != targets).to(token_lp.dtype)
        row = t["row"]
        sums = token_lp.new_zeros(len(batch.rows)).index_add_(0, row, token_lp)
        wrong = misses.new_zeros(len(batch.rows)).index_add_(0, row, misses)
        for k, i in enumerate(batch.rows):
            results[i] = (float(sums[k]), bool(wrong[k] == 0))
        if progress is not None:
            progress(len(batch.rows))
    return results  # type: ignore[return-value]


@contextlib.contextmanager
def _head_on(model: Any, valid: torch.Tensor) -> Iterator[Callable[[], bool]]:
    """Run the model's own output head only on the real (non-padded) continuation positions.

    A pre-hook on the output embedding hands it the hidden states of the `valid` positions as
    one [1, tokens, hidden] sequence, so the head and every family's own output transform after
    it (Gemma 2 soft-capping, Cohere's logit_scale, Granite's logits_scaling, …: all elementwise)
    run per real token; padding never reaches the vocabulary projection. Yields whether it did
    (a head called on other shapes is left alone)."""
    head = model.get_output_embeddings()
    done = [False]

    def gather(_module: Any, args: tuple) -> tuple | None:
        hidden = args[0]
        if hidden.dim() != 3 or tuple(hidden.shape[:2]) != tuple(valid.shape):
            return None
        done[0] = True
        return (hidden[valid.to(hidden.device)][None], *args[1:])

    handle = head.register_forward_pre_hook(gather) if head is not None else None
    try:
        yield lambda: done[0]
    finally:
        if handle is not None:
            handle.remove()
