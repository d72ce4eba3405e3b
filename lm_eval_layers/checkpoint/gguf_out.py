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
import math
import mmap
import os
import re
import struct
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from lm_eval_layers.checkpoint.gguf_header import ARRAY, MAGIC, STRING, Field, Header, Tensor, encode_field, encode_string, read_header
from lm_eval_layers.errors import PlanError, UsageError
from lm_eval_layers.plan import LayerPlan, PlanSpec

# llama.cpp families whose loader reads every per-layer property from keys or per-layer arrays and
# uses the block count only to name the model's size (`type`, a label): checked in load_hparams of
# llama.cpp's llama-model.cpp for these three; any other family is refused until it is checked.
FAMILIES = ("llama", "qwen2", "qwen3")
PLAN_KEY = "lm_eval_layers.layer_plan"  # the plan written into the file (JSON), so it says what was done
_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")
_OUTPUTS = {"attn": ("attn_output.weight", "attn_output.bias"), "mlp": ("ffn_down.weight", "ffn_down.bias")}
F32 = 0  # GGML type of float32


@dataclass(frozen=True)
class WrittenGGUF:
    out: Path
    plan: LayerPlan
    bytes: int
    seconds: float
    zeroed: list[str]  # tensors written as F32 zeros
    files: tuple[str, ...] = ()
    max_logit_diff: None = None  # as `Written`: GGUF output is not reloaded to compare


def gguf_problem(arch: str, plan: LayerPlan) -> str | None:
    """Why this plan cannot be written as GGUF for a file of this llama.cpp family, or None."""
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
    `PlanSpec` is resolved against the file's block count."""
    start = time.perf_counter()
    header = read_header(source)
    arch = str(header.get("general.architecture"))
    depth = int(header.get(f"{arch}.block_count"))
    if isinstance(plan, PlanSpec):
        plan = plan.resolve(depth)
    if depth != plan.num_layers:
        raise PlanError(f"the plan is for {plan.num_layers} blocks but {source} has {depth}")
    problem = gguf_problem(arch, plan)
    if problem:
        raise UsageError(problem)
    fields = [_field(key, field, arch, depth, plan) for key, field in header.fields.items() if key != PLAN_KEY]
    plan_text = json.dumps(plan.to_dict()).encode("utf-8")
    fields.append(encode_string(PLAN_KEY) + struct.pack("<IQ", STRING, len(plan_text)) + plan_text)
    planned, zeroed = _planned_tensors(header, plan)

    infos, offset = [], 0
    for name, t, zero in planned:
        kind, nbytes = (F32, 4 * math.prod(t.dims)) if zero else (t.kind, t.nbytes)
        infos.append(encode_string(name) + struct.pack(f"<I{len(t.dims)}QIQ", len(t.dims), *t.dims, kind, offset))
        offset += nbytes + (-nbytes) % header.alignment
    out = Path(out).expanduser()
    tmp = Path(tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)[1])
    try:
        with open(tmp, "wb") as f, open(source, "rb") as src, mmap.mmap(src.fileno(), 0, access=mmap.ACCESS_READ) as m:
            f.write(MAGIC + struct.pack("<IQQ", header.version, len(planned), len(fields)))
            f.writelines(fields)
            f.writelines(infos)
            f.write(b"\0" * ((-f.tell()) % header.alignment))
            done = 0
            for name, t, zero in planned:
                size = 4 * math.prod(t.dims) if zero else t.nbytes
                if zero:
                    f.write(bytes(size))  # F32 zeros
                else:
                    _copy(m, src.fileno(), f, header.data_start + t.offset, size)
                f.write(b"\0" * ((-size) % header.alignment))
                done += size
                progress(done, offset)
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


def _field(key: str, field: Field, arch: str, depth: int, plan: LayerPlan) -> bytes:
    """A field as written: the block count rewritten, an `{arch}.*` per-layer array following the plan."""
    if key == f"{arch}.block_count":
        return encode_field(key, field, len(plan.slots))
    if field.kind == ARRAY and key.startswith(f"{arch}.") and field.count == depth:
        try:
            values = field.value()
        except ValueError:
            raise UsageError(f"{key} is a per-layer array of strings, which GGUF output does not rewrite; write safetensors") from None
        return encode_field(key, field, [values[slot.source] for slot in plan.slots])
    return encode_field(key, field)


def _planned_tensors(header: Header, plan: LayerPlan) -> tuple[list[tuple[str, Tensor, bool]], list[str]]:
    """(output name, source tensor, written as F32 zeros) in file order, and the zeroed names."""
    blocks: dict[int, list[Tensor]] = {}
    before, after = [], []
    for t in header.tensors:
        m = _BLOCK.match(t.name)
        if m:
            blocks.setdefault(int(m.group(1)), []).append(t)
        else:
            (after if blocks else before).append(t)
    planned = [(t.name, t, False) for t in before]
    zeroed = []
    for k, slot in enumerate(plan.slots):
        gone = {half for half, flag in (("attn", slot.drop_attn or slot.zero_out), ("mlp", slot.drop_mlp or slot.zero_out)) if flag}
        for t in blocks[slot.source]:
            rel = _BLOCK.match(t.name).group(2)
            zero = any(rel in _OUTPUTS[half] for half in gone)
            planned.append((f"blk.{k}.{rel}", t, zero))
            if zero:
                zeroed.append(f"blk.{k}.{rel}")
    return planned + [(t.name, t, False) for t in after], zeroed


def _copy(m: mmap.mmap, src: int, f: Any, start: int, size: int) -> None:
    """`size` bytes of the input from `start` appended to `f`: in the kernel where it can
    (copy_file_range, as cp does), the rest through the mapping (another filesystem, old kernels)."""
    if hasattr(os, "copy_file_range"):
        f.flush()
        try:
            while size:
                copied = os.copy_file_range(src, f.fileno(), size, start)
                if copied == 0:
                    break
                start, size = start + copied, size - copied
        except OSError:
            pass
        f.seek(0, os.SEEK_END)
    if size:
        f.write(m[start:start + size])
