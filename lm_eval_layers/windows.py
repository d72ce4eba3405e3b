"""Calibration windows: N slices of T tokens of `tokenizer(text).input_ids`. Seed 0 takes the
first N consecutive slices from the start of the text (the rule of `surgery score --method
angular --calibration`); another seed draws N of the text's non-overlapping slices at random, so
a result can be checked on other windows of the same text."""

from __future__ import annotations

import re
from typing import Any

from lm_eval_layers.errors import UsageError

_SHAPE = re.compile(r"^\s*(\d+)\s*[xX×]\s*(\d+)\s*$")


def parse_shape(text: str, flag: str = "--tokens") -> tuple[int, int]:
    """`64x256` -> (64 windows, 256 tokens each)."""
    m = _SHAPE.match(text)
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 2:
        raise UsageError(f"{flag} {text!r}: write WINDOWSxTOKENS with at least 1 window of 2 tokens, e.g. 32x256")
    return int(m.group(1)), int(m.group(2))


def calibration_windows(tokenizer: Any, text: str, count: int, tokens: int, seed: int = 0) -> Any:
    """A [count, tokens] tensor of token ids; refused when the text holds fewer than count × tokens."""
    import torch

    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    available = len(ids) // tokens
    if available < count:
        raise UsageError(f"the calibration text has {len(ids):,} tokens, fewer than {count} windows × {tokens} tokens; "
                         "give a longer text or fewer/shorter windows")
    if seed == 0:
        starts = torch.arange(count)
    else:
        starts = torch.randperm(available, generator=torch.Generator().manual_seed(seed))[:count].sort().values
    return torch.stack([ids[s * tokens:(s + 1) * tokens] for s in starts.tolist()])
