"""What `surgery train` takes, declared once (`lm_eval_layers.settings`): the command builds its
options from these fields, a Python user passes the same object. Checked on construction,
before anything is read; `resolved()` fills in the defaults that depend on other options.
Imports no torch, so `surgery train --help` and its argument errors are instant."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lm_eval_layers.checkpoint.settings import MODEL_HELP
from lm_eval_layers.errors import UsageError
from lm_eval_layers.precision import DType, training_dtype
from lm_eval_layers.settings import argument, option, required

# --heal: LoRA on all blocks, merged; its dropout is --lora-dropout's default
HEAL = {"lora": 8, "lora_alpha": 16.0, "lr": 2e-4}
DEFAULT_LR = {"lora": 2e-4, "full": 1e-4}
NOT_RECORDED = ("resume", "force", "callbacks")  # how a run is started, not what it trains


@dataclass(frozen=True)
class TrainSettings:
    """Everything `surgery train` takes."""

    model: str = argument(MODEL_HELP)
    data: str = required("--data", ".jsonl/.json/.parquet file or hub dataset id: messages, prompt/completion, Alpaca or text records")
    out: Path = required("--out", "output folder (must not exist or be empty, unless --force); work goes to OUT.partial/")
    layers: str | None = option(None, "--layers", "blocks to train, plan syntax: 0-7, 3;5-7, -1")
    freeze_bottom: str | None = option(None, "--freeze-bottom", "freeze the lowest blocks, e.g. 25% or 4; train the rest")
    new_blocks: bool = option(False, "--new-blocks", "train the blocks listed in MODEL/new_parameters.json (surgery expand); may be united with --layers")
    head: bool = option(False, "--head", "also train the output head (lm_head), full weights; with tied embeddings the input embeddings train with it")
    layers_from: Path | None = option(None, "--layers-from", "ila.json of `surgery ila`: train its top units (with --top)")
    top: str | None = option(None, "--top", "with --layers-from: the share of units, e.g. 30%")
    lora: int | None = option(None, "--lora", "train LoRA adapters of rank R on the selected blocks' linear modules")
    lora_alpha: float | None = option(None, "--lora-alpha", "LoRA scaling alpha (default 2 × R)")
    lora_dropout: float = option(0.05, "--lora-dropout", "dropout on the LoRA inputs, in [0, 1)")
    heal: bool = option(False, "--heal", "recovery recipe for a pruned model: LoRA r=8, alpha 16, dropout 0.05 on all blocks, lr 2e-4, merged")
    adapter_only: bool = option(False, "--adapter-only", "write a PEFT adapter folder instead of merged weights")
    distill_from: str | None = option(None, "--distill-from", "teacher (e.g. the unpruned model): loss = KL to its next-token distribution")
    temperature: float = option(2.0, "--temperature", "distillation temperature")
    distill_weight: float = option(1.0, "--distill-weight", "share of the KL term; 1 - share is the LM loss")
    max_length: int = option(512, "--max-length", "truncate examples to this many tokens")
    max_steps: int | None = option(None, "--max-steps", "optimizer steps (exclusive with --epochs; default 1 epoch)")
    epochs: float | None = option(None, "--epochs", "passes over the training data, fractions allowed (exclusive with --max-steps)")
    lr: float | None = option(None, "--lr", "learning rate (default 2e-4 with LoRA, 1e-4 for full weights)")
    batch_size: int = option(8, "--batch-size", "examples per process and step")
    grad_accum: int = option(1, "--grad-accum", "gradient accumulation steps")
    seed: int = option(0, "--seed")
    eval_fraction: float = option(0.0, "--eval-fraction", "held-out share of the data, e.g. 0.1 (its loss is reported)")
    dtype: DType = option(DType.float32, "--dtype", "compute dtype (bfloat16/float16: mixed precision, trained tensors kept in float32); float32 on CPU, where the bf16 backward is far slower; the output keeps the input's dtype")
    save_steps: int = option(50, "--save-steps", "checkpoint every N steps (what --resume continues from)")
    resume: bool = option(False, "--resume", "continue an interrupted run from its last checkpoint in OUT.partial/")
    force: bool = option(False, "--force", "replace a non-empty --out; discard an interrupted run")
    callbacks: tuple[Any, ...] = ()  # extra TrainerCallbacks (tests, benchmarks); Python only, no flag

    def __post_init__(self) -> None:
        """Option mistakes, caught before anything is read; a dtype name becomes the enum."""
        object.__setattr__(self, "dtype", training_dtype(self.dtype))
        object.__setattr__(self, "callbacks", tuple(self.callbacks))
        if self.head and (self.lora or self.heal):
            raise UsageError("--head trains the output head's full weights; it does not combine with --lora or --heal, drop one")
        if self.heal and (self.layers or self.freeze_bottom or self.new_blocks or self.layers_from):
            raise UsageError("--heal trains LoRA on all blocks; drop the selection or use --lora R with it instead")
        if self.heal and self.lora not in (None, HEAL["lora"]):
            raise UsageError(f"--heal trains LoRA r={HEAL['lora']}; for rank {self.lora} drop --heal: --lora {self.lora} "
                             "alone trains all blocks the same way (alpha 2 × R, lr 2e-4, merged)")
        if self.adapter_only and not (self.lora or self.heal):
            raise UsageError("--adapter-only writes a LoRA adapter; add --lora R (or --heal)")
        checks = [
            (self.lora is not None and self.lora < 1, f"--lora {self.lora}: the rank must be a positive whole number, e.g. 8"),
            (self.lora_alpha is not None and self.lora_alpha <= 0, f"--lora-alpha {self.lora_alpha} must be positive (default 2 × R)"),
            (not 0 <= self.lora_dropout < 1, f"--lora-dropout {self.lora_dropout} must be in [0, 1), e.g. 0.05"),
            (self.max_steps is not None and self.epochs is not None, "--max-steps and --epochs are exclusive; give one"),
            (self.max_steps is not None and self.max_steps < 1, "--max-steps must be at least 1"),
            (self.epochs is not None and self.epochs <= 0, "--epochs must be positive"),
            (self.max_length < 2, "--max-length must be at least 2 tokens"),
            (self.batch_size < 1 or self.grad_accum < 1, "--batch-size and --grad-accum must be at least 1"),
            (not 0 <= self.eval_fraction < 1, f"--eval-fraction {self.eval_fraction} must be in [0, 1), e.g. 0.1"),
            (self.temperature <= 0, "--temperature must be positive, e.g. 2"),
            (not 0 <= self.distill_weight <= 1, "--distill-weight must be in [0, 1] (1: KL only, 0: LM loss only)"),
            (self.lr is not None and self.lr <= 0, "--lr must be positive"),
            (self.save_steps < 1, "--save-steps must be at least 1"),
        ]
        for bad, message in checks:
            if bad:
                raise UsageError(message)

    def resolved(self) -> TrainSettings:
        """A copy with the defaults that depend on other options filled in (--heal's recipe,
        alpha = 2 × R, the learning rate) and --out made absolute; resolving it again changes nothing."""
        lora = self.lora or (HEAL["lora"] if self.heal else None)
        alpha = self.lora_alpha if self.lora_alpha is not None else (HEAL["lora_alpha"] if self.heal else 2.0 * lora if lora else None)
        lr = self.lr if self.lr is not None else HEAL["lr"] if self.heal else DEFAULT_LR["lora" if lora else "full"]
        return dataclasses.replace(self, out=Path(self.out).expanduser().resolve(), lora=lora, lora_alpha=alpha, lr=lr)

    def recorded(self) -> dict[str, Any]:
        """The options that define a run, resolved (a resumed run must match them)."""
        values = {f.name: getattr(self.resolved(), f.name) for f in dataclasses.fields(self) if f.name not in NOT_RECORDED}
        return {k: (str(v) if isinstance(v, Path) else v.value if isinstance(v, DType) else v) for k, v in values.items()}
