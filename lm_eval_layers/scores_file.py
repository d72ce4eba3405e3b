"""Reading a `surgery score` output (scores.json; schema in `importance/scoring.py`) for plans
that drop the lowest-valued units (`scores=PATH,drop_lowest=K`, `surgery prune --scores`).
Only unit, num_layers, model_type and the units' index and value are read; any other key may be
null (angular / bi write null for the values a game has and they do not)."""

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

    def lowest_for(self, k: int, num_layers: int, model_type: str | None) -> tuple[int, ...]:
        """The k lowest units, for a model with `num_layers` blocks of `model_type`. A file of
        another depth or architecture is refused first: its unit count says nothing about this
        model, so "K would remove every unit" would name the wrong mistake."""
        if self.num_layers != num_layers:
            raise ScoresFileError(f"the scores file is for a model with {self.num_layers} blocks, this one has "
                                  f"{num_layers}; score this model with `surgery score`")
        if self.model_type and model_type and self.model_type != model_type:
            raise ScoresFileError(f"the scores file is for a {self.model_type} model, this one is {model_type}; "
                                  "score this model with `surgery score`")
        if k >= len(self.values):
            raise ScoresFileError(f"drop_lowest={k} would remove all {len(self.values)} {self.unit} units; drop fewer")
        return self.lowest(k)


def read_scores(path: str | Path) -> Scores:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        units = sorted(data["units"], key=lambda u: int(u["index"]))
        missing = [u.get("name", u["index"]) for u in units if u.get("value") is None]
        if missing:
            raise ScoresFileError(f"{path} has no value for unit {missing[0]}; score the model again with `surgery score`")
        return Scores(str(data["unit"]), int(data["num_layers"]), data.get("model_type"),
                      tuple(float(u["value"]) for u in units))
    except ScoresFileError:
        raise
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
