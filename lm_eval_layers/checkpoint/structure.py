"""Will the written config rebuild the plan's stack? Checked from configs and weightless models
before the first byte is written: transformers builds each block from config.json, and some
families derive a block's kind from its index or the depth (Jamba's attention period, a count of
leading dense blocks, a pattern of layer types), which a cut or an insert can silently move."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from lm_eval_layers.arch import Layout, computed_mismatch, config_updates, text_config
from lm_eval_layers.plan import LayerPlan


def _shapes(block: Any) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in block.named_parameters()}


def _constants(block: Any) -> dict[str, Any]:
    """Plain numbers a block's modules keep (DiffLlama's λ_init, a scale, a window), by module and
    name; the block's own index is expected to change."""
    out = {}
    for path, module in block.named_modules():
        for name, value in vars(module).items():
            if name.startswith("_") or name in ("layer_idx", "training") or isinstance(value, bool):
                continue
            if isinstance(value, (int, float, str)):
                out[f"{path}.{name}".lstrip(".")] = value
    return out


def uncovered_outputs(layout: Layout, block: Any, disk: list[str], attn: bool, mlp: bool) -> list[str]:
    """Output projections of a loaded block (`block`, weightless) that no tensor name on disk
    (`disk`, relative to the block) matches: transformers renames them on load (a shared expert
    stored as `shared_mlp`, fused experts stored as `output_linear`), so zeroing by name on disk
    would miss them."""
    def norm(name: str) -> str:
        parts = [p for p in name.split(".") if p not in ("weight", "bias")]
        return ".".join("*" if p.isdigit() else p for p in parts)

    stored = {norm(n) for n in disk}
    missing = []
    for name, _ in block.named_parameters():
        if not layout.is_output(name, attn=attn, mlp=mlp):
            continue
        parts = norm(name).split(".")
        fused = ".".join([*parts[:-1], "*", parts[-1]])
        if norm(name) not in stored and fused not in stored:
            missing.append(name)
    return missing


def _as_loaded(config: dict[str, Any], like: Any) -> Any:
    """The config object transformers builds from this config.json (read from a file, as
    `from_pretrained` does: special floats such as the Infinity of `time_step_limit` are decoded there)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.json"
        path.write_text(json.dumps(config))
        return type(like).from_json_file(str(path))


def structure_problem(hf_config: Any, config: dict[str, Any], plan: LayerPlan, layout: Layout) -> str | None:
    """Why `config` (the config.json to write) does not rebuild `plan`'s stack from `hf_config`'s
    blocks, in one line; None when every block comes back with its source's parameters."""
    from lm_eval_layers.checkpoint.sources import meta_model

    text = text_config(hf_config)
    family = getattr(text, "model_type", "this family")
    moved = computed_mismatch(text, plan, config_updates(text, layout, plan))
    if moved:
        return (f"{family} computes {', '.join(sorted(moved))} from each block's index, which no config.json field can "
                "set per block, so a checkpoint cannot hold this plan's stack; evaluate it in memory "
                "(lm_eval --model layered) or choose a plan that keeps the pattern")
    try:
        written = _as_loaded(config, hf_config)
        after = layout.find_blocks(meta_model(written))
    except Exception as e:  # noqa: BLE001 - transformers refusing the config is the answer
        return f"transformers refuses the config this plan would write for {family}: {str(e).splitlines()[0][:200]}"
    before = layout.find_blocks(meta_model(hf_config))
    if after is None or before is None or len(after) != len(plan.slots):
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
