"""The ila.json file format: its schema, reading and checking a file, and the top-K rule that
`surgery train --layers-from`, `surgery ila compare` and the report share. Imports no torch.

ila.json (schema `lm-eval-layers/ila/v1`):
- `schema`, `model`, `model_type`, `num_layers`, `unit` (`module`: one weight matrix of a block,
  or `block`: a block's matrices tied to one gate).
- `data`: `path`, `format`, `records`, `train_examples`, `tokens` (trained response tokens) and
  `digest` (sha256 of the records as canonical JSON: same digest = same data).
- `settings`: every option of the run (LoRA rank/alpha, learning rates, ε, patience, window,
  step caps, budget, penalty λ, gate initialisation, batch size, max length, seed).
- `lora_modules`: the block-relative modules LoRA adapted.
- `stage1`: `stop_step` (the ε-stop step, or null when `max_steps` came first), `steps`,
  `stopped_by` (`epsilon` | `max_steps`), `loss_curve` (step, loss, learning_rate, grad_norm,
  num_input_tokens_seen per step).
- `stage2`: `steps`, `loss_curve` (the same fields plus lm_loss, penalty and mean_gate).
- `units`: one entry per unit in model order: `name` (`3.self_attn.q_proj`, or `3` for a
  block), `block`, `module` (`*` for a block), `s` (the gate logit), `gate` (σ(s)), `rank`
  (1 = most important, by s; ties by model order) and `delta_norm` (‖scaling · B A‖_F of the
  stage-1 LoRA update, the naive baseline ranking).
- `top`: `{"10%": [...], "25%": [...], "50%": [...]}`, the names of the top K = max(1, ⌊p·N + ½⌋) units.
- `blocks`: per block `block`, `total` (Σ σ(s) over its units) and `units`.
- `timing`: wall seconds of each stage and per step; the only fields that differ between two
  runs with the same seed and data (on the same machine and thread count).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

from lm_eval_layers.errors import UsageError
from lm_eval_layers.training.gate_units import UnitKind

SCHEMA = "lm-eval-layers/ila/v1"
TOP_SHARES = (0.10, 0.25, 0.50)
TIMING_FIELDS = ("timing",)
UNIT_KEYS = ("name", "block", "module", "rank")  # what every reader of a unit uses
FIX = "give an ila.json written by `surgery ila`"


def records_digest(records: Sequence[Any]) -> str:
    """sha256 of the records as canonical JSON (key order and whitespace do not matter)."""
    digest = hashlib.sha256()
    for record in records:
        digest.update(json.dumps(record, sort_keys=True, ensure_ascii=False, default=str).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def top_k(share: float, n: int) -> int:
    """K = p·N rounded half up (Python's round() would send 2.5 to 2), at least 1."""
    return max(1, math.floor(share * n + 0.5))


def share_label(share: float) -> str:
    return f"{round(share * 100)}%"


def order_by_score(values: Sequence[float]) -> list[int]:
    """Indices from most to least important (ties: model order)."""
    return sorted(range(len(values)), key=lambda i: (-values[i], i))


def load_json(path: str | Path) -> dict[str, Any]:
    """A JSON object from a file, or one clear line saying why not."""
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{path} does not exist; give an ila.json of `surgery ila` (or a scores.json of `surgery score`)") from None
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        raise UsageError(f"{path} is not JSON; give an ila.json of `surgery ila` (or a scores.json of `surgery score`)") from None
    if not isinstance(document, dict):
        raise UsageError(f"{path} holds no JSON object; {FIX}")
    return document


def require(record: Any, keys: Iterable[str], where: str, fix: str = FIX) -> None:
    """Refuse a record without one of `keys` in one line naming where it is and which key."""
    if not isinstance(record, dict):
        raise UsageError(f"{where} is not a JSON object; {fix}")
    for key in keys:
        if key not in record:
            raise UsageError(f"{where} has no {key!r}; {fix}")


def validate(document: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """The document, checked to be an ila.json with the fields every reader here uses."""
    if document.get("schema") != SCHEMA:
        raise UsageError(f"{path} is not an ila.json of `surgery ila` (schema {SCHEMA})")
    require(document, ("num_layers", "unit", "units"), str(path))
    if document["unit"] not in {k.value for k in UnitKind}:
        raise UsageError(f"{path}: unit {document['unit']!r} is neither 'module' nor 'block'; {FIX}")
    units = document["units"]
    if not isinstance(units, list) or not units:
        raise UsageError(f"{path} ranks no units ('units' is empty); {FIX} that finished")
    for i, unit in enumerate(units):
        require(unit, UNIT_KEYS, f"{path} unit {i}")
    return document


def read(path: str | Path) -> dict[str, Any]:
    """An ila.json, checked to be one."""
    return validate(load_json(path), path)


def ranked_units(document: dict[str, Any]) -> list[dict[str, Any]]:
    """The units from most to least important (by their `rank`)."""
    return sorted(document["units"], key=lambda u: u["rank"])


def top_units(document: dict[str, Any], share: float) -> list[dict[str, Any]]:
    """The top K = top_k(share, N) units."""
    return ranked_units(document)[: top_k(share, len(document["units"]))]
