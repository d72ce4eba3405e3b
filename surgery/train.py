"""`surgery train`: fine-tune the blocks you choose (full weights or LoRA, optionally distilling
from a teacher) and write a model folder. The options are `TrainSettings`' fields; the work is
`lm_eval_layers.training.fine_tune`, imported only when the command runs, so `--help` and
argument errors cost no torch."""

from __future__ import annotations

from lm_eval_layers.training.train_settings import TrainSettings
from surgery.options import command, console, quiet_training_logs, user_errors


@command(TrainSettings)
def train(settings: TrainSettings) -> None:
    """Fine-tune chosen blocks: new blocks after `surgery expand`, the top layers, or heal a pruned model."""
    quiet_training_logs()
    with user_errors():
        from lm_eval_layers.training.fine_tune import fine_tune

        from surgery.training_bar import console_reporter

        log = fine_tune(settings, console_reporter(console))
    if log is not None:  # None: another process of a distributed run (the main one writes)
        console.print(f"wrote {log['out']}")
