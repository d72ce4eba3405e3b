"""How a synthesised block's tensors are made from the original ones.

Shared by the in-memory variant and the checkpoint writer, so a block built in memory and the
same block written to disk are bit-identical.
"""

from __future__ import annotations

import torch

from lm_eval_layers.arch import Layout
from lm_eval_layers.plan import Slot


def is_zeroed(layout: Layout, slot: Slot, name: str) -> bool:
    """Is tensor `name` (relative to a block, e.g. `mlp.down_proj.weight`) zero in this slot?

    `*-zero` inserts zero every output projection (for a mixture of experts, every expert's and
    the shared expert's), so the block adds nothing to the residual stream. On disk, where a
    config cannot say "this block has no attention", a removed branch is written as zeroed
    output projections, which compute the same values as skipping the branch.
    """
    return layout.is_output(name, attn=slot.zero_out or slot.drop_attn, mlp=slot.zero_out or slot.drop_mlp)


def synthesize(layout: Layout, slot: Slot, name: str, sources: list[torch.Tensor]) -> torch.Tensor:
    """Tensor `name` of a slot's block, given that tensor of each of the slot's sources."""
    if is_zeroed(layout, slot, name):
        return torch.zeros_like(sources[0])
    if len(sources) == 1:
        return sources[0]
    a, b = sources
    if not a.is_floating_point():
        return a
    # Mean in fp32, rounded once to the storage dtype: the same bits on CPU, CUDA and on disk.
    return ((a.float() + b.float()) / 2).to(a.dtype)
