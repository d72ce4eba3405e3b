"""The progress bar of `surgery train` and `surgery ila`: a transformers callback rendering
optimizer steps, the latest loss and tokens per second with rich (the library only reports)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import TrainerCallback

if TYPE_CHECKING:
    from lm_eval_layers.training.reporter import Reporter


class ProgressBar(TrainerCallback):
    """A rich progress bar over optimizer steps with the latest loss and tokens per second."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress: Progress | None = None
        self.task: Any = None
        self.start = 0.0
        self.start_tokens = 0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.progress = Progress(
            TextColumn("training"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[speed]} tok/s"), TimeElapsedColumn(), TimeRemainingColumn(), console=self.console,
        )
        self.progress.start()
        self.task = self.progress.add_task("train", total=state.max_steps, completed=state.global_step, loss="-", speed="-")
        self.start, self.start_tokens = time.perf_counter(), state.num_input_tokens_seen

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.progress is None:
            return
        losses = [e["loss"] for e in state.log_history if "loss" in e]
        speed = (state.num_input_tokens_seen - self.start_tokens) / max(time.perf_counter() - self.start, 1e-9)
        self.progress.update(self.task, completed=state.global_step, loss=f"{losses[-1]:.4f}" if losses else "-",
                             speed=f"{speed:,.0f}")

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def console_reporter(console: Console) -> "Reporter":
    """What the training commands hear from the library: lines on `console`, a bar per stage."""
    from lm_eval_layers.training.reporter import Reporter

    return Reporter(say=console.print, progress=lambda: ProgressBar(console))
