"""Write a layer plan's variant as a Hugging Face checkpoint, streaming tensor by tensor.

The output is planned first (every tensor's name, dtype, shape and recipe), then executed one
tensor at a time: kept tensors are copied as raw bytes where the dtype does not change,
synthesised ones (`avg`, zeroed projections, a repair's folded down projections) are computed
from their sources. Peak memory is
one or two tensors, whatever the model's size. Everything is written into a temporary sibling
folder that is renamed to `--out` only when complete, so a failure or Ctrl-C leaves nothing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import torch

from lm_eval_layers import __version__
from lm_eval_layers.checkpoint import NEW_PARAMS_FILE, PLAN_FILE
from lm_eval_layers.compat.stored_names import loaded_name
from lm_eval_layers.arch import Layout, check_plan, config_updates, text_config
from lm_eval_layers.default_model import ALIAS, HUB_ID
from lm_eval_layers.plan import LayerPlan, Slot
from lm_eval_layers.recipes import is_zeroed, synthesize
from lm_eval_layers.errors import UsageError
from lm_eval_layers.outputs import check_folder, swap_into_place
from lm_eval_layers.checkpoint.structure import written_problem
from lm_eval_layers.checkpoint.safetensors_io import copy_bytes, write_header, write_tensor
from lm_eval_layers.checkpoint.sources import Source, TensorInfo, free_bytes, is_weight_file, source_layout, source_meta

if TYPE_CHECKING:
    from lm_eval_layers.repair.fit import Fit

@dataclass(frozen=True)
class OutTensor:
    """One tensor of the output and how to make it."""

    name: str
    info: TensorInfo
    sources: tuple[str, ...]  # checkpoint names it is made from
    slot: Slot | None = None  # None: outside the block stack (embeddings, final norm, head)
    rel: str = ""  # name relative to its block
    copy_of: str | None = None  # set when the tensor is an unchanged source tensor
    transform: torch.Tensor | None = field(default=None, compare=False, repr=False)  # a repair's map, folded in
    role: str = ""  # the name the loaded model gives it, relative to its block (what recipes are decided by)


def block_prefix(names: list[str], layout: Layout) -> str:
    """The checkpoint's prefix of block tensors: `model.layers.`, a suffix of it (some files omit
    the outer part), or the same list under another parent (a multimodal wrapper's language model
    is `model.language_model.layers` in memory and `language_model.model.layers` in older files)."""
    parts = layout.blocks.split(".")
    for start in range(len(parts)):
        prefix = ".".join(parts[start:]) + "."
        if any(n.startswith(prefix + "0.") for n in names):
            return prefix
    leaf = re.escape(parts[-1])
    found = sorted({m.group(1) for n in names if (m := re.match(rf"^(.*\b{leaf}\.)0\.", n))})
    found = [f for f in found if not _TOWER.search(f)]
    if len(found) == 1:
        return found[0]
    raise UsageError(f"no block tensors named {layout.blocks}.N.* in the checkpoint; is it a {layout.blocks} model?")


_TOWER = re.compile(r"(vision|visual|audio|image|vit|speech|encoder)")


def plan_tensors(source: Source, plan: LayerPlan, layout: Layout, dtype: torch.dtype | None,
                 transforms: dict[int, torch.Tensor] | None = None) -> list[OutTensor]:
    """Every output tensor, in order, with its recipe; checks that the plan can be built.
    `transforms`: a repair's fitted maps, by the original block whose down projection takes one."""
    from lm_eval_layers.repair.fold import folded_names

    if (plan.repair is None) != (transforms is None):
        raise ValueError("a repaired plan is written with its fitted maps (and only a repaired plan)")
    folded = folded_names(layout) if transforms else ()
    layout.check(plan)
    names = list(source.infos)
    prefix = block_prefix(names, layout)
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.(.+)$")
    blocks: dict[int, dict[str, str]] = {}
    outside_before: list[str] = []
    outside_after: list[str] = []
    for name in names:
        m = pattern.match(name)
        if m:
            blocks.setdefault(int(m.group(1)), {})[m.group(2)] = name
        else:
            (outside_after if blocks else outside_before).append(name)
    if sorted(blocks) != list(range(plan.num_layers)):
        raise UsageError(
            f"the checkpoint has tensors for {len(blocks)} blocks but its config says {plan.num_layers}; the checkpoint is incomplete"
        )

    def out_info(name: str) -> TensorInfo:
        info = source.infos[name]
        if dtype is not None and info.dtype.is_floating_point:
            return TensorInfo(dtype, info.shape)
        return info

    out = [OutTensor(n, out_info(n), (n,), copy_of=n) for n in outside_before]
    for k, slot in enumerate(plan.slots):
        own = blocks[slot.source]
        for j in slot.sources[1:]:
            other = blocks[j]
            if set(other) != set(own) or any(source.infos[own[r]] != source.infos[other[r]] for r in own):
                raise UsageError(
                    f"cannot average blocks {slot.source} and {j}: their tensors differ in names or shapes; use copy instead"
                )
        for rel, name in own.items():
            srcs = tuple(blocks[j][rel] for j in slot.sources)
            transform = transforms.get(slot.source) if transforms and rel in folded else None
            role = stored_role(source, layout, rel)
            plain = len(srcs) == 1 and not is_zeroed(layout, slot, role) and transform is None
            out.append(OutTensor(f"{prefix}{k}.{rel}", out_info(name), srcs, slot, rel, name if plain else None, transform, role))
    out += [OutTensor(n, out_info(n), (n,), copy_of=n) for n in outside_after]
    return out


def stored_role(source: Source, layout: Layout, rel: str) -> str:
    """The name by which a stored block tensor's recipe is decided: its own where the layout names it
    (the table's stored names), else the name transformers gives it on load (`compat.loaded_name`)."""
    if layout.is_output(rel):
        return rel
    return loaded_name(source.config.get("model_type", ""), rel)


def _make(source: Source, layout: Layout, t: OutTensor) -> torch.Tensor:
    if t.copy_of is not None:
        tensor = source.tensor(t.copy_of)
    elif t.transform is not None:
        from lm_eval_layers.repair.fold import fold

        return fold(source.tensor(t.sources[0]).to(t.info.dtype), t.transform, t.rel, layout)
    else:
        assert t.slot is not None
        tensor = synthesize(layout, t.slot, t.role, [source.tensor(n) for n in t.sources])
    return tensor.to(t.info.dtype)


def shard(tensors: list[OutTensor], max_shard_size: int) -> list[list[OutTensor]]:
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.info.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.info.nbytes
    return shards


def write_weights(
    folder: Path, source: Source, layout: Layout, tensors: list[OutTensor], max_shard_size: int,
    progress: Callable[[int], None] = lambda n: None,
) -> list[str]:
    """Write the safetensors shard(s) (and index when sharded); returns the file names."""
    groups = shard(tensors, max_shard_size)
    files = ["model.safetensors"] if len(groups) == 1 else [
        f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))
    ]
    for file, group in zip(files, groups):
        with (folder / file).open("wb") as f:
            write_header(f, [(t.name, t.info.dtype, t.info.shape) for t in group])
            for t in group:
                raw = source.raw(t.copy_of) if t.copy_of is not None else None
                if raw is not None and t.info == source.infos[t.copy_of]:
                    copy_bytes(f, raw)
                else:
                    write_tensor(f, _make(source, layout, t))
                progress(t.info.nbytes)
    if len(groups) > 1:
        index = {
            "metadata": {"total_size": sum(t.info.nbytes for t in tensors)},
            "weight_map": {t.name: file for file, group in zip(files, groups) for t in group},
        }
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return files


def planned_config(source: Source, plan: LayerPlan, layout: Layout, dtype: torch.dtype | None) -> dict:
    """config.json with every layer-describing field made consistent with the plan."""
    config = json.loads(json.dumps(source.config))
    config.pop("_name_or_path", None)  # where the input was read from (a GGUF: site-packages); not this folder
    target = config
    if not any(k in config for k in layout.count_keys):
        target = config.get("text_config", config)
    target.update(config_updates(text_config(source.hf_config), layout, plan))
    if not config.get("architectures"):  # GGUF-derived configs lack it; mergekit and the hub need it
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.get("model_type", ""))
        if name:
            config["architectures"] = [name]
    if dtype is not None or "dtype" not in config:
        out_dtype = dtype or next(iter(source.infos.values())).dtype
        config["dtype"] = str(out_dtype).removeprefix("torch.")
        config.pop("torch_dtype", None)
    return config


def write_config(folder: Path, config: dict) -> None:
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def copy_side_files(folder: Path, source: Source) -> None:
    """Tokenizer, generation config and other small files; GGUF sources get them converted."""
    if source.folder is not None:
        for path in source.folder.iterdir():
            if path.is_file() and not is_weight_file(path) and path.name not in ("config.json", "README.md", PLAN_FILE, NEW_PARAMS_FILE):
                shutil.copy2(path, folder / path.name)
        return
    import transformers

    gguf = source.path  # type: ignore[attr-defined]
    transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(folder)
    transformers.GenerationConfig.from_model_config(source.hf_config).save_pretrained(folder)  # type: ignore[attr-defined]


def write_metadata(folder: Path, title: str, source: Source, plan: LayerPlan, layout: Layout, command: str,
                   dtype: torch.dtype | None, repair_fit: list[dict] | None = None) -> None:
    """The plan file, the model card, and (for expansions) the parameters to train."""
    record = {
        "tool": "lm-eval-layers", "version": __version__, "command": command, "base_model": source.name,
        "description": plan.describe(), "dtype": str(dtype).removeprefix("torch.") if dtype else "unchanged",
        "plan": plan.to_dict(),
    }
    if repair_fit is not None:
        record["repair_fit"] = repair_fit  # per dropped run: the block folded into, tokens, residual vs plain drop
    (folder / PLAN_FILE).write_text(json.dumps(record, indent=2) + "\n")
    new = plan.new_slots
    if new:
        (folder / NEW_PARAMS_FILE).write_text(json.dumps({
            "layers_to_transform": list(new),  # peft.LoraConfig(layers_to_transform=..., layers_pattern=...)
            "layers_pattern": layout.blocks.split(".")[-1],
            # freeze everything else: p.requires_grad = name in parameter_names
            "parameter_names": new_parameter_names(source, plan, layout),
        }, indent=2) + "\n")
    kind = "expanded" if new else "pruned"
    rows = "\n".join(f"| {k} | {s.describe()} |" for k, s in enumerate(plan.slots))
    card = f"""---
base_model: {base_model(source)}
library_name: transformers
tags:
- lm-eval-layers
- layer-surgery
- {kind}
---

# {title}

A {kind} variant of `{source.name}` written by lm-eval-layers {__version__} (`surgery {command}`).

**Plan:** {plan.describe()}.

The same variant is evaluated in memory, without writing a checkpoint, by
`lm_eval --model layered --model_args pretrained={source.name},...`; this folder loads with
`AutoModelForCausalLM.from_pretrained` and `lm_eval --model hf` unchanged. Removed attention or
MLP branches are stored as zeroed output projections, which compute the same values.
{"New blocks (to train in LLaMA-Pro / Llama SLayer recipes) are listed in `" + NEW_PARAMS_FILE + "`." if new else ""}
{_repair_note(plan, repair_fit)}

| position | block (original index or recipe) |
|---|---|
{rows}
"""
    (folder / "README.md").write_text(card)


def _repair_note(plan: LayerPlan, fit: list[dict] | None) -> str:
    """The model card's account of a repair: what was fitted where, on which text."""
    if plan.repair is None or not fit:
        return ""
    r = plan.repair
    runs = "; ".join(f"blocks {f['blocks'][0]}-{f['blocks'][1]} -> a map folded into block {f['folded_into']}'s down "
                     f"projection (calibration residual {f['residual_vs_drop']:.1%} of plain dropping's)" for f in fit)
    return (f"**Repair** (training-free, ReplaceMe-style, {r.method.value}): {runs}. Fitted on {r.windows}×{r.tokens} "
            f"tokens of `{Path(r.calibration).name}` (sha256 {r.sha256[:12]}…). The folded tensors are ordinary "
            "weights: the checkpoint has no new parameters.")


def new_parameter_names(source: Source, plan: LayerPlan, layout: Layout) -> list[str]:
    """Names of the new blocks' parameters in the loaded model, which is what training sees:
    transformers may rename checkpoint tensors on load (a mixture of experts' per-expert
    tensors become one fused parameter), so they come from the model's weightless module tree."""
    blocks = layout.find_blocks(source_meta(source))
    assert blocks is not None
    return [
        f"{layout.blocks}.{k}.{rel}" for k in plan.new_slots for rel, _ in blocks[plan.slots[k].source].named_parameters()
    ]


def base_model(source: Source) -> str:
    """The model card's `base_model`: for a folder this tool wrote, the model its plan file
    records, followed back through earlier outputs of this tool (a pruned model's healed
    version names the original, not the pruned folder); a hub id where one is known."""
    name, folder, seen = source.name, source.folder, set()
    while folder is not None and (Path(folder) / PLAN_FILE).is_file() and Path(folder) not in seen:
        seen.add(Path(folder))
        recorded = json.loads((Path(folder) / PLAN_FILE).read_text()).get("base_model")
        if not recorded:
            break
        name, folder = recorded, Path(recorded).expanduser()
    return HUB_ID if name == ALIAS else name


@contextmanager
def atomic_output(out: Path, source: Source, force: bool, needed: int) -> Iterator[Path]:
    """A temporary sibling of `out` that becomes `out` only if the block completes."""
    out = check_folder(out, force, inside=source.folder)
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=parent))
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would make the result private
    except OSError as e:
        raise UsageError(f"cannot write in {parent} ({e.strerror}); choose another --out") from None
    try:
        if free_bytes(parent) < needed + (64 << 20):
            raise UsageError(
                f"not enough free disk space in {parent}: need {needed / 1e9:.2f} GB, have {free_bytes(parent) / 1e9:.2f} GB"
            )
        yield tmp
        swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@dataclass(frozen=True)
class Written:
    """What `write_variant` wrote."""

    out: Path
    plan: LayerPlan
    files: list[str]
    bytes: int
    seconds: float
    max_logit_diff: float | None  # from `verify`; None when not verified


def write_variant(
    source: Source, plan: LayerPlan, out: Path, *, command: str = "prune", dtype: torch.dtype | None = None,
    max_shard_size: int = 5 * 10**9, force: bool = False, verify: bool = False, metadata: bool = True,
    progress: Callable[[int, int], None] = lambda done, total: None, repair: "Fit | None" = None,
) -> Written:
    """Write `plan`'s variant of `source` to the folder `out`: weights (streamed, sharded),
    config, tokenizer and side files, and (`metadata`) the plan file and model card. Everything
    is checked before the first byte is written; `verify` compares the result with the
    in-memory variant before it is put in place. `progress(bytes_done, bytes_total)`. A repaired
    plan is written with its `repair` (`lm_eval_layers.repair.fit.fit_repair`)."""
    start = time.perf_counter()
    layout = source_layout(source)
    transforms = repair.transforms if repair is not None else None
    check_plan(plan, source.hf_config)
    tensors = plan_tensors(source, plan, layout, dtype, transforms)
    config = planned_config(source, plan, layout, dtype)
    loaded: dict[int, set[str]] = {}
    for t in tensors:
        if t.slot is not None:
            loaded.setdefault(t.slot.source, set()).add(loaded_name(source.config.get("model_type", ""), t.rel))
    problem = written_problem(source, config, plan, layout, {k: sorted(v) for k, v in loaded.items()})
    if problem:
        raise UsageError(problem)
    total = sum(t.info.nbytes for t in tensors)
    diff = None
    with atomic_output(out, source, force, total) as tmp:
        done = 0

        def advance(n: int) -> None:
            nonlocal done
            done += n
            progress(done, total)

        files = write_weights(tmp, source, layout, tensors, max_shard_size, advance)
        write_config(tmp, config)
        copy_side_files(tmp, source)
        if metadata:
            write_metadata(tmp, Path(out).name, source, plan, layout, command, dtype, repair.report if repair else None)
        if verify:
            from lm_eval_layers.checkpoint.verify import verify as verify_folder

            out_dtype = dtype or tensors[0].info.dtype
            exact = all(t.info.dtype == source.infos[t.sources[0]].dtype for t in tensors)
            diff = verify_folder(tmp, source, plan, out_dtype, exact, transforms)
    return Written(Path(out).expanduser().resolve(), plan, files, total, time.perf_counter() - start, diff)
