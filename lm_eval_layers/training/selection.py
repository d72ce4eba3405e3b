"""What trains: a set of blocks chosen by index, then either their full weights or LoRA adapters
on their linear modules.

Blocks are found through the architecture layouts (`lm_eval_layers.arch`), never by matching
checkpoint names, so GPT-2-style checkpoints that drop the outer prefix select the same blocks.

Choices (one at a time; default: all blocks):
- `--layers SPEC`: the layer plan's index syntax (`0-7`, `3;5-7`, `-2`).
- `--freeze-bottom P`: freeze the lowest P blocks (`25%` of the depth, or a count) and train the rest.
- `--new-blocks`: the blocks `surgery expand` listed in the model folder's `new_parameters.json`
  (LLaMA-Pro: only the inserted blocks train). The one allowed union is `--new-blocks --layers
  SPEC`: Llama SLayer's S strategy also trains the new last block, so it is
  `--new-blocks --layers -1` on a `--preset slayer` expansion.
- `--layers-from ila.json --top 30%`: the most significant units of a `surgery ila` run. Block
  units select those blocks; matrix units select exactly those weight matrices (full weights of
  just those matrices, or LoRA with PEFT `target_modules` given as full module names).

`--head` adds the output head (`lm_head`, found by `get_output_embeddings()`) to any of these,
full weights only: "Reassessing Layer Pruning in LLMs: New Insights and Methods" heals a model
whose last blocks were removed by training `lm_head` and the last three remaining blocks. With
tied embeddings the head *is* the input embedding matrix, so that trains too, and the log names both.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from torch import nn

from lm_eval_layers.arch import Layout
from lm_eval_layers.checkpoint import NEW_PARAMS_FILE
from lm_eval_layers.errors import PlanError, SelectionError
from lm_eval_layers.plan import format_indices, parse_indices
from lm_eval_layers.shares import parse_share
from lm_eval_layers.training import ila_file
from lm_eval_layers.training.gate_units import WHOLE_BLOCK, UnitKind


@dataclass(frozen=True)
class Selection:
    blocks: tuple[int, ...]  # indices into the model's block list, sorted
    description: str  # for logs, the table and the model card
    matrices: tuple[tuple[int, str], ...] = ()  # (block, module relative to it); empty: whole blocks
    head: bool = False  # the output head trains too (full weights)

    def __post_init__(self) -> None:
        if not self.blocks:
            raise SelectionError("the selection is empty: nothing would train; choose at least one block")


def select_blocks(
    num_blocks: int,
    layers: str | None = None,
    freeze_bottom: str | None = None,
    new_blocks: bool = False,
    model_folder: Path | None = None,
    layers_from: Path | None = None,
    top: str | None = None,
    model_type: str | None = None,
) -> Selection:
    """The blocks (or matrices) to train, checked against the model's depth before any weight is loaded."""
    if (layers_from is None) != (top is None):
        raise SelectionError("--layers-from and --top go together, e.g. --layers-from ila.json --top 30%")
    chosen = [name for name, on in (("--layers", layers is not None), ("--freeze-bottom", freeze_bottom is not None),
                                    ("--new-blocks", new_blocks), ("--layers-from", layers_from is not None)) if on]
    if len(chosen) > 1 and chosen != ["--layers", "--new-blocks"]:
        raise SelectionError(
            f"{' and '.join(chosen)} are two selections; give one (only --new-blocks --layers SPEC combine, as a union)"
        )
    if layers_from is not None and top is not None:
        return top_units(layers_from, top, num_blocks, model_type)
    blocks: set[int] = set()
    parts: list[str] = []
    if new_blocks:
        new = read_new_blocks(model_folder, num_blocks)
        blocks |= set(new)
        parts.append(f"new blocks {format_indices(new)}")
    if layers is not None:
        picked = block_indices("--layers", layers, num_blocks)
        blocks |= set(picked)
        parts.append(f"blocks {format_indices(picked)}")
    if freeze_bottom is not None:
        frozen = bottom_count(freeze_bottom, num_blocks)
        blocks = set(range(frozen, num_blocks))
        parts.append(f"blocks {format_indices(blocks)} (bottom {frozen} frozen)")
    if not parts:
        blocks = set(range(num_blocks))
        parts.append(f"all {num_blocks} blocks")
    return Selection(tuple(sorted(blocks)), " + ".join(parts))


def with_head(selection: Selection) -> Selection:
    """The selection plus the output head (`--head`)."""
    return replace(selection, head=True, description=f"{selection.description} + the output head")


def top_units(path: Path, top: str, num_blocks: int, model_type: str | None) -> Selection:
    """The top share of an ila.json's units (by its rank), as blocks or as single matrices."""
    share = parse_share("--top", top, error=SelectionError)
    document = ila_file.read(path)
    if document.get("num_layers") != num_blocks or (model_type and document.get("model_type") not in (None, model_type)):
        raise SelectionError(
            f"{path} is for a {document.get('model_type')} model with {document.get('num_layers')} blocks, this one is "
            f"{model_type} with {num_blocks}; run `surgery ila` on this model"
        )
    chosen = ila_file.top_units(document, share)
    blocks = tuple(sorted({int(u["block"]) for u in chosen}))
    label = f"top {top.strip()} of {len(document['units'])} {document['unit']} units of {Path(path).name}"
    if document["unit"] == UnitKind.block.value:
        return Selection(blocks, f"{label}: blocks {format_indices(blocks)}")
    matrices = tuple(sorted((int(u["block"]), u["module"]) for u in chosen if u["module"] != WHOLE_BLOCK))
    return Selection(blocks, f"{label}: {len(matrices)} matrices in blocks {format_indices(blocks)}", matrices)


def block_indices(option: str, spec: str, num_blocks: int) -> list[int]:
    """A plan-syntax index list resolved against the depth (negatives count from the end)."""
    try:
        return parse_indices(option, spec, num_blocks)
    except PlanError as e:
        raise SelectionError(str(e)) from None


def bottom_count(value: str, num_blocks: int) -> int:
    """`25%` or `0.25` -> a quarter of the blocks (rounded), `3` -> 3; must leave one block to train."""
    text = value.strip()
    if text.endswith("%") or "." in text:
        count = round(parse_share("--freeze-bottom", text, allow_none=True, error=SelectionError) * num_blocks)
    else:
        try:
            count = int(text)
        except ValueError:
            raise SelectionError(f"--freeze-bottom {value!r} is not a share or a count; write it like 25% or 4") from None
    if not 0 <= count < num_blocks:
        raise SelectionError(
            f"--freeze-bottom {value} freezes {count} of {num_blocks} blocks; leave at least one block to train (0..{num_blocks - 1})"
        )
    return count


def read_new_blocks(model_folder: Path | None, num_blocks: int) -> list[int]:
    """The inserted blocks listed by `surgery expand` (positions in the expanded model)."""
    path = model_folder / NEW_PARAMS_FILE if model_folder is not None else None
    if path is None or not path.is_file():
        raise SelectionError(
            f"--new-blocks needs {NEW_PARAMS_FILE} in the model folder (written by `surgery expand`); "
            "expand the model first or choose blocks with --layers"
        )
    try:
        new = [int(i) for i in json.loads(path.read_text())["layers_to_transform"]]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise SelectionError(f"{path} has no list 'layers_to_transform'; re-run `surgery expand`") from None
    bad = [i for i in new if not 0 <= i < num_blocks]
    if bad or not new:
        raise SelectionError(f"{path} lists blocks {bad or '(none)'} but the model has {num_blocks}; re-run `surgery expand`")
    return sorted(set(new))


def block_list(model: nn.Module, layout: Layout) -> nn.ModuleList:
    blocks = layout.find_blocks(model)
    if blocks is None:
        raise SelectionError(f"no decoder blocks at {layout.blocks} in this model")
    return blocks


def freeze_all_but(model: nn.Module, layout: Layout, selection: Selection) -> None:
    """Full fine-tuning of the selected blocks (or matrices), and the output head with `--head`:
    every other parameter frozen.

    Done before the Trainer builds its optimizer, which then holds only these parameters.
    A tensor shared between a selected block and anything outside it (tied weights) would
    let training change frozen parts, so it is refused; the head's own tie to the input
    embeddings is what `--head` says it trains.
    """
    blocks = block_list(model, layout)
    for p in model.parameters():
        p.requires_grad_(False)
    parts = [blocks[b].get_submodule(rel) for b, rel in selection.matrices] or [blocks[i] for i in selection.blocks]
    head = {id(p) for p in model.get_output_embeddings().parameters()} if selection.head else set()
    for p in model.parameters():
        if id(p) in head:
            p.requires_grad_(True)
    for part in parts:
        for p in part.parameters():
            p.requires_grad_(True)
    inside = {id(p) for part in parts for p in part.parameters()} - head
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in inside and not _in_blocks(name, layout, selection):
            raise SelectionError(f"{name} shares its tensor with a selected block (tied weights); select blocks without it")


def _in_blocks(name: str, layout: Layout, selection: Selection) -> bool:
    head = f"{layout.blocks}."
    rest = name.split(head, 1)[1] if head in name else ""
    index = rest.split(".", 1)[0]
    return index.isdigit() and int(index) in selection.blocks


def linear_modules(model: nn.Module, layout: Layout, selection: Selection) -> tuple[list[str], bool]:
    """Names, relative to a block, of the selected blocks' linear modules (`nn.Linear` and
    GPT-2's `Conv1D`, which LoRA adapts), and whether they are `Conv1D` (stored transposed)."""
    from transformers.pytorch_utils import Conv1D

    blocks = block_list(model, layout)
    found = {
        rel: isinstance(module, Conv1D)
        for i in selection.blocks
        for rel, module in blocks[i].named_modules()
        if rel and isinstance(module, (nn.Linear, Conv1D))
    }
    if not found:
        raise SelectionError("the selected blocks have no linear modules for LoRA; train their full weights instead")
    return sorted(found), any(found.values())


def lora_config(model: nn.Module, layout: Layout, selection: Selection, rank: int, alpha: float, dropout: float) -> Any:
    """PEFT's config for LoRA on the selection: for blocks, module names relative to a block plus
    `layers_to_transform` (the block indices) under `layers_pattern` (the block list's name); for
    single matrices, their full module names (PEFT matches those exactly)."""
    from peft import LoraConfig

    targets, conv1d = linear_modules(model, layout, selection)
    if selection.matrices:
        targets = [f"{layout.blocks}.{b}.{rel}" for b, rel in selection.matrices]
    return LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, bias="none", task_type="CAUSAL_LM",
        target_modules=targets, fan_in_fan_out=conv1d,
        layers_to_transform=None if selection.matrices else list(selection.blocks),
        layers_pattern=None if selection.matrices else layout.blocks.split(".")[-1],
    )


def trainable(model: nn.Module) -> tuple[int, int, list[str]]:
    """Trainable and total parameter counts, and the trainable parameters' names (every name of
    a tied tensor: a trained head tied to the input embeddings lists both)."""
    names = [n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad]
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return count, total, names
