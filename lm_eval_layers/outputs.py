"""Files and folders a command writes, and the checks made before any work starts: never
overwrite without `--force`, never write inside the input model, and put a result in place only
when it is complete (a temporary sibling renamed at the end), so a failure or Ctrl-C leaves the
earlier state untouched."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from lm_eval_layers.errors import UsageError


def check_folder(out: Path, force: bool, inside: Path | None = None, flag: str = "--out") -> Path:
    """The resolved output folder, or a one-line refusal: a file in its place, a non-empty
    folder without `force`, or a folder inside `inside` (the input model's)."""
    out = out.expanduser().resolve()
    if inside is not None:
        src = inside.expanduser().resolve()
        if out == src or src in out.parents:
            raise UsageError(f"{flag} {out} is inside the input model folder {src}; write somewhere else")
    if out.exists() and not out.is_dir():
        raise UsageError(f"{flag} {out} is an existing file; choose a folder path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UsageError(f"{flag} {out} exists and is not empty; choose another folder or pass --force to replace it")
    return out


def check_file(path: Path, force: bool, flag: str = "--out") -> Path:
    """An output file that may be written: refused if it exists (unless `force`) or is a folder."""
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a folder; give a file name")
    if path.exists() and not force:
        raise UsageError(f"{flag} {path} exists; choose another name or pass --force to replace it")
    return path


def swap_into_place(ready: Path, out: Path) -> None:
    """Rename the finished folder `ready` to `out`; an existing `out` is renamed aside first and
    removed only after the swap, so some complete folder is always at `out`."""
    trash = out.with_name(f".{out.name}.replaced-{os.getpid()}")
    if out.exists():
        out.rename(trash)
    ready.rename(out)
    shutil.rmtree(trash, ignore_errors=True)


def write_json(path: Path, document: Any) -> None:
    """Write JSON atomically (a reader never sees half a file). NaN and infinities are refused:
    they are not JSON; write None for a value that does not exist."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(document, indent=2, allow_nan=False) + "\n")
    tmp.replace(path)
