"""Folding a fitted map into the down projection: the one formula every executor uses (the
in-memory variant, the checkpoint writer, `--verify`), so all three hold the same tensor.

The block's MLP branch adds M = h Wᵀ + b to the residual (nn.Linear, W stored [d, d_ff]); the
repair wants M T instead, so W′ = Tᵀ W and b′ = b T. GPT-2's Conv1D stores W as [d_ff, d]
(M = h W + b), so there W′ = W T. Computed in float64, stored in the tensor's own dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from lm_eval_layers.arch import Layout
from lm_eval_layers.plan import LayerPlan


def projection(layout: Layout) -> str:
    """The module (relative to a block) through which the MLP branch writes the residual."""
    return layout.mlp_out[0]


def folded_names(layout: Layout) -> tuple[str, str]:
    return f"{projection(layout)}.weight", f"{projection(layout)}.bias"


def fold(tensor: torch.Tensor, transform: torch.Tensor, rel: str, layout: Layout) -> torch.Tensor:
    """`tensor` (the projection's weight or bias, named `rel` in its block) with `transform` folded in."""
    t = transform.to(device=tensor.device, dtype=torch.float64)
    x = tensor.detach().to(torch.float64)
    out = x @ t if rel.endswith(".bias") or layout.conv1d else t.T @ x
    return out.to(tensor.dtype)


def folded_tensors(blocks: nn.ModuleList, layout: Layout, plan: LayerPlan,
                   transforms: dict[int, torch.Tensor]) -> dict[int, dict[str, torch.Tensor]]:
    """The repaired tensors of a variant, by slot: for each fitted map (keyed by the original
    block it folds into), that block's projection weight and bias with the map folded in."""
    out: dict[int, dict[str, torch.Tensor]] = {}
    params_of = {k: dict(blocks[s.source].named_parameters()) for k, s in enumerate(plan.slots)}
    for k, slot in enumerate(plan.slots):
        if slot.source in transforms:
            params = params_of[k]
            out[k] = {rel: fold(params[rel], transforms[slot.source], rel, layout)
                      for rel in folded_names(layout) if rel in params}
    return out
