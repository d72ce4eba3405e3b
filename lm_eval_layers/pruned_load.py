"""Load only the blocks a plan keeps: the plugin's memory equals `hf` on the pruned folder.

A plan given when the model is built that only removes whole blocks (`drop=20-27`, `keep=`, a
search's plan file) is written with the checkpoint writer, in a child process, to a temporary folder (streamed, proven
on the narrow twin and checked before the first byte, exactly what `surgery prune` writes) and
lm-eval loads that folder; the folder is deleted once the weights are in memory. The dropped
blocks are never held, so a GPU user pays for the pruned model only. Plans that add or change
blocks, repaired plans, adapters and `keep_base=True` (switching plans with `use_plan`) load the
whole model and apply the plan in memory instead.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch

from lm_eval_layers.errors import LayersError, UsageError
from lm_eval_layers.plan import LayerPlan

# hf arguments under which the model loaded is not the checkpoint's blocks as stored
_NEEDS_WHOLE_MODEL = ("peft", "delta", "revision", "subfolder", "trust_remote_code")


def only_removes_blocks(plan: LayerPlan) -> bool:
    """Whether the plan keeps a strict subset of the original blocks, in order, unchanged."""
    sources = [slot.source for slot in plan.slots]
    plain = all(not (s.synthesized or s.drop_attn or s.drop_mlp) for s in plan.slots)
    return plain and plan.repair is None and len(sources) < plan.num_layers and sources == sorted(set(sources))


def loads_pruned(pretrained: Any, plan: LayerPlan, kwargs: dict[str, Any], keep_base: bool) -> bool:
    """Whether the model is loaded without the blocks `plan` removes."""
    whole = keep_base or not isinstance(pretrained, str) or any(kwargs.get(k) for k in _NEEDS_WHOLE_MODEL)
    return not whole and only_removes_blocks(plan)


@contextlib.contextmanager
def pruned_folder(pretrained: str, gguf_file: str | None, plan: LayerPlan, dtype: Any) -> Iterator[Path]:
    """The plan's variant of `pretrained` written to a temporary folder, removed on exit.
    `dtype`: the hf `dtype` argument (the weights are written in it, so loading converts nothing).

    The writer runs in a child process: reading a checkpoint's metadata (a GGUF's tokenizer and
    config through transformers) and streaming it costs hundreds of MB that a process keeps after
    freeing them, and this process is about to hold the model. Its progress goes to stderr; a
    user's mistake comes back as the same `LayersError` line."""
    source = str(Path(pretrained) / gguf_file) if gguf_file else pretrained
    dtype_name = str(dtype).removeprefix("torch.") if dtype not in (None, "auto") else ""
    work = Path(tempfile.mkdtemp(prefix="lm-eval-layers-"))
    try:
        out = work / "variant"
        child = subprocess.run([sys.executable, "-m", __name__, source, json.dumps(plan.to_dict()), dtype_name, str(out)],
                               stdout=subprocess.PIPE, text=True)
        answer = json.loads(child.stdout.strip().splitlines()[-1]) if child.stdout.strip() else {}
        if child.returncode != 0 or "error" in answer:
            raise UsageError(answer.get("error") or f"writing the kept blocks failed (exit code {child.returncode})")
        yield out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _write(source: str, plan_json: str, dtype_name: str, out: str) -> None:
    from tqdm import tqdm

    from lm_eval_layers.checkpoint.sources import open_model
    from lm_eval_layers.checkpoint.writer import write_variant

    bar = tqdm(total=None, desc="Writing the blocks the plan keeps", unit="B", unit_scale=True)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    try:
        write_variant(open_model(source), LayerPlan.from_dict(json.loads(plan_json)), Path(out), command="layered",
                      metadata=False, dtype=getattr(torch, dtype_name) if dtype_name else None, progress=progress)
    except LayersError as e:
        print(json.dumps({"error": str(e).splitlines()[0]}))
        return
    finally:
        bar.close()
    print(json.dumps({"out": out}))


if __name__ == "__main__":
    _write(*sys.argv[1:5])
