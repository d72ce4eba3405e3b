"""A variant's size and shape, counted from the tensors a written checkpoint of its plan would
hold (`checkpoint.writer.plan_tensors`: tied tensors once, removed branches as their zeroed
weights), without decoding a weight."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from lm_eval_layers.checkpoint.sources import Source, source_layout, source_meta
from lm_eval_layers.checkpoint.writer import block_prefix, plan_tensors
from lm_eval_layers.cost.flops import Shape
from lm_eval_layers.plan import LayerPlan

_EXPERT = re.compile(r"(^|\.)experts\.")


@dataclass(frozen=True)
class Size:
    params: int  # as `surgery inspect` counts a checkpoint: every stored tensor once
    bytes: int  # the weight files' payload in the given dtype
    shape: Shape


def head_dims(config: Any) -> tuple[int, int]:
    """(query width = heads × head dim, output head weights = vocab × hidden) of a transformers config."""
    text = config.get_text_config()
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return heads * head_dim, text.vocab_size * text.hidden_size


def routed_share(config: Any) -> float:
    """The share of a mixture's expert weights one token passes through (top-k of E), 1 if dense."""
    text = config.get_text_config()
    experts = getattr(text, "num_experts", None) or getattr(text, "num_local_experts", None)
    return text.num_experts_per_tok / experts if experts else 1.0


def size(source: Source, plan: LayerPlan, dtype: Any = None) -> Size:
    """Parameters, bytes (in `dtype`, a torch dtype, or as stored) and FLOP shape of `plan`'s variant.

    A slot's matmul weights are its tensors of two or more dimensions named `*weight` (norms and
    biases are vectors), less a removed branch's (not computed in memory); expert tensors count
    with the routed share."""
    layout = source_layout(source)
    tensors = plan_tensors(source, plan, layout, dtype)
    width, head = head_dims(source.hf_config)
    share = routed_share(source.hf_config)
    blocks = layout.find_blocks(source_meta(source))
    assert blocks is not None
    removed = [tuple(f"{layout.branch(blocks[s.source], kind)}." for kind, gone in (("attn", s.drop_attn), ("mlp", s.drop_mlp))
                     if gone and layout.branch(blocks[s.source], kind)) for s in plan.slots]
    prefix = block_prefix(list(source.infos), layout)
    weights = [0.0] * len(plan.slots)
    for t in tensors:
        if t.slot is None or len(t.info.shape) < 2 or not t.rel.endswith("weight"):
            continue
        k = int(t.name[len(prefix):].split(".", 1)[0])  # written as {prefix}{slot}.{rel}
        if t.rel.startswith(removed[k]):
            continue
        weights[k] += math.prod(t.info.shape) * (share if _EXPERT.search(t.rel) else 1.0)
    attention = tuple(0 if s.drop_attn else width for s in plan.slots)
    return Size(params=sum(math.prod(t.info.shape) for t in tensors), bytes=sum(t.info.nbytes for t in tensors),
                shape=Shape(tuple(weights), attention, head))
