"""What `surgery ila` takes, declared once (`lm_eval_layers.settings`): the command builds its
options from these fields, a Python user passes the same object. Checked on construction,
before anything is read; imports no torch, so `surgery ila --help` and its argument errors are
instant."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lm_eval_layers.checkpoint.settings import MODEL_HELP
from lm_eval_layers.errors import UsageError
from lm_eval_layers.precision import DType, training_dtype
from lm_eval_layers.settings import argument, option, required
from lm_eval_layers.training.gate_units import UnitKind

COMMAND_FIELDS = ("model", "data", "out", "plot", "force")  # where a run reads and writes, not how it ranks


@dataclass(frozen=True)
class ILASettings:
    """Everything that defines an ILA run."""

    model: str = argument(MODEL_HELP)
    data: str = required("--data", ".jsonl/.json/.parquet file or hub dataset id, as for `surgery train`")
    out: Path = required("--out", "ila.json to write (refused if it exists, unless --force)")
    plot: Path | None = option(None, "--plot", "PNG heat map of the gates, blocks × modules")
    unit: UnitKind = option(UnitKind.module, "--unit", "one gate per weight matrix, or one per block")
    rank: int = option(8, "--rank", "LoRA rank in stage 1")
    alpha: float | None = option(None, "--lora-alpha", "LoRA scaling alpha (default 2 × rank)")
    lr: float = option(1e-3, "--lr", "stage-1 learning rate (constant)")
    # The stop rule's defaults, from SmolLM2 on nq_open (batch 16): per-step losses scatter ~10%,
    # so 10-step means move ±6% on a plateau and ε 0.02 over 10 steps never stopped in 300 steps;
    # 20-step means move ~2-3%, and ε 0.05 twice in a row stops once the plateau is reached.
    epsilon: float = option(0.05, "--epsilon", "stage 1 stops when the windowed mean loss changes by less than this (relative)")
    patience: int = option(2, "--patience", "... for this many consecutive windows")
    window: int = option(20, "--window", "steps per window")
    max_steps: int = option(300, "--max-steps", "stage-1 step cap")
    gate_steps: int = option(60, "--gate-steps", "stage-2 steps (learning the gates)")
    gate_lr: float = option(0.1, "--gate-lr", "stage-2 learning rate of the gate logits")
    gate_init: float = 3.0  # s at the start of stage 2: σ(3) ≈ 0.95, every update nearly on (no flag)
    budget: float = option(0.25, "--budget", "share of units the penalty lets stay open")
    penalty: float = option(1.0, "--penalty", "λ in λ·N·max(0, mean σ(s) − budget)²")
    batch_size: int = option(8, "--batch-size", "examples per optimizer step (as surgery train)")
    max_length: int = option(256, "--max-length", "truncate examples to this many tokens")
    seed: int = option(0, "--seed")
    # as in `surgery train`: the loaded model's and autocast's dtype, trained tensors in float32;
    # on CPUs without AMX the bfloat16 backward is many times slower
    dtype: DType = option(DType.float32, "--dtype", "training dtype (float32 on CPU)")
    force: bool = option(False, "--force", "replace an existing --out / --plot")

    def __post_init__(self) -> None:
        """Option mistakes, caught before anything is read; plain strings become the enums."""
        object.__setattr__(self, "dtype", training_dtype(self.dtype))
        object.__setattr__(self, "unit", UnitKind(self.unit))
        checks = [
            (self.rank < 1, f"--rank {self.rank}: the LoRA rank must be a positive whole number, e.g. 8"),
            (self.alpha is not None and self.alpha <= 0, f"--lora-alpha {self.alpha} must be positive (default 2 × rank)"),
            (not 0 < self.budget < 1, f"--budget {self.budget} must be a share of units in (0, 1), e.g. 0.25"),
            (self.epsilon <= 0, "--epsilon must be positive, e.g. 0.05"),
            (self.patience < 1 or self.window < 1, "--patience and --window must be at least 1"),
            (self.max_steps < 1 or self.gate_steps < 1, "--max-steps and --gate-steps must be at least 1"),
            (self.lr <= 0 or self.gate_lr <= 0, "--lr and --gate-lr must be positive"),
            (self.penalty < 0, "--penalty must be zero or positive"),
            (self.batch_size < 1, "--batch-size must be at least 1"),
            (self.max_length < 2, "--max-length must be at least 2 tokens"),
            (self.plot is not None and Path(self.plot).suffix.lower() != ".png",
             f"--plot {self.plot}: the heat map is a PNG; give a path ending in .png"),
        ]
        for bad, message in checks:
            if bad:
                raise UsageError(message)

    def resolved(self) -> ILASettings:
        """A copy with the defaults that depend on other options filled in (alpha = 2 × rank) and
        the output paths made absolute."""
        return dataclasses.replace(
            self, alpha=self.alpha if self.alpha is not None else 2.0 * self.rank,
            out=Path(self.out).expanduser().resolve(), plot=Path(self.plot).expanduser().resolve() if self.plot else None,
        )

    def recorded(self) -> dict[str, Any]:
        """How the run ranked (ila.json's `settings`): every option but the paths."""
        values = dataclasses.asdict(self.resolved())
        return {k: (v.value if isinstance(v, (UnitKind, DType)) else v) for k, v in values.items() if k not in COMMAND_FIELDS} | {
            "lora_dropout": 0.0, "lr_schedule": "constant",
        }
