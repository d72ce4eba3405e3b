"""What `surgery ila` leaves behind: ila.json, a rich table, and a PNG heat map (blocks × modules).

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
from typing import Any, Sequence

from rich.table import Table

from lm_eval_layers.errors import UsageError
from lm_eval_layers.training.gates import WHOLE_BLOCK
from lm_eval_layers.training.ila import ILAResult, ILASettings

SCHEMA = "lm-eval-layers/ila/v1"
TOP_SHARES = (0.10, 0.25, 0.50)
TIMING_FIELDS = ("timing",)


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


def build(result: ILAResult, settings: ILASettings, *, model: str, model_type: str | None, num_layers: int,
          data: dict[str, Any]) -> dict[str, Any]:
    """The ila.json document (schema above)."""
    order = order_by_score(result.logits)
    rank = {unit_index: position + 1 for position, unit_index in enumerate(order)}
    units = [
        {"name": u.name, "block": u.block, "module": u.module, "s": result.logits[i], "gate": result.gates[i],
         "rank": rank[i], "delta_norm": result.delta_norms[i]}
        for i, u in enumerate(result.units)
    ]
    names = [u.name for u in result.units]
    blocks: dict[int, list[int]] = {}
    for i, u in enumerate(result.units):
        blocks.setdefault(u.block, []).append(i)
    s1, s2 = result.stage1_curve, result.stage2_curve
    return {
        "schema": SCHEMA, "model": model, "model_type": model_type, "num_layers": num_layers,
        "unit": settings.unit.value, "data": data, "settings": settings.recorded(), "lora_modules": result.lora_modules,
        "stage1": {"stop_step": result.stop_step, "steps": result.stage1_steps,
                   "stopped_by": "epsilon" if result.stop_step is not None else "max_steps", "loss_curve": s1},
        "stage2": {"steps": len(s2), "loss_curve": s2},
        "units": units,
        "top": {share_label(p): [names[i] for i in order[:top_k(p, len(names))]] for p in TOP_SHARES},
        "blocks": [{"block": b, "total": sum(result.gates[i] for i in idx), "units": len(idx)} for b, idx in sorted(blocks.items())],
        "timing": result.seconds,
    }


def write(path: Path, document: dict[str, Any]) -> None:
    """Written to a sibling temporary file and renamed: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(document, indent=2) + "\n")
    tmp.replace(path)


def load_json(path: str | Path) -> dict[str, Any]:
    """A JSON object from a file, or one clear line saying why not."""
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{path} does not exist; give an ila.json of `surgery ila` (or a scores.json of `surgery score`)") from None
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        raise UsageError(f"{path} is not JSON; give an ila.json of `surgery ila` (or a scores.json of `surgery score`)") from None
    if not isinstance(document, dict):
        raise UsageError(f"{path} holds no JSON object; give an ila.json of `surgery ila`")
    return document


def validate(document: dict[str, Any], path: str | Path) -> dict[str, Any]:
    if document.get("schema") != SCHEMA or not isinstance(document.get("units"), list):
        raise UsageError(f"{path} is not an ila.json of `surgery ila` (schema {SCHEMA})")
    return document


def read(path: str | Path) -> dict[str, Any]:
    """An ila.json, checked to be one."""
    return validate(load_json(path), path)


def table(document: dict[str, Any], rows: int | None = None) -> Table:
    """Units in rank order (the top quarter, at least 10), with the naive ‖BA‖ rank beside."""
    units = document["units"]
    by_norm = order_by_score([u["delta_norm"] for u in units])
    norm_rank = {i: r + 1 for r, i in enumerate(by_norm)}
    shown = sorted(range(len(units)), key=lambda i: units[i]["rank"])[: rows or max(10, top_k(0.25, len(units)))]
    stage1 = document["stage1"]
    stop = f"ε-stop at step {stage1['stop_step']}" if stage1["stop_step"] is not None else f"no ε-stop by step {stage1['steps']}"
    title = f"ILA: {document['model']} — {len(units)} units, stage 1 {stop}, budget {document['settings']['budget']:.0%}"
    t = Table(title=title)
    for col, justify in (("rank", "right"), ("unit", "left"), ("σ(s)", "right"), ("s", "right"), ("‖BA‖ rank", "right")):
        t.add_column(col, justify=justify)
    for i in shown:
        u = units[i]
        t.add_row(str(u["rank"]), u["name"], f"{u['gate']:.3f}", f"{u['s']:+.3f}", str(norm_rank[i]))
    return t


def heat_map(document: dict[str, Any], path: Path) -> None:
    """σ(s) per block (rows) and module (columns); a block unit is one column."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    units = document["units"]
    modules = list(dict.fromkeys(u["module"] for u in units))
    blocks = sorted({u["block"] for u in units})
    grid = np.full((len(blocks), len(modules)), np.nan)
    for u in units:
        grid[blocks.index(u["block"]), modules.index(u["module"])] = u["gate"]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(modules), 1.5 + 0.22 * len(blocks)))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=max(float(np.nanmax(grid)), 1e-6))
    ax.set_xticks(range(len(modules)), ["block" if m == WHOLE_BLOCK else m for m in modules], rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(blocks)), [str(b) for b in blocks], fontsize=7)
    ax.set_ylabel("block")
    ax.set_title(f"ILA gates σ(s): {document['model']}", fontsize=9)
    fig.colorbar(image, ax=ax, label="σ(s)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
