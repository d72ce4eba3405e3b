"""Reading a `surgery score` output (scores.json; schema in `importance/scoring.py`) for plans
that drop the lowest-valued units (`scores=PATH,drop_lowest=K`, `surgery prune --scores`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lm_eval_layers.errors import ScoresFileError


@dataclass(frozen=True)
class Scores:
    """The per-unit values of one scored model, in unit order (attn0, mlp0, attn1, … for halves)."""

    unit: str
    num_layers: int
    model_type: str | None
    values: tuple[float, ...]

    def lowest(self, k: int) -> tuple[int, ...]:
        """Indices of the k lowest-valued units (ties: lower index first), sorted."""
        order = sorted(range(len(self.values)), key=lambda i: (self.values[i], i))
        return tuple(sorted(order[:k]))


def read_scores(path: str | Path) -> Scores:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        units = sorted(data["units"], key=lambda u: int(u["index"]))
        return Scores(str(data["unit"]), int(data["num_layers"]), data.get("model_type"),
                      tuple(float(u["value"]) for u in units))
    except FileNotFoundError:
        raise ScoresFileError(f"scores file {path} does not exist; run `surgery score MODEL --out {path}` first") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, OSError):
        raise ScoresFileError(f"{path} is not a scores file of `surgery score` (needs unit, num_layers, units)") from None


def load_scores(plan_args: dict[str, Any]) -> dict[str, Any]:
    """Plan arguments with a scores file path (`scores=PATH`) replaced by its contents."""
    path = plan_args.get("scores")
    if path is None or isinstance(path, Scores):
        return plan_args
    return {**plan_args, "scores": read_scores(path)}
