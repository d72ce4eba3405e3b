"""GGUF in → GGUF out: a plan's variant of a GGUF file written as a GGUF file for llama.cpp, its
quantisation kept.

Kept and copied blocks' tensors are copied as their stored bytes (Q4_1 stays Q4_1, never
dequantised), renumbered `blk.N.*`, streamed from the memory-mapped input; every other tensor and
every metadata field (tokenizer, chat template) is carried over with its type and the input's
alignment. Every `{arch}.*` array as long as the block count follows the plan, `block_count` is
rewritten, and `lm_eval_layers.layer_plan` records what was done.

A zeroed projection (`copy-zero`, `drop_attn`, `drop_mlp`) is written as F32 zeros, exactly the
identity in any runtime. Plans that change values (`avg`, repairs) are refused: re-quantising
would be a second, silent loss; write safetensors for them. llama.cpp derives some behaviour from
a block's index or the block count with no key to rewrite (Gemma 2/3's local/global pattern,
Gemma's type from its depth, DeepSeek-2 lite at 27 blocks, MTP blocks at the end), so only the
families whose loader derives nothing from them are written; any other is refused in one line.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from lm_eval_layers.errors import PlanError, UsageError
from lm_eval_layers.plan import LayerPlan, PlanSpec

# llama.cpp families whose loader reads every per-layer property from keys or per-layer arrays and
# uses the block count only to name the model's size (`type`, a label): checked in load_hparams of
# llama.cpp's llama-model.cpp for these two; any other family is refused until it is checked.
FAMILIES = ("llama", "qwen2")
PLAN_KEY = "lm_eval_layers.layer_plan"  # the plan written into the file (JSON), so it says what was done
_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")
_OUTPUTS = {"attn": ("attn_output.weight", "attn_output.bias"), "mlp": ("ffn_down.weight", "ffn_down.bias")}


@dataclass(frozen=True)
class WrittenGGUF:
    out: Path
    plan: LayerPlan
    bytes: int
    seconds: float
    zeroed: list[str]  # tensors written as F32 zeros
    files: tuple[str, ...] = ()
    max_logit_diff: None = None  # as `Written`: GGUF output is not reloaded to compare


def gguf_problem(reader: Any, plan: LayerPlan) -> str | None:
    """Why this plan cannot be written as GGUF for this file, or None."""
    arch = _arch(reader)
    if arch not in FAMILIES:
        return (f"GGUF output supports {', '.join(FAMILIES)} (llama.cpp derives no behaviour of theirs from a block's "
                f"index or count); {arch} is not one of them: write safetensors (an --out folder) instead")
    if plan.repair is not None:
        return "a repair changes values, which GGUF output would have to re-quantise; write safetensors for a repaired plan"
    for slot in plan.slots:
        if slot.synthesized and len(slot.sources) > 1:
            return "avg blocks change values, which GGUF output would have to re-quantise; use copy / copy-zero, or write safetensors"
    return None


def write_gguf(source: Path, plan: LayerPlan | PlanSpec, out: Path, *, force: bool = False,
               progress: Callable[[int, int], None] = lambda done, total: None) -> WrittenGGUF:
    """Write `plan`'s variant of the GGUF file `source` to the GGUF file `out` (atomically); a
    `PlanSpec` is resolved against the file's block count (its header is read once: seconds)."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter

    start = time.perf_counter()
    reader = GGUFReader(str(source))
    arch = _arch(reader)
    depth = int(reader.fields[f"{arch}.block_count"].contents())
    if isinstance(plan, PlanSpec):
        plan = plan.resolve(depth)
    if depth != plan.num_layers:
        raise PlanError(f"the plan is for {plan.num_layers} blocks but {source} has {depth}")
    problem = gguf_problem(reader, plan)
    if problem:
        raise UsageError(problem)
    blocks: dict[int, list[Any]] = {}
    others_before, others_after = [], []
    for t in reader.tensors:
        m = _BLOCK.match(t.name)
        if m:
            blocks.setdefault(int(m.group(1)), []).append(t)
        else:
            (others_after if blocks else others_before).append(t)

    # (name, source tensor or None for F32 zeros of its shape, the tensor it has the shape of)
    planned: list[tuple[str, Any, bool]] = [(t.name, t, False) for t in others_before]
    zeroed = []
    for k, slot in enumerate(plan.slots):
        gone = {half for half, flag in (("attn", slot.drop_attn or slot.zero_out), ("mlp", slot.drop_mlp or slot.zero_out)) if flag}
        for t in blocks[slot.source]:
            rel = _BLOCK.match(t.name).group(2)
            zero = any(rel in _OUTPUTS[half] for half in gone)
            planned.append((f"blk.{k}.{rel}", t, zero))
            if zero:
                zeroed.append(f"blk.{k}.{rel}")
    planned += [(t.name, t, False) for t in others_after]

    out = Path(out).expanduser()
    tmp = Path(tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)[1])
    try:
        writer = GGUFWriter(str(tmp), arch)
        writer.data_alignment = reader.alignment
        for field in reader.fields.values():
            if field.name == "general.architecture" or field.name.startswith("GGUF."):
                continue  # the writer's own
            kind = field.types[0]
            sub = field.types[-1] if kind == GGUFValueType.ARRAY else None
            value = field.contents()
            if field.name == f"{arch}.block_count":
                value = len(plan.slots)
            elif kind == GGUFValueType.ARRAY and field.name.startswith(f"{arch}.") and len(value) == depth:
                value = [value[slot.source] for slot in plan.slots]  # a per-layer array follows the plan
            writer.add_key_value(field.name, value, kind, sub_type=sub)
        writer.add_key_value(PLAN_KEY, json.dumps(plan.to_dict()), GGUFValueType.STRING)
        total = 0
        for name, t, zero in planned:
            if zero:
                shape = tuple(reversed([int(d) for d in t.shape]))
                writer.add_tensor_info(name, shape, np.dtype(np.float32), 4 * int(np.prod(shape)), GGMLQuantizationType.F32)
                total += 4 * int(np.prod(shape))
            else:
                writer.add_tensor_info(name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
                total += int(t.data.nbytes)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        done = 0
        for name, t, zero in planned:
            data = np.zeros(tuple(reversed([int(d) for d in t.shape])), dtype=np.float32) if zero else t.data
            writer.write_tensor_data(data, tensor_endianess=reader.endianess)
            done += int(data.nbytes)
            progress(done, total)
        writer.close()
        if out.exists() and not force:
            raise UsageError(f"--out {out} exists; choose another name or pass --force to replace it")
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o666 & ~umask)  # mkstemp's 0600 would make the result private
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return WrittenGGUF(out.resolve(), plan, out.stat().st_size, time.perf_counter() - start, zeroed, (out.name,))


def _arch(reader: Any) -> str:
    return str(reader.fields["general.architecture"].contents())
