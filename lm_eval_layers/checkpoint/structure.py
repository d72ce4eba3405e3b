"""Will the written config rebuild the plan's stack? Checked from configs and weightless models
before the first byte is written (`written_problem`): transformers builds each block from config.json, and some
families derive a block's kind from its index or the depth (Jamba's attention period, a count of
leading dense blocks, a pattern of layer types), which a cut or an insert can silently move."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from lm_eval_layers.arch import INDEX_ATTRIBUTES, Layout, misplaced, text_config
from lm_eval_layers.checkpoint.sources import Source, meta_model, source_meta
from lm_eval_layers.plan import LayerPlan
from lm_eval_layers.twin import twin_problem


def _shapes(block: Any) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in block.named_parameters()}


def _constants(block: Any) -> dict[str, Any]:
    """Plain numbers a block's modules keep (DiffLlama's λ_init, a scale, a window), by module and
    name; the block's own index is expected to change."""
    out = {}
    for path, module in block.named_modules():
        for name, value in vars(module).items():
            if name.startswith("_") or name in (*INDEX_ATTRIBUTES, "training") or isinstance(value, bool):
                continue
            if isinstance(value, (int, float, str)):
                out[f"{path}.{name}".lstrip(".")] = value
    return out


def uncovered_outputs(layout: Layout, block: Any, loaded: list[str], attn: bool, mlp: bool) -> list[str]:
    """Output projections of a loaded block (`block`, weightless) that no stored tensor becomes on
    load (`loaded`: the names the block's stored tensors get, `compat.loaded_name`): zeroing on
    disk would miss them."""
    def norm(name: str) -> str:
        return ".".join("*" if p.isdigit() else p for p in name.split(".") if p not in ("weight", "bias"))

    names = {norm(n) for n in loaded}
    return [name for name, _ in block.named_parameters() if layout.is_output(name, attn=attn, mlp=mlp) and norm(name) not in names]


def _as_loaded(config: dict[str, Any], like: Any) -> Any:
    """The config object transformers builds from this config.json (read from a file, as
    `from_pretrained` does: special floats such as the Infinity of `time_step_limit` are decoded there)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.json"
        path.write_text(json.dumps(config))
        return type(like).from_json_file(str(path))


def _twin_problem(hf_config: Any, plan: LayerPlan, family: str) -> str | None:
    """The plan proven on a narrow random twin, since the writer never loads the real weights;
    identity claims that cannot be proven that way are refused."""
    problem, proven = twin_problem(hf_config, plan)
    if not proven and any(s.zero_out or s.drop_attn or s.drop_mlp for s in plan.slots):
        return (f"cannot prove this plan's identity blocks or removed branches for {family} on a narrow random twin; "
                "evaluate it in memory (lm_eval --model layered), where the real weights are probed")
    return problem


def written_problem(source: Source, config: dict[str, Any], plan: LayerPlan, layout: Layout,
                    loaded: dict[int, list[str]]) -> str | None:
    """Why writing `plan` of `source` with `config` (the config.json to write) would not give the
    plan's stack, in one line; None when every block reloads with its source's parameters and
    constants. `loaded`: the names each source block's stored tensors get on load, relative to the block."""
    text = text_config(source.hf_config)
    family = getattr(text, "model_type", "this family")
    before = layout.find_blocks(source_meta(source))
    assert before is not None
    problem = _twin_problem(source.hf_config, plan, family)
    if problem:
        return problem
    for slot in (s for s in plan.slots if s.zero_out or s.drop_attn or s.drop_mlp):
        missing = uncovered_outputs(layout, before[slot.source], loaded[slot.source],
                                    slot.zero_out or slot.drop_attn, slot.zero_out or slot.drop_mlp)
        if missing:
            return (f"{family}: the checkpoint stores {missing[0]} of block {slot.source} under a name the writer cannot "
                    "map, so a zeroed copy or removed branch cannot be written exactly; evaluate the plan in memory "
                    "(lm_eval --model layered) instead")
    try:
        written = _as_loaded(config, source.hf_config)
        after = layout.find_blocks(meta_model(written))
    except Exception as e:  # noqa: BLE001 - transformers refusing the config is the answer
        return f"transformers refuses the config this plan would write for {family}: {str(e).splitlines()[0][:200]}"
    moved = misplaced(text, plan, text_config(written))
    if moved:
        return (f"{family} computes {', '.join(sorted(moved))} from each block's index, which no config.json field can "
                "set per block, so a checkpoint cannot hold this plan's stack; evaluate it in memory "
                "(lm_eval --model layered) or choose a plan that keeps the pattern")
    if after is None or len(after) != len(plan.slots):
        return f"the config this plan would write for {family} does not build {len(plan.slots)} blocks"
    for k, slot in enumerate(plan.slots):
        moved_constants = _constants(before[slot.source]).items() ^ _constants(after[k]).items()
        if moved_constants:
            name = sorted({n for n, _ in moved_constants})[0]
            return (f"{family} computes {name} of each block from its position, so block {slot.source} written as block "
                    f"{k} would compute something else; evaluate this plan in memory (lm_eval --model layered) instead")
        want, got = _shapes(before[slot.source]), _shapes(after[k])
        if want != got:
            diff = sorted(set(want) ^ set(got)) or sorted(n for n in want if want[n] != got.get(n))
            return (f"{family} builds block {k} of the written checkpoint unlike block {slot.source} "
                    f"(differs in {', '.join(diff[:2])}): its config describes blocks by position in a way this "
                    "plan breaks; evaluate it in memory (lm_eval --model layered) instead")
    return None
