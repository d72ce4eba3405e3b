"""Calibration text and its windows, for every method that measures on text (angular, bi,
search objectives, fitted repairs).

The text is a file named by `--calibration`, or the local WikiText-2 test text under the data
folder; what was used is recorded by path and digest. Windows are N slices of T tokens of
`tokenizer(text).input_ids`: seed 0 takes the first N consecutive slices from the start of the
text; another seed draws N of the text's non-overlapping slices at random, so a result can be
checked on other windows of the same text.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lm_eval_layers.errors import UsageError
from lm_eval_layers.settings import option

WIKITEXT = Path("wikitext2") / "wiki.test.raw"

_SHAPE = re.compile(r"^\s*(\d+)\s*[xX×]\s*(\d+)\s*$")


def parse_shape(text: str, flag: str = "--tokens") -> tuple[int, int]:
    """`64x256` -> (64 windows, 256 tokens each)."""
    m = _SHAPE.match(text)
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 2:
        raise UsageError(f"{flag} {text!r}: write WINDOWSxTOKENS with at least 1 window of 2 tokens, e.g. 32x256")
    return int(m.group(1)), int(m.group(2))


def calibration_option(help: str = "text file (default: the local WikiText-2 test text)") -> Any:
    """The `--calibration` field of a command's settings (declared here once)."""
    return option(None, "--calibration", help)


def tokens_option(default: str, purpose: str = "") -> Any:
    """The `--tokens WINDOWSxTOKENS` field; each command picks its default (how many tokens it
    needs differs: a search ranks candidates, a fitted map has d² parameters)."""
    return option(default, "--tokens", "calibration windows × tokens per window, e.g. 32x256" + (f" ({purpose})" if purpose else ""))


def seed_option() -> Any:
    """The `--seed` field that picks the calibration windows."""
    return option(0, "--seed", "calibration windows: 0 takes the first ones of the text, another seed draws others")


@dataclass(frozen=True)
class CalibrationText:
    path: Path
    text: str
    sha256: str


def calibration_file(path: Path | None) -> Path:
    """The file to read: `path`, or the local WikiText under the data folder (checked before
    any model loads)."""
    from lm_eval_layers.task_data import ENV

    if path is not None:
        if not path.is_file():
            raise UsageError(f"--calibration {path} does not exist; give a text file")
        if not path.read_bytes().strip():
            raise UsageError(f"--calibration {path} is empty; give a text file (a few thousand words at least)")
        return path
    root = os.environ.get(ENV)
    raw = Path(root) / WIKITEXT if root else None
    if raw is None or not raw.is_file():
        raise UsageError(f"no calibration text: pass --calibration FILE or set {ENV} to a data folder with wikitext2/")
    return raw


def read_calibration(path: Path | None) -> CalibrationText:
    file = calibration_file(path).resolve()
    data = file.read_bytes()
    return CalibrationText(file, data.decode("utf-8"), hashlib.sha256(data).hexdigest())


def calibration_windows(tokenizer: Any, text: str, count: int, tokens: int, seed: int = 0, exact: bool = True) -> Any:
    """A [count, tokens] tensor of token ids. `exact`: refused when the text holds fewer than
    count × tokens; otherwise as many windows as it holds, up to `count` (at least one)."""
    import torch

    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    available = len(ids) // tokens
    if not exact and available >= 1:
        count = min(count, available)
    if available < count or available == 0:
        raise UsageError(f"the calibration text has {len(ids):,} tokens, fewer than {count} windows × {tokens} tokens; "
                         "give a longer text (--calibration) or fewer/shorter windows (--tokens)")
    if seed == 0:
        starts = torch.arange(count)
    else:
        starts = torch.randperm(available, generator=torch.Generator().manual_seed(seed))[:count].sort().values
    return torch.stack([ids[s * tokens:(s + 1) * tokens] for s in starts.tolist()])
