"""The repair a plan asks for (`repair=lstsq`, `--repair cosine`), parsed and checked without a
model: the method, the ridge, and the calibration text by path and digest.

The calibration's digest is part of the plan, so every cache keyed by the plan (lm-eval's
response cache, the fitted-map cache) answers only for the text the map was fitted on.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from lm_eval_layers.errors import PlanError

DEFAULT_TOKENS = "128x256"  # from the measured curve in benchmarks/README.md (repair section)
SAFE_TOKENS_PER_DIM = 8  # fewer calibration tokens per hidden dimension than this: the fit may be worse than plain dropping (benchmarks/README.md)


class RepairMethod(str, Enum):
    lstsq = "lstsq"  # least squares on the residual stream, closed form
    cosine = "cosine"  # cosine distance to the unpruned block's output, by a bounded optimiser from lstsq


@dataclass(frozen=True)
class Repair:
    """A fitted-map repair: the same record in a plan, a `layer_plan.json` and a cache key."""

    method: RepairMethod
    ridge: float
    calibration: str  # resolved path of the text
    sha256: str
    windows: int
    tokens: int
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "method": self.method.value}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Repair:
        return cls(**{**data, "method": RepairMethod(data["method"])})

    def describe(self) -> str:
        ridge = f", ridge {self.ridge:g}" if self.ridge else ""
        return f"repaired by {self.method.value} ({self.windows}×{self.tokens} calibration tokens{ridge})"

    def check_text(self) -> None:
        """A plan read from a file names its calibration text by digest: refuse a changed text."""
        path = Path(self.calibration)
        if not path.is_file() or _sha256(path) != self.sha256:
            raise PlanError(f"the repair's calibration text {path} is missing or changed since the plan was made; "
                            "give repair= and calibration= again")


def parse_repair(method: Any, ridge: Any = None, calibration: Any = None, tokens: Any = None,
                 seed: Any = None) -> Repair | None:
    """`repair=lstsq[,ridge=A,calibration=FILE,tokens=NxT]` as the plugin and the CLI give it;
    None when no repair is asked for (then the calibration options must be absent)."""
    from lm_eval_layers.calibration import calibration_file, parse_shape

    if method is None:
        given = [k for k, v in (("ridge", ridge), ("calibration", calibration), ("tokens", tokens)) if v is not None]
        if given:
            raise PlanError(f"{', '.join(given)} set the repair's fit; add repair=lstsq or repair=cosine, or leave them out")
        return None
    name = str(method).strip().strip("'\"").lower()
    if name not in RepairMethod.__members__:
        raise PlanError(f"repair={method!r}: use repair=lstsq or repair=cosine")
    try:
        value = 0.0 if ridge is None else float(ridge)
    except (TypeError, ValueError):
        value = -1.0
    if not value >= 0:
        raise PlanError(f"ridge={ridge!r}: give a ridge of 0 or more, e.g. ridge=0.01")
    windows, length = parse_shape(str(tokens or DEFAULT_TOKENS), "tokens")
    path = calibration_file(Path(str(calibration).strip("'\"")) if calibration is not None else None).resolve()
    return Repair(RepairMethod(name), value, str(path), _sha256(path), windows, length, int(seed or 0))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def repair_runs(plan: Any) -> list[tuple[int, int]]:
    """The maximal runs a..b of dropped whole blocks, each to be replaced by one map folded into
    block a−1; refuses what cannot be folded, before any weight is read."""
    if plan.repair is None:
        return []
    if any(s.drop_attn or s.drop_mlp for s in plan.slots):
        raise PlanError("repair replaces whole dropped blocks; it does not combine with drop_attn / drop_mlp")
    if plan.new_slots or [s.source for s in plan.slots] != sorted({s.source for s in plan.slots}):
        raise PlanError("repair replaces dropped blocks; it does not combine with inserted or reordered blocks")
    runs: list[tuple[int, int]] = []
    for i in plan.dropped:
        if runs and runs[-1][1] == i - 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    if not runs:
        raise PlanError("repair needs blocks to replace; add drop= (e.g. drop=20-27)")
    if runs[0][0] == 0:
        raise PlanError(f"repair folds a map into the block before each dropped run, but the run {runs[0][0]}-{runs[0][1]} "
                        "starts at block 0; keep block 0")
    return runs
