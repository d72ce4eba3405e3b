"""What `surgery ila` leaves behind: ila.json, a rich table, and a PNG heat map (blocks × modules).

The file format (schema, reading, top-K) is `ila_file`; this module builds the document from a
run's result and shows it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.table import Table

from lm_eval_layers.training.ila import ILAResult
from lm_eval_layers.training.ila_file import SCHEMA, TOP_SHARES, order_by_score, share_label, top_k
from lm_eval_layers.training.ila_settings import ILASettings
from lm_eval_layers.training.gate_units import WHOLE_BLOCK


def build(result: ILAResult, settings: ILASettings, *, model: str, model_type: str | None, num_layers: int,
          data: dict[str, Any]) -> dict[str, Any]:
    """The ila.json document (schema in `ila_file`)."""
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
        "warnings": tie_warnings(result.gates),
    }


TIE = 1e-3  # gates closer than this are not told apart by 60 steps of stage 2


def tie_warnings(gates: list[float]) -> list[str]:
    """What the ranking cannot say: all gates tied (stage 2 did not separate them), or a tie at a
    top-K boundary (which units fall inside it is arbitrary)."""
    ordered = sorted(gates, reverse=True)
    if ordered[0] - ordered[-1] < TIE:
        return [f"all {len(gates)} gates are tied (σ ≈ {ordered[0]:.3f}): the ranking is arbitrary; "
                "raise --gate-steps or --gate-lr, or lower --budget"]
    out = []
    for share in TOP_SHARES:
        k = top_k(share, len(gates))
        if k < len(gates) and ordered[k - 1] - ordered[k] < TIE:
            out.append(f"the top {share_label(share)} ends in a tie (ranks {k} and {k + 1}: σ ≈ {ordered[k]:.3f}): "
                       "which units it holds is arbitrary")
    return out


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
