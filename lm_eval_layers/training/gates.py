"""Learned gates on LoRA updates: one logit s per unit, the unit's LoRA delta scaled by σ(s).

A unit (`units.Unit`) is one weight matrix of a block (q/k/v/o, gate/up/down, GPT-2's `c_attn`,
…), or with `UnitKind.block` every matrix of a block under one shared gate. The gate is a
forward hook on each PEFT LoRA layer's `lora_B` module: PEFT computes a layer's output as
`base(x) + lora_B(lora_A(dropout(x))) · scaling`, so scaling `lora_B`'s output by σ(s) scales
exactly the delta, for `nn.Linear` and GPT-2's transposed `Conv1D` alike, without touching PEFT.
The logits are an ordinary `nn.Parameter` registered on the model, so the Trainer's optimizer
finds them like any other trainable tensor.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lm_eval_layers.arch import Layout
from lm_eval_layers.errors import SelectionError
from lm_eval_layers.training.gate_units import WHOLE_BLOCK, Unit, UnitKind

GATES_ATTRIBUTE = "ila_gates"  # where the gates live on the model (so its parameters() include them)


def lora_layers(model: nn.Module, layout: Layout) -> list[tuple[int, str, Any]]:
    """(block index, module name relative to the block, PEFT LoRA layer) for every LoRA layer
    inside the decoder blocks, found through the layout (never by checkpoint names)."""
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    blocks = layout.find_blocks(base)
    if blocks is None:
        raise SelectionError(f"no decoder blocks at {layout.blocks} in this model")
    found = [
        (i, rel, module)
        for i, block in enumerate(blocks)
        for rel, module in block.named_modules()
        if rel and isinstance(module, LoraLayer)
    ]
    if not found:
        raise SelectionError("the model has no LoRA layers in its blocks; add LoRA adapters before gating them")
    return found


class Gates(nn.Module):
    """σ(s_i) on the LoRA delta of every unit i; `attach` hooks them into a PEFT model."""

    def __init__(self, units: list[Unit], init: float) -> None:
        super().__init__()
        self.units = units
        self.logits = nn.Parameter(torch.full((len(units),), float(init)))
        self._handles: list[Any] = []

    @classmethod
    def attach(cls, model: nn.Module, layout: Layout, kind: UnitKind, init: float) -> "Gates":
        """Gates for every LoRA layer of `model`, hooked in and registered as `model.ila_gates`."""
        layers = lora_layers(model, layout)
        unit_of = [Unit(i, WHOLE_BLOCK if kind is UnitKind.block else rel) for i, rel, _ in layers]
        units = list(dict.fromkeys(unit_of))
        gates = cls(units, init)
        index = {unit: k for k, unit in enumerate(units)}
        for unit, (_, _, layer) in zip(unit_of, layers):
            for adapter in layer.active_adapters:
                if adapter in layer.lora_B:
                    gates._handles.append(layer.lora_B[adapter].register_forward_hook(gates._scale(index[unit])))
        device = next(model.parameters()).device
        model.add_module(GATES_ATTRIBUTE, gates.to(device))
        return gates

    def _scale(self, k: int) -> Any:
        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
            return output * torch.sigmoid(self.logits[k])

        return hook

    def values(self) -> torch.Tensor:
        """σ(s) per unit."""
        return torch.sigmoid(self.logits)

    def set_values(self, values: torch.Tensor) -> None:
        """Set σ(s) directly (0 and 1 give s = ∓inf, exactly off / on)."""
        with torch.no_grad():
            self.logits.copy_(torch.logit(values.to(self.logits)))

    def detach(self, model: nn.Module) -> None:
        """Remove the hooks and the registration: the model computes the plain PEFT output again."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if hasattr(model, GATES_ATTRIBUTE):
            delattr(model, GATES_ATTRIBUTE)


def delta_norms(model: nn.Module, layout: Layout, units: list[Unit]) -> list[float]:
    """‖scaling · B A‖_F of each unit's LoRA update (a tied block: the root of the sum of its
    matrices' squares), the naive importance that the learned gates are compared against."""
    squares = dict.fromkeys(units, 0.0)
    tied = all(u.module == WHOLE_BLOCK for u in units)
    with torch.no_grad():
        for i, rel, layer in lora_layers(model, layout):
            for adapter in layer.active_adapters:
                if adapter in layer.lora_A:
                    delta = layer.lora_B[adapter].weight.float() @ layer.lora_A[adapter].weight.float()
                    norm = float(torch.linalg.matrix_norm(delta)) * layer.scaling[adapter]
                    squares[Unit(i, WHOLE_BLOCK if tied else rel)] += norm * norm
    return [squares[u] ** 0.5 for u in units]
