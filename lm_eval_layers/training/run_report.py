"""What a `surgery train` run leaves behind: a summary table, `train_log.json`, `loss.png` and
the model card (its progress bar is `surgery/training_bar.py`, shared with ILA)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.table import Table

LOG_FILE = "train_log.json"
PLOT_FILE = "loss.png"


def write_log(folder: Path, log: dict[str, Any]) -> None:
    (folder / LOG_FILE).write_text(json.dumps(log, indent=2) + "\n")


def plot(folder: Path, log: dict[str, Any]) -> None:
    """Training loss per step, with the held-out loss before and after where measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    curve = log["loss_curve"]
    ax.plot([e["step"] for e in curve], [e["loss"] for e in curve], label="training loss")
    for key, step, marker in (("eval_loss_before", 0, "o"), ("eval_loss", log["steps"], "s")):
        if log.get(key) is not None:
            ax.scatter([step], [log[key]], marker=marker, color="C1", zorder=3,
                       label="held-out loss, after" if key == "eval_loss" else "held-out loss, before")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (response tokens)")
    ax.set_title(f"{log['model']}: {log['selection']} ({log['method']})", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / PLOT_FILE, dpi=100)
    plt.close(fig)


def summary(log: dict[str, Any], out: Path) -> Table:
    table = Table(title=f"surgery train → {out}")
    table.add_column("")
    table.add_column("value", justify="right")
    curve = log["loss_curve"]
    rows = [
        ("trained", f"{log['selection']} ({log['method']})"),
        ("data", f"{log['train_examples']:,} examples ({log['format']}), {log['eval_examples']:,} held out"),
        ("trainable parameters", f"{log['trainable_parameters']:,} of {log['total_parameters']:,} "
                                 f"({100 * log['trainable_parameters'] / max(log['total_parameters'], 1):.2f}%)"),
        ("steps", f"{log['steps']} (world size {log['world_size']})"),
        ("training loss", f"{curve[0]['loss']:.4f} → {curve[-1]['loss']:.4f}" if curve else "-"),
        ("held-out loss", _before_after(log)),
        ("tokens", f"{log['tokens']:,} ({log['tokens_per_second']:,.0f}/s)"),
        ("wall time", f"{log['wall_seconds']:.1f} s"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table


def _before_after(log: dict[str, Any]) -> str:
    if log.get("eval_loss") is None:
        return "- (no --eval-fraction)"
    before = log.get("eval_loss_before")
    return (f"{before:.4f} → " if before is not None else "") + f"{log['eval_loss']:.4f}"


def model_card(folder: Path, log: dict[str, Any], base_model: str) -> None:
    """README.md: what was trained, on what data, with which recipe and result."""
    kind = "a PEFT LoRA adapter" if log["adapter_only"] else "a fine-tuned model"
    lora = log.get("lora")
    recipe = (f"LoRA r={lora['r']}, alpha={lora['alpha']}, dropout={lora['dropout']} on "
              f"{', '.join(lora['target_modules'])}" + ("" if log["adapter_only"] else ", merged into the weights")
              ) if lora else "full weights of the selected blocks; everything else frozen (byte-identical to the input)"
    distill = log.get("distill")
    card = f"""---
base_model: {base_model}
library_name: {"peft" if log["adapter_only"] else "transformers"}
tags:
- lm-eval-layers
- surgery-train
---

# {Path(log["out"]).name}

{kind.capitalize()} written by lm-eval-layers (`surgery train`) from `{log["model"]}`.

- **Trained:** {log["selection"]}: {recipe}.
- **Loss:** {"distillation from `" + distill["teacher"] + f"` (temperature {distill['temperature']}, weight {distill['weight']})" if distill else "next-token cross-entropy"} on {"every token" if log["format"] == "text" else "response tokens only"}.
- **Data:** `{log["data"]}` ({log["format"]}), {log["train_examples"]} examples, max length {log["options"]["max_length"]}; {log["eval_examples"]} held out.
- **Run:** {log["steps"]} optimizer steps, batch {log["options"]["batch_size"]} × {log["options"]["grad_accum"]} accumulation × {log["world_size"]} process(es), learning rate {log["learning_rate"]}, seed {log["options"]["seed"]}, {log["dtype"]}.
- **Held-out loss:** {_before_after(log)}.

`train_log.json` has the loss curve, the trainable parameters' names and every option; `loss.png` plots the curve.
"""
    (folder / "README.md").write_text(card)
