"""The units a search removes and what removing them leaves: whole blocks (`7`), or attention
and MLP branches (`attn.7`, `mlp.7`; a block whose two branches are both gone is dropped, which
computes the same). Plans are built through the one plan parser, `PlanSpec`."""

from __future__ import annotations

from typing import Iterable, Union

from torch import nn

from lm_eval_layers.arch import Layout
from lm_eval_layers.errors import UsageError
from lm_eval_layers.plan import LayerPlan, PlanSpec, unit_name

Unit = Union[int, str]  # block index, or "attn.K" / "mlp.K"


def all_units(num_layers: int, halves: bool) -> list[Unit]:
    """Every unit in stack order (attn0, mlp0, attn1, … for halves)."""
    if not halves:
        return list(range(num_layers))
    return [unit_name(k, kind) for k in range(num_layers) for kind in ("attn", "mlp")]


def block_of(unit: Unit) -> int:
    return unit if isinstance(unit, int) else int(unit.split(".")[1])


def protected_units(spec: str, num_layers: int, halves: bool) -> set[Unit]:
    """`--protect 0,-1`: blocks never removed (with halves, both of their branches)."""
    from lm_eval_layers.plan import parse_indices

    blocks = set(parse_indices("--protect", spec, num_layers)) if spec.strip() else set()
    return {u for u in all_units(num_layers, halves) if block_of(u) in blocks}


def plan_without(num_layers: int, removed: Iterable[Unit], model_type: str | None = None) -> LayerPlan:
    """The plan that keeps everything but `removed`."""
    removed = set(removed)
    drop = {u for u in removed if isinstance(u, int)}
    attn = {block_of(u) for u in removed if isinstance(u, str) and u.startswith("attn.")}
    mlp = {block_of(u) for u in removed if isinstance(u, str) and u.startswith("mlp.")}
    drop |= attn & mlp
    spec = PlanSpec.from_args(drop=sorted(drop) or None, drop_attn=sorted(attn - drop) or None,
                              drop_mlp=sorted(mlp - drop) or None)
    return spec.resolve(num_layers, model_type)


def unit_parameters(model: nn.Module, layout: Layout, halves: bool) -> dict[Unit, int]:
    """Parameters each unit holds (a shared tensor counted once, as `surgery inspect` counts)."""
    blocks = layout.find_blocks(model)
    assert blocks is not None
    out: dict[Unit, int] = {}
    for k, block in enumerate(blocks):
        if not halves:
            out[k] = sum(p.numel() for p in block.parameters())
            continue
        attn, mlp = layout.branch(block, "attn"), layout.branch(block, "mlp")
        if attn is None or mlp is None:
            raise UsageError(f"--unit halves needs separate attention and MLP branches, which block {k} of "
                             f"{type(model).__name__} lacks; use --unit block")
        out[f"attn.{k}"] = sum(p.numel() for p in getattr(block, attn).parameters())
        out[f"mlp.{k}"] = sum(p.numel() for p in getattr(block, mlp).parameters())
    return out
