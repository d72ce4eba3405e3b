"""How a training run talks to whoever called it, without printing: `say` takes a line of
text, `progress` makes a fresh Trainer callback per training stage. The CLI passes a rich console
and bar (`surgery/training_bar.py`); a Python caller passes its own or nothing (silent)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Reporter:
    say: Callable[[str], None] = lambda text: None
    progress: Callable[[], Any] | None = None  # -> a transformers TrainerCallback

    def callbacks(self) -> list[Any]:
        return [self.progress()] if self.progress is not None else []
