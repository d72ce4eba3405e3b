"""Load only the blocks a plan keeps: the plugin's memory equals `hf` on the pruned folder.

A plan given when the model is built that only removes whole blocks (`drop=20-27`, `keep=`, a
search's plan file) is written with the checkpoint writer to a temporary folder (streamed, proven
on the narrow twin and checked before the first byte, exactly what `surgery prune` writes) and
lm-eval loads that folder; the folder is deleted once the weights are in memory. The dropped
blocks are never held, so a GPU user pays for the pruned model only. Plans that add or change
blocks, repaired plans, adapters and `keep_base=True` (switching plans with `use_plan`) load the
whole model and apply the plan in memory instead.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch

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
def pruned_folder(pretrained: str, gguf_file: str | None, plan: LayerPlan, dtype: Any,
                  progress: Any = lambda done, total: None) -> Iterator[Path]:
    """The plan's variant of `pretrained` written to a temporary folder, removed on exit.
    `dtype`: the hf `dtype` argument (the weights are written in it, so loading converts nothing)."""
    from lm_eval_layers.checkpoint.sources import open_model
    from lm_eval_layers.checkpoint.writer import write_variant

    source = open_model(str(Path(pretrained) / gguf_file) if gguf_file else pretrained)
    out_dtype = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
    work = Path(tempfile.mkdtemp(prefix="lm-eval-layers-"))
    try:
        written = write_variant(source, plan, work / "variant", command="layered", metadata=False,
                                dtype=out_dtype if isinstance(out_dtype, torch.dtype) else None, progress=progress)
        yield written.out
    finally:
        shutil.rmtree(work, ignore_errors=True)
