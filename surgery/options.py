"""What every `surgery` command shares: the error boundary, the stderr console, common options."""

from __future__ import annotations

from contextlib import contextmanager
from enum import Enum
from typing import Iterator

import typer
from rich.console import Console

from lm_eval_layers.errors import LayersError

console = Console(stderr=True)  # progress and messages; results go to stdout


class DType(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


@contextmanager
def user_errors() -> Iterator[None]:
    """The one place a user's mistake (a `LayersError`) becomes one `error:` line on stderr and
    exit code 2, with no traceback; anything else is a bug and keeps its traceback."""
    try:
        yield
    except LayersError as e:
        typer.echo(f"error: {str(e).splitlines()[0]}", err=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        typer.echo("interrupted: no output was written", err=True)
        raise typer.Exit(130) from None


ModelArg = typer.Argument(..., help="local folder, .gguf file, hub id, or 'smollm2' (the embedded default)")


def quiet_training_logs() -> None:
    """Our own progress bar shows steps, loss and tokens/s: silence transformers' bars and a
    deprecation warning PEFT triggers on every step."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
