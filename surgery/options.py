"""What every `surgery` command shares: options built from the library's settings objects, the
error boundary, the stderr console and progress that also reports when output is redirected.

Importing this module costs no torch or lm-eval: `--help` and argument errors need neither."""

from __future__ import annotations

import dataclasses
import inspect
import shlex
import sys
import threading
import time
import typing
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import typer
from rich.console import Console
from rich.progress import Progress, TaskID

from lm_eval_layers.errors import LayersError
from lm_eval_layers.settings import MODEL_HELP



def _console(stderr: bool) -> Console:
    """rich wraps at 80 columns when output is not a terminal (a log file, a pipe, CI): there,
    lines and tables keep their own width, so a row stays one line."""
    terminal = Console(stderr=stderr)
    return terminal if terminal.is_terminal else Console(stderr=stderr, width=240, soft_wrap=True)


console = _console(stderr=True)  # progress and messages
results = _console(stderr=False)  # tables and results, on stdout
S = TypeVar("S")


def command(settings: type[S]) -> Callable[[Callable[[S], None]], Callable[..., None]]:
    """Turn `body(settings_object)` into a Typer command whose parameters are the fields of the
    `settings` dataclass (`lm_eval_layers.settings`): flag, default and help come from the field,
    so they are declared once. Fields without a flag (Python-only settings) are not options."""
    hints = typing.get_type_hints(settings)

    def wrap(body: Callable[[S], None]) -> Callable[..., None]:
        params, annotations = [], {}
        for f in dataclasses.fields(settings):
            meta = f.metadata
            if not f.init or not ("flag" in meta or "argument" in meta):
                continue
            default = ... if f.default is dataclasses.MISSING else f.default
            if meta.get("argument"):
                info = typer.Argument(default, help=meta["help"], show_default=default is not ..., metavar=f.name.upper())
            else:
                info = typer.Option(default, meta["flag"], help=meta["help"])
            params.append(inspect.Parameter(f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=info,
                                            annotation=hints[f.name]))
            annotations[f.name] = hints[f.name]

        def run(**given: Any) -> None:
            with user_errors():
                parsed = settings(**given)  # type: ignore[call-arg]
            body(parsed)

        run.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        run.__annotations__ = annotations
        run.__name__, run.__qualname__, run.__doc__ = body.__name__, body.__qualname__, body.__doc__
        return run

    return wrap


@contextmanager
def user_errors(kept: Path | None = None) -> Iterator[None]:
    """The one place a user's mistake (a `LayersError`) becomes one `error:` line on stderr and
    exit code 2, with no traceback; anything else is a bug and keeps its traceback. On Ctrl-C:
    what was kept (`kept`, a store of finished work, when it exists) and the command that resumes."""
    try:
        yield
    except LayersError as e:
        typer.echo(f"error: {str(e).splitlines()[0]}", err=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        if kept is not None and kept.exists():
            typer.echo(f"interrupted: no output was written; the finished evaluations are kept in {kept}; "
                       f"continue with: {resume_command()}", err=True)
        else:
            typer.echo("interrupted: no output was written", err=True)
        raise typer.Exit(130) from None


def resume_command() -> str:
    """This command line with --resume (and without --force, which would discard what was kept)."""
    args = [a for a in sys.argv[1:] if a != "--force"]
    return shlex.join(["surgery", *args, *([] if "--resume" in args else ["--resume"])])


class Bars(Progress):
    """rich's progress bars on a terminal; with output redirected (a log file, CI), one plain
    line per task at most every `every` seconds and when a task completes, so a long run is
    never silent."""

    def __init__(self, *columns: Any, every: float = 10.0, **kwargs: Any) -> None:
        kwargs.setdefault("console", console)
        plain = not kwargs["console"].is_terminal
        super().__init__(*columns, **{**kwargs, "disable": kwargs.get("disable", False) or plain})
        self._plain = plain and not kwargs.get("disable", False)
        self._every = every
        self._said: dict[TaskID, float] = {}

    def update(self, task_id: TaskID, **kwargs: Any) -> None:  # advance() calls this too
        super().update(task_id, **kwargs)
        if self._plain:
            self._say(task_id)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        if self._plain:
            self._say(task_id)

    def _say(self, task_id: TaskID) -> None:
        task = next(t for t in self.tasks if t.id == task_id)  # rich keeps them by id privately
        now = time.monotonic()
        if now - self._said.get(task_id, task.start_time or now) < self._every and not task.finished:
            return
        if task.finished and self._said.get(task_id) == float("inf"):
            return
        self._said[task_id] = float("inf") if task.finished else now
        done = f"{task.completed:,.0f}/{task.total:,.0f}" if task.total else f"{task.completed:,.0f}"
        self.console.print(f"{task.description}: {done} ({task.elapsed or 0:.0f} s)", highlight=False)


@contextmanager
def status(message: str, after: float = 2.0) -> Iterator[None]:
    """A spinner on a terminal; otherwise the message as one line once the work has taken
    `after` seconds, so a log shows what a long step is doing and a quick failure stays one line."""
    if console.is_terminal:
        with console.status(message):
            yield
        return
    timer = threading.Timer(after, lambda: console.print(message, highlight=False))
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


ModelArg = typer.Argument(..., help=MODEL_HELP)


def quiet_training_logs() -> None:
    """Our own progress bar shows steps, loss and tokens/s: silence transformers' bars and a
    deprecation warning PEFT triggers on every step."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
