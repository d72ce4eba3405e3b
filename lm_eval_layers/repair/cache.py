"""Fitted maps kept on disk, so a sweep over tasks or a second `surgery prune` does not refit.

A file answers only for its key: a digest of the model's identity (files fingerprinted, dtype
and loading settings), the resolved plan (its repair record carries the calibration text's
sha256, the windows and the method) and the fit's version. Safetensors, written atomically.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from lm_eval_layers.identity import digest

ENV = "LM_EVAL_LAYERS_CACHE"
FIT_VERSION = 1  # bump when the fit's arithmetic changes: old files then never answer


def cache_dir() -> Path:
    """$LM_EVAL_LAYERS_CACHE, else $XDG_CACHE_HOME/lm_eval_layers, else ~/.cache/lm_eval_layers."""
    root = os.environ.get(ENV) or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lm_eval_layers"
    return Path(root) / "repair"


def cache_key(identity: dict[str, Any], plan: dict[str, Any]) -> str:
    return digest({"identity": identity, "plan": plan, "version": FIT_VERSION})


def load(key: str) -> tuple[dict[int, torch.Tensor], list[dict[str, Any]]] | None:
    """The maps (by the block they fold into) and the fit's report, or None if not cached."""
    from safetensors import safe_open

    path = cache_dir() / f"{key}.safetensors"
    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as f:
        transforms = {int(name.removeprefix("block.")): f.get_tensor(name) for name in f.keys()}
        report = json.loads((f.metadata() or {}).get("report", "[]"))
    return transforms, report


def save(key: str, transforms: dict[int, torch.Tensor], report: list[dict[str, Any]]) -> None:
    from safetensors.torch import save_file

    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".partial")
    os.close(fd)
    try:
        save_file({f"block.{k}": t.contiguous() for k, t in transforms.items()}, tmp, metadata={"report": json.dumps(report)})
        os.replace(tmp, folder / f"{key}.safetensors")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
