"""ILA ("Understanding Layer Significance in LLM Alignment"): which weight matrices a fine-tune
needs, learned as gates on LoRA updates.

Stage 1 trains LoRA (PEFT, rank r, no dropout) on every linear module of every block until the
training loss is ε-stable (`EpsilonStop`) or a step cap, at a constant learning rate (a decaying
schedule would make any loss look stable near the cap). Stage 2 freezes the LoRA weights and
learns one gate logit s_i per unit (`gates.Gates`: the unit's LoRA delta times σ(s_i)) on the
same data with

    loss = LM loss + λ · N · max(0, mean_i σ(s_i) − budget)²

(`budget_penalty`; N units, λ = `ILASettings.penalty`, default 1). The penalty is zero while at
most a `budget` share of the gates is open, so it only asks the model to give some up; its
gradient on each σ(s_i) is 2λ·(mean σ − budget), the same for every unit and independent of N,
so a gate stays open exactly when its delta lowers the LM loss by more than that pressure.
Units are then ranked by s (σ is monotone). Both stages run on transformers' Trainer (its
optimizer, schedule and data order; the gate logits are ordinary parameters); the LM loss is
the response-only loss of `surgery train`'s data.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import transformers
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import PrinterCallback

from lm_eval_layers.arch import layout_for
from lm_eval_layers.errors import UsageError
from lm_eval_layers.training import examples as D
from lm_eval_layers.training.gates import Gates, delta_norms
from lm_eval_layers.training.ila_settings import ILASettings
from lm_eval_layers.training.reporter import Reporter
from lm_eval_layers.training.selection import Selection, lora_config
from lm_eval_layers.training.trainer import (
    OptimizerHoldsSelection, float32_masters, loss_curve, training_arguments,
)
from lm_eval_layers.training.gate_units import Unit


class EpsilonStop:
    """The stage-1 stop rule on a loss sequence: the mean of each window of `window` steps is
    compared with the previous window's; the run is stable once the relative change
    |m_k − m_{k−1}| / |m_{k−1}| has stayed below `epsilon` for `patience` consecutive windows.
    A flat loss therefore stops at step (patience + 1) · window, the first step at which
    `patience` comparisons exist."""

    def __init__(self, epsilon: float, patience: int, window: int) -> None:
        self.epsilon, self.patience, self.window = epsilon, patience, window
        self.losses: list[float] = []
        self.means: list[float] = []
        self.calm = 0

    def update(self, loss: float) -> bool:
        """Add one step's loss; True when the loss has become ε-stable."""
        self.losses.append(loss)
        if len(self.losses) % self.window:
            return False
        self.means.append(sum(self.losses[-self.window:]) / self.window)
        if len(self.means) > 1:
            previous = self.means[-2]
            change = abs(self.means[-1] - previous) / max(abs(previous), 1e-12)
            self.calm = self.calm + 1 if change < self.epsilon else 0
        return self.calm >= self.patience


class EpsilonStopCallback(TrainerCallback):
    """Feeds each logged training loss to `EpsilonStop` and ends training when it says so."""

    def __init__(self, rule: EpsilonStop) -> None:
        self.rule = rule
        self.stop_step: int | None = None  # None: the step cap came first

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if logs and "loss" in logs and self.stop_step is None and self.rule.update(float(logs["loss"])):
            self.stop_step = state.global_step
            control.should_training_stop = True


def budget_penalty(values: torch.Tensor, budget: float, weight: float) -> torch.Tensor:
    """λ · N · max(0, mean σ − budget)²: zero within the budget, equal pressure on every gate above it."""
    excess = torch.relu(values.mean() - budget)
    return weight * values.numel() * excess * excess


class GateTrainer(Trainer):
    """The Trainer with the budget penalty added to the LM loss, and both parts recorded per step."""

    def __init__(self, *args: Any, gates: Gates, budget: float, weight: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gates, self.budget, self.weight = gates, budget, weight
        self.parts: list[dict[str, float]] = []

    def compute_loss(self, model: nn.Module, inputs: dict[str, torch.Tensor], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None) -> Any:
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if not model.training:
            return result
        lm = result[0] if return_outputs else result
        values = self.gates.values()
        penalty = budget_penalty(values, self.budget, self.weight)
        self.parts.append({"lm_loss": lm.item(), "penalty": penalty.item(), "mean_gate": values.mean().item()})
        loss = lm + penalty
        return (loss, result[1]) if return_outputs else loss


@dataclass
class ILAResult:
    """What a run found, in unit order."""

    units: list[Unit]
    logits: list[float]
    gates: list[float]
    delta_norms: list[float]  # ‖scaling · B A‖ after stage 1 (the naive baseline)
    stop_step: int | None  # stage 1's ε-stop step; None when the cap came first
    stage1_steps: int
    stage1_curve: list[dict[str, Any]]
    stage2_curve: list[dict[str, Any]]
    lora_modules: list[str]
    seconds: dict[str, float]


def _timed_train(trainer: Trainer) -> float:
    """Seconds of training alone, so the per-step rates leave out building the trainer."""
    start = time.perf_counter()
    trainer.train()
    return time.perf_counter() - start


def _result(gates: Gates, norms: list[float], stop: EpsilonStopCallback, first: Trainer, second: GateTrainer,
            lora_modules: list[str], stage1: float, stage2: float) -> ILAResult:
    """The learned gates with both stages' curves and timings; stage 2's curve carries, per
    logged step, the loss parts `GateTrainer` recorded."""
    logits = gates.logits.detach().float()
    curve2 = [{**entry, **parts} for entry, parts in zip(loss_curve(second.state.log_history), second.parts)]
    return ILAResult(
        units=gates.units, logits=logits.tolist(), gates=torch.sigmoid(logits).tolist(), delta_norms=norms,
        stop_step=stop.stop_step, stage1_steps=first.state.global_step,
        stage1_curve=loss_curve(first.state.log_history), stage2_curve=curve2, lora_modules=lora_modules,
        seconds={"stage1": stage1, "stage2": stage2, "stage1_per_step": stage1 / max(first.state.global_step, 1),
                 "stage2_per_step": stage2 / max(second.state.global_step, 1)},
    )


@torch.enable_grad()  # also when called from an inference (no-grad) context
def learn_gates(model: nn.Module, examples: Sequence[D.Example], pad_id: int, settings: ILASettings,
                reporter: Reporter = Reporter(), callbacks: Sequence[TrainerCallback] = ()) -> ILAResult:
    """Both stages on a loaded model (LoRA is added to it in place): the units' gate logits.
    Only the method's fields of `settings` are read (not its paths)."""
    from peft import get_peft_model

    settings = settings.resolved()
    if len(examples) < settings.batch_size:
        raise UsageError(f"{len(examples)} examples are fewer than --batch-size {settings.batch_size}; lower it")
    layout = layout_for(model)
    depth = len(layout.find_blocks(model))
    transformers.set_seed(settings.seed)  # LoRA's initialisation draws from it
    config = lora_config(model, layout, Selection(tuple(range(depth)), f"all {depth} blocks"), settings.rank,
                         settings.alpha, 0.0)
    peft = get_peft_model(model, config)
    float32_masters(peft)  # the precision policy of `surgery train`: trained tensors in float32
    collator = D.Collator(pad_id)

    with tempfile.TemporaryDirectory(prefix="ila-") as tmp:
        args = training_arguments(Path(tmp), batch_size=settings.batch_size, learning_rate=settings.lr, seed=settings.seed,
                                  dtype=settings.dtype, max_steps=settings.max_steps, lr_scheduler_type="constant")

        def trainer(cls: type, run_args: Any, **extra: Any) -> Trainer:
            t = cls(model=peft, args=run_args, train_dataset=list(examples), data_collator=collator,
                    callbacks=[OptimizerHoldsSelection(), *callbacks], **extra)
            t.remove_callback(PrinterCallback)
            for callback in reporter.callbacks():
                t.add_callback(callback)
            return t

        reporter.say(f"stage 1: LoRA r={settings.rank} on {len(config.target_modules)} modules × {depth} blocks, "
                     f"until the loss is ε-stable (ε={settings.epsilon}, {settings.patience} windows of "
                     f"{settings.window} steps) or {settings.max_steps} steps")
        stop = EpsilonStopCallback(EpsilonStop(settings.epsilon, settings.patience, settings.window))
        first = trainer(Trainer, args)
        first.add_callback(stop)
        stage1 = _timed_train(first)

        for p in peft.parameters():
            p.requires_grad_(False)
        gates = Gates.attach(peft, layout, settings.unit, settings.gate_init)
        norms = delta_norms(peft, layout, gates.units)
        reporter.say(f"stage 2: {len(gates.units)} gates, {settings.gate_steps} steps, budget {settings.budget:.0%} "
                     f"(penalty λ={settings.penalty})")
        second = trainer(GateTrainer, dataclasses.replace(args, max_steps=settings.gate_steps, learning_rate=settings.gate_lr),
                         gates=gates, budget=settings.budget, weight=settings.penalty)
        stage2 = _timed_train(second)

    return _result(gates, norms, stop, first, second, sorted(config.target_modules), stage1, stage2)
