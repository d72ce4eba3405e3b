"""Distillation from a teacher (e.g. the unpruned model): the student learns the teacher's
next-token distribution, the way Minitron ("Compact Language Models via Pruning and Knowledge
Distillation") heals a pruned model, here on plain transformers checkpoints.

Loss per response token: `weight · T² · KL(p_teacher^T ‖ p_student^T) + (1 − weight) · CE`,
with both distributions softened by the temperature T (the T² keeps gradient sizes comparable
across temperatures, as in "Distilling the Knowledge in a Neural Network"). Tokens are the ones
the LM loss uses (labels ≠ -100, shifted by one), summed and divided by the Trainer's token
count so gradient accumulation and data parallelism weigh every token equally.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import Trainer

from lm_eval_layers.training.examples import IGNORE


def distill_loss_sum(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float, weight: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the mixed loss over response tokens, their count); logits at position t predict t+1."""
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        vocab = min(student_logits.shape[-1], teacher_logits.shape[-1])  # padded embedding rows carry no tokens
        student_logits, teacher_logits = student_logits[..., :vocab], teacher_logits[..., :vocab]
    target = labels[:, 1:]
    keep = target != IGNORE
    student = student_logits[:, :-1][keep].float()
    teacher = teacher_logits[:, :-1][keep].float()
    t = temperature
    kl = F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1), log_target=True, reduction="sum") * t * t
    total = weight * kl
    if weight < 1:
        total = total + (1 - weight) * F.cross_entropy(student, target[keep], reduction="sum")
    return total, keep.sum()


class DistillTrainer(Trainer):
    """The Trainer with the distillation loss in training; evaluation keeps the plain LM loss,
    so held-out losses compare with runs that do not distil."""

    def __init__(self, *args: Any, teacher: torch.nn.Module, temperature: float, weight: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.teacher = teacher.eval().requires_grad_(False)
        self.temperature = temperature
        self.weight = weight

    def compute_loss(
        self, model: torch.nn.Module, inputs: dict[str, torch.Tensor], return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        if not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        forward = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
        outputs = model(**forward)
        with torch.no_grad():
            teacher_logits = self.teacher.to(inputs["input_ids"].device)(**forward).logits
        total, count = distill_loss_sum(outputs.logits, teacher_logits, inputs["labels"], self.temperature, self.weight)
        if num_items_in_batch is None:  # the Trainer divides a per-batch mean by the accumulation steps
            loss = total / count.clamp(min=1)
        else:  # already the whole (gathered) accumulated batch's token count, as the LM loss does
            loss = total / num_items_in_batch
            if self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes  # DDP averages gradients over processes
        return (loss, outputs) if return_outputs else loss
