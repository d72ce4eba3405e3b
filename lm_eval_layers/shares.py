"""The one reading of a share on the command line: `75%` or `0.75`, never 0.75 %.

A bare number above 1 is refused rather than guessed (`--params 75` could mean 75 % or a typo for
0.75); every option that takes a share (`search --params`, `train --top`, `train --freeze-bottom`)
reads it here, so the same text means the same share everywhere."""

from __future__ import annotations

from lm_eval_layers.errors import LayersError, UsageError


def parse_share(option: str, text: str, *, allow_whole: bool = True, allow_none: bool = False,
                error: type[LayersError] = UsageError) -> float:
    """`30%` or `0.3` -> 0.3. `allow_whole`: 100% is allowed; `allow_none`: 0% is allowed."""
    value = str(text).strip()
    try:
        share = float(value[:-1]) / 100 if value.endswith("%") else float(value)
    except ValueError:
        raise error(f"{option} {text!r} is not a share; write it like 30% or 0.3") from None
    if not value.endswith("%") and share > 1:
        raise error(f"{option} {text}: a bare number is a fraction (0.3 = 30%); write {value}% for {value} percent")
    low_ok = share > 0 or (allow_none and share == 0)
    high_ok = share < 1 or (allow_whole and share == 1)
    if not (low_ok and high_ok):
        bounds = f"{'[' if allow_none else '('}0, 100%{']' if allow_whole else ')'}"
        raise error(f"{option} {text} is outside {bounds}; give a share like 30%")
    return share
