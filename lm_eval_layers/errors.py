"""Every error a user can cause, under one base class.

The CLI turns a `LayersError` into one `error:` line and exit code 2 (`surgery.options.user_errors`),
and so does the `layered` plugin when the stock `lm_eval` command runs it (`model.py`); nothing
else is caught there, so a bug still shows its traceback. Each message names the problem
and the fix. They subclass `ValueError` because, to a Python caller (lm-eval's `simple_evaluate`,
a notebook), each one is a bad argument.
"""

from __future__ import annotations


class LayersError(ValueError):
    """A user mistake or unusable input; the message names the problem and the fix."""


class PlanError(LayersError):
    """A layer plan that cannot be built."""


class UnsupportedArchitecture(LayersError):
    """No known layout describes this model; the message says what to add."""


class ScoresFileError(PlanError):
    """A scores file (`surgery score` output) that is missing, malformed or for another model."""


class TaskError(LayersError):
    """An lm-eval task name that no task manager knows, or a task a method cannot score."""


class DataError(LayersError):
    """Evaluation or training data that cannot be read or turned into examples."""


class SelectionError(LayersError):
    """A choice of layers to train that does not fit the model."""


class UsageError(LayersError):
    """Options, paths or files given to a command that cannot be used as given."""
