"""What the SmolLM2 evaluation benchmarks share: the slice (arc_easy validation), task folders,
console scripts of this interpreter, and where results go."""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).parent
INCLUDE = str(HERE / "tasks")  # its YAML includes ../../tasks/arc_easy_local.yaml
BIN = Path(sys.executable).parent
TASK = "arc_easy_val_local"
RESULTS = HERE / "results"


def save(name: str, result: dict, summary: tuple[str, ...]) -> None:
    """Write results/NAME.json and print the summary keys."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in summary}, indent=2))
