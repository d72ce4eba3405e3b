"""Variants of one model scored on fixed calibration windows, each run from the hidden states
of a *reference plan* at the first slot where it differs (the fast path of a search).

A greedy step's candidates each differ from the current plan at one unit, so a candidate that
removes the unit in slot j runs only the slots after j (or, for a half, slot j's other half and
the slots after it), starting from the cached input of slot j under the current plan. After a
step the reference is re-based: the inputs of the slots after the change are recomputed once.

Objectives, summed per window w over its positions t (lower is better):
  nll: Σ_t −log p_variant(x_{t+1} | x_≤t)                         (t < T − 1)
  kl:  Σ_t Σ_v p_full(v | x_≤t) (log p_full(v | x_≤t) − log p_variant(v | x_≤t))   (every t)
reported per token. The full model's distribution is recomputed per batch from the cached input
of its last block (one block and the head), so no [tokens × vocab] table is kept; logits exist
for one batch of windows at a time.

Cost is counted in block passes: one block over every window = 1 (a branch of a block counts as
a block); machine-independent, so methods compare without a stopwatch.
"""

from __future__ import annotations

import torch
from torch import nn

from lm_eval_layers.arch import layout_for
from lm_eval_layers.hooks import pre_hooks, record_input, replace_input
from lm_eval_layers.plan import LayerPlan, Slot
from lm_eval_layers.variant import apply_plan

OBJECTIVES = ("nll", "kl")


class CalibrationEngine:
    """Scores plans of `model` on `windows` ([N, T] token ids) for `objective`."""

    def __init__(self, model: nn.Module, windows: torch.Tensor, objective: str = "nll", batch_size: int = 4,
                 cache_bytes: int = 4 << 30) -> None:
        if objective not in OBJECTIVES:
            raise ValueError(f"objective {objective!r}: use one of {', '.join(OBJECTIVES)}")
        self.model, self.objective = model, objective
        self.layout = layout_for(model)
        self.num_layers = len(self.layout.find_blocks(model))
        device = next(model.parameters()).device
        self.batches = [b.to(device) for b in windows.split(batch_size)]
        self.windows, self.tokens = windows.shape
        per_boundary = windows.numel() * model.config.hidden_size * next(model.parameters()).element_size()
        self.max_boundaries = max(1, cache_bytes // max(per_boundary, 1))
        self.block_passes = 0.0
        self.reference: LayerPlan | None = None  # None until the first score: a resumed search may need none
        self.boundaries: dict[int, list[torch.Tensor]] = {}  # slot index of the reference -> its input, per batch
        self.full_last: list[torch.Tensor] = []  # the full model's input to its last block (kl)
        self._full: torch.Tensor | None = None

    def _start(self) -> None:
        """The full model's pass (its boundaries, and for kl its last block's input), on first use."""
        if self.reference is None:
            self._full = self._rebase(LayerPlan.identity(self.num_layers), 0, keep_last=self.objective == "kl")

    @property
    def full_scores(self) -> torch.Tensor:
        """Per-window scores of the full model."""
        self._start()
        assert self._full is not None
        return self._full

    @property
    def positions(self) -> int:
        """Positions each objective sums over, in all windows."""
        return self.windows * (self.tokens - 1 if self.objective == "nll" else self.tokens)

    # -- the reference plan -----------------------------------------------------------------

    def rebase(self, plan: LayerPlan) -> torch.Tensor:
        """Make `plan` the reference; returns its per-window scores."""
        self._start()
        assert self.reference is not None
        if plan == self.reference:
            return self.reference_scores
        start = _first_difference(self.reference, plan)
        start = max((k for k in self.boundaries if k <= start), default=0)
        self.boundaries = {k: v for k, v in self.boundaries.items() if k <= start}
        return self._rebase(plan, start)

    def start_from(self, plan: LayerPlan) -> None:
        """Make `plan` the reference the next candidates run from."""
        self.rebase(plan)

    def calibration_pass(self) -> None:
        """Count one pass of the whole stack over the windows (a ranking's forward pass)."""
        self.block_passes += self.num_layers

    def _rebase(self, plan: LayerPlan, start: int, keep_last: bool = False) -> torch.Tensor:
        last = min(len(plan.slots), start + 1 + self.max_boundaries)
        captured: dict[int, list[torch.Tensor]] = {k: [] for k in range(start + 1, last)}
        rest = LayerPlan(plan.num_layers, plan.slots[start:])

        def capture(b: int) -> list[tuple[nn.Module, object]]:
            blocks = self.layout.find_blocks(self.model)
            hooks = [(blocks[k - start], record_input(captured[k].append)) for k in captured]
            if keep_last:
                hooks.append((blocks[len(plan.slots) - 1 - start], record_input(self.full_last.append)))
            return hooks

        scores = self._run(rest, start, capture)
        self.boundaries.update(captured)
        self.reference, self.reference_scores = plan, scores
        return scores

    # -- candidates --------------------------------------------------------------------------

    def score(self, plan: LayerPlan) -> torch.Tensor:
        """Per-window objective of `plan`, run from the reference's cached state where they first differ."""
        self._start()
        assert self.reference is not None
        start = _first_difference(self.reference, plan)
        start = max((k for k in self.boundaries if k <= start), default=0)
        rest = plan.slots[start:]
        if not rest:  # the change removed the reference's last slots: pass the cached state through
            rest = (Slot((self.num_layers - 1,), drop_attn=True, drop_mlp=True),)
        return self._run(LayerPlan(plan.num_layers, rest), start)

    def _run(self, rest: LayerPlan, start: int, hooks_for=None) -> torch.Tensor:
        """Run `rest`'s slots on every batch (from boundary `start` when start > 0)."""
        scores = []
        for b, ids in enumerate(self.batches):
            with apply_plan(self.model, rest):  # per batch: the kl reference runs another plan in between
                blocks = self.layout.find_blocks(self.model)
                hooks = list(hooks_for(b) if hooks_for else [])
                if start:
                    hooks.append((blocks[0], replace_input(self.boundaries[start][b])))
                with pre_hooks(hooks):
                    logits = self.model(input_ids=ids, use_cache=False).logits
            scores.append(self._window_scores(logits, ids, b))
        self.block_passes += sum(0 if s.drop_attn and s.drop_mlp else 1 for s in rest.slots)
        return torch.cat(scores)

    def _window_scores(self, logits: torch.Tensor, ids: torch.Tensor, b: int) -> torch.Tensor:
        logp = logits.float().log_softmax(-1)
        if self.objective == "nll":
            return -logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1).sum(-1).double().cpu()
        ref = self._full_logprobs(ids, b)
        return (ref.exp() * (ref - logp)).sum(-1).sum(-1).double().cpu()

    def _full_logprobs(self, ids: torch.Tensor, b: int) -> torch.Tensor:
        last = LayerPlan(self.num_layers, (Slot((self.num_layers - 1,)),))
        with apply_plan(self.model, last):
            first = self.layout.find_blocks(self.model)[0]
            with pre_hooks([(first, replace_input(self.full_last[b]))]):
                logits = self.model(input_ids=ids, use_cache=False).logits
        self.block_passes += 1 / len(self.batches)
        return logits.float().log_softmax(-1)


def _first_difference(a: LayerPlan, b: LayerPlan) -> int:
    k = 0
    while k < min(len(a.slots), len(b.slots)) and a.slots[k] == b.slots[k]:
        k += 1
    return k
