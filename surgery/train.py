"""`surgery train`: fine-tune the blocks you choose (full weights or LoRA, optionally distilling
from a teacher) and write a model folder. The work itself is `lm_eval_layers.training.run`;
this module holds the command's options, so importing the CLI stays cheap."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from lm_eval_layers.precision import DType
from surgery.options import ModelArg, console, quiet_training_logs, user_errors


def train(
    model: str = ModelArg,
    data: str = typer.Option(..., "--data", help=".jsonl/.json/.parquet file or hub dataset id: messages, prompt/completion, Alpaca or text records"),
    out: Path = typer.Option(..., "--out", help="output folder (must not exist or be empty, unless --force); work goes to OUT.partial/"),
    layers: Optional[str] = typer.Option(None, "--layers", help="blocks to train, plan syntax: 0-7, 3;5-7, -1"),
    freeze_bottom: Optional[str] = typer.Option(None, "--freeze-bottom", help="freeze the lowest blocks, e.g. 25% or 4; train the rest"),
    new_blocks: bool = typer.Option(False, "--new-blocks", help="train the blocks listed in MODEL/new_parameters.json (surgery expand); may be united with --layers"),
    head: bool = typer.Option(False, "--head", help="also train the output head (lm_head), full weights; with tied embeddings the input embeddings train with it"),
    layers_from: Optional[Path] = typer.Option(None, "--layers-from", help="ila.json of `surgery ila`: train its top units (with --top)"),
    top: Optional[str] = typer.Option(None, "--top", help="with --layers-from: the share of units, e.g. 30%"),
    lora: Optional[int] = typer.Option(None, "--lora", help="train LoRA adapters of rank R on the selected blocks' linear modules"),
    lora_alpha: Optional[float] = typer.Option(None, "--lora-alpha", help="LoRA scaling alpha (default 2 × R)"),
    lora_dropout: float = typer.Option(0.05, "--lora-dropout"),
    heal: bool = typer.Option(False, "--heal", help="recovery recipe for a pruned model: LoRA r=8, alpha 16, dropout 0.05 on all blocks, lr 2e-4, merged"),
    adapter_only: bool = typer.Option(False, "--adapter-only", help="write a PEFT adapter folder instead of merged weights"),
    distill_from: Optional[str] = typer.Option(None, "--distill-from", help="teacher (e.g. the unpruned model): loss = KL to its next-token distribution"),
    temperature: float = typer.Option(2.0, "--temperature", help="distillation temperature"),
    distill_weight: float = typer.Option(1.0, "--distill-weight", help="share of the KL term; 1 - share is the LM loss"),
    max_length: int = typer.Option(512, "--max-length", help="truncate examples to this many tokens"),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="optimizer steps (exclusive with --epochs; default 1 epoch)"),
    epochs: Optional[float] = typer.Option(None, "--epochs"),
    lr: Optional[float] = typer.Option(None, "--lr", help="learning rate (default 2e-4 with LoRA, 1e-4 for full weights)"),
    batch_size: int = typer.Option(8, "--batch-size", help="examples per process and step"),
    grad_accum: int = typer.Option(1, "--grad-accum", help="gradient accumulation steps"),
    seed: int = typer.Option(0, "--seed"),
    eval_fraction: float = typer.Option(0.0, "--eval-fraction", help="held-out share of the data, e.g. 0.1 (its loss is reported)"),
    dtype: DType = typer.Option(DType.float32, "--dtype", help="compute dtype (bfloat16/float16: mixed precision, trained tensors kept in float32); float32 on CPU, where the bf16 backward is far slower; the output keeps the input's dtype"),
    save_steps: int = typer.Option(50, "--save-steps", help="checkpoint every N steps (what --resume continues from)"),
    resume: bool = typer.Option(False, "--resume", help="continue an interrupted run from its last checkpoint in OUT.partial/"),
    force: bool = typer.Option(False, "--force", help="replace a non-empty --out; discard an interrupted run"),
) -> None:
    """Fine-tune chosen blocks: new blocks after `surgery expand`, the top layers, or heal a pruned model."""
    given = dict(locals())  # the parameters above are TrainOptions' fields, by name
    from lm_eval_layers.training.run import TrainOptions, train as run

    quiet_training_logs()
    with user_errors():
        options = TrainOptions(**{**given, "dtype": dtype.value})
        log = run(options, console)
    if log is not None:  # None: another process of a distributed run (the main one writes)
        console.print(f"wrote {options.out}")
