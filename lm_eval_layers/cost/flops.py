"""Matmul FLOPs per token of a variant, from its shape alone (no torch).

A token passes through every matmul weight of every slot once and through the output head:
2 FLOPs per weight (multiply and add). Attention adds, per slot, QKᵀ and the weighted sum of V,
each `a·c` multiply-adds for a token that attends to `c` positions, where `a` is the query
width (heads × head dim): 4·a·c FLOPs. In a causal prompt of P tokens token i attends to i
positions, so the mean over the prompt is 2·a·(P+1); a token generated after P tokens attends
to P+1. Norms, activations, rotary embeddings and softmax are left out (they are a few percent
of a block's FLOPs), and so are sliding windows (SDPA computes the masked positions anyway).

    prompt:     2·(Σ weights + head) + Σ a · 2·(P+1)
    generation: 2·(Σ weights + head) + Σ a · 4·(P+1)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    """What the FLOP model needs of a variant."""

    slot_weights: tuple[float, ...]  # matmul weights a token passes through, per slot (MoE: the routed share)
    slot_attention: tuple[int, ...]  # query width (heads × head dim) per slot; 0 where attention is removed
    head: int  # output head weights (vocab × hidden), tied or not

    @property
    def weights(self) -> float:
        return sum(self.slot_weights) + self.head


def prompt_flops(shape: Shape, prompt_tokens: int) -> float:
    """Mean FLOPs per token when processing a prompt of `prompt_tokens` with logits at every position."""
    return 2 * shape.weights + sum(shape.slot_attention) * 2 * (prompt_tokens + 1)


def generation_flops(shape: Shape, context: int) -> float:
    """FLOPs of one token generated after `context` tokens (KV cache: only the new token is computed)."""
    return 2 * shape.weights + sum(shape.slot_attention) * 4 * (context + 1)
