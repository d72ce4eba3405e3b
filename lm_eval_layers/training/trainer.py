"""What `surgery train` and both ILA stages share on transformers' Trainer: its arguments, the
precision policy (mixed precision with float32 trained tensors), the optimizer check, the
loss curve, and the inputs (tokenizer, a folder transformers can load).

Why the plain `Trainer` and not trl's `SFTTrainer`: response-only loss is a labelling question,
answered once in `examples.py` for all four record formats (conversations rendered to
prompt/response spans by the model's own chat template). trl's `assistant_only_loss` needs
`{% generation %}` markers that most chat templates (SmolLM2's included) lack, and trl adds
dependencies without adding anything else these commands use. The Trainer does all the
training: optimizer, schedule, gradient accumulation, checkpoints and resuming, data
parallelism under `torchrun` / `accelerate launch`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import TrainerCallback

from lm_eval_layers.arch import num_layers
from lm_eval_layers.checkpoint.sources import Source
from lm_eval_layers.checkpoint.writer import write_variant
from lm_eval_layers.plan import LayerPlan
from lm_eval_layers.precision import DType


def training_arguments(output_dir: Path, *, batch_size: int, learning_rate: float, seed: int, dtype: DType,
                       max_steps: int | None = None, epochs: float | None = None, grad_accum: int = 1,
                       save_steps: int | None = None, **overrides: Any) -> Any:
    """The Trainer settings every run here shares: per-step logging for the progress bar and
    loss curves, no evaluation loop, CPU-aware process groups, `mixed_precision(dtype)`;
    `save_steps` None saves no checkpoints."""
    return transformers.TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum,
        learning_rate=learning_rate,
        weight_decay=0.0,
        max_steps=max_steps or -1,
        num_train_epochs=epochs or 1.0,
        seed=seed,
        data_seed=seed,
        logging_steps=1,
        **({"save_strategy": "steps", "save_steps": save_steps, "save_total_limit": 1} if save_steps else {"save_strategy": "no"}),
        eval_strategy="no",
        use_cpu=not torch.cuda.is_available(),  # on CPU, also what makes torchrun form a gloo group
        report_to="none",
        disable_tqdm=True,
        log_level="warning",
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
        **mixed_precision(dtype),
        **overrides,
    )


def mixed_precision(dtype: DType) -> dict[str, bool]:
    """bfloat16/float16 runs compute under the Trainer's autocast while the trained tensors stay
    float32 (`float32_masters`): an optimizer stepping bf16 weights rounds small updates away,
    and fp16 ones overflow without loss scaling. Whether the dtype trains here at all is
    `precision.training_dtype`'s question, asked when the settings are made."""
    return {"bf16": dtype is DType.bfloat16, "fp16": dtype is DType.float16}


def float32_masters(model: torch.nn.Module) -> None:
    """Trainable tensors in float32, frozen ones in the training dtype (a tied tensor stays tied:
    the parameter object is kept, only its data changes)."""
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()


class OptimizerHoldsSelection(TrainerCallback):
    """Re-checks, once the optimizer exists, that it holds exactly the trainable parameters
    (frameworks that freeze after building it silently train frozen ones)."""

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None, **kwargs: Any) -> None:
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        wanted = {id(p) for p in model.parameters() if p.requires_grad}
        if held != wanted:
            raise RuntimeError(f"the optimizer holds {len(held)} tensors but {len(wanted)} are trainable")


def loss_curve(log_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The Trainer's per-step log entries reduced to step, loss, learning rate and tokens seen."""
    keys = ("step", "loss", "learning_rate", "grad_norm", "num_input_tokens_seen")
    return [{k: e[k] for k in keys if k in e} for e in log_history if "loss" in e]


def plain_folder(source: Source, dest: Path) -> Path:
    """A folder transformers can train and save: the input's own, or GGUF dequantised to fp32
    safetensors by the writer `surgery prune` uses (the identity plan, tensor by tensor)."""
    if source.folder is not None:
        return Path(source.folder)
    if not (dest / "config.json").is_file():
        write_variant(source, LayerPlan.identity(num_layers(source.config)), dest, dtype=torch.float32, force=True,
                      metadata=False)
    return dest
