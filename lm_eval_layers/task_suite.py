"""The task YAMLs that ship with the package (`*_local`: lm-eval's prompts, offline-capable
data) and the lm-eval task manager that finds them from any directory.

In a wheel the YAMLs live in `lm_eval_layers/tasks/`; in a source checkout (editable install)
they are the repository's top-level `tasks/`. Give them to the stock `lm_eval` command with
`--include_path "$(python -m lm_eval_layers.task_suite)"`.
"""

from __future__ import annotations

import difflib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from lm_eval_layers.errors import TaskError
from lm_eval_layers.settings import option

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager

_PACKAGE = Path(__file__).resolve().parent


def tasks_option(default: str | None, purpose: str = "") -> Any:
    """The `--tasks` field of a command's settings (declared here once; each command names its
    default and what the tasks are for)."""
    return option(default, "--tasks", "comma-separated lm-eval tasks (the shipped *_local tasks are always found)"
                  + (f"; {purpose}" if purpose else ""))


def limit_option() -> Any:
    """The `--limit` field: documents per task, the same default everywhere."""
    return option(100, "--limit", "documents per task")


def include_path_option() -> Any:
    """The `--include-path` field: a user's own task YAMLs."""
    return option(None, "--include-path", "a folder of extra task YAMLs")


def task_names(tasks: str | None) -> list[str]:
    """`--tasks a,b` as a list of names (empty when not given)."""
    return [t.strip() for t in (tasks or "").split(",") if t.strip()]


def tasks_dir() -> Path:
    """The folder of the shipped task YAMLs."""
    for folder in (_PACKAGE / "tasks", _PACKAGE.parent / "tasks"):
        if (folder / "arc_easy_local.yaml").is_file():
            return folder
    raise TaskError(f"the task YAMLs are missing from {_PACKAGE}; reinstall lm-eval-layers")


class _NoMetadataHint(logging.Filter):
    """lm-eval warns, for every task with its own data loader, that kwargs can be passed with
    `--metadata`; the shipped tasks' loader takes none, so the hint only misleads. Dropped for
    the shipped (`*_local`) tasks alone."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.split(":", 1)[0].endswith("_local") and "can be passed to `--metadata`" in message)


def task_manager(include_path: str | Path | Iterable[str | Path] | None = None) -> TaskManager:
    """lm-eval's task manager with the shipped tasks and any user folders of task YAMLs."""
    from lm_eval.tasks import TaskManager

    task_log = logging.getLogger("lm_eval.api.task")
    if not any(isinstance(f, _NoMetadataHint) for f in task_log.filters):
        task_log.addFilter(_NoMetadataHint())

    extra = [include_path] if isinstance(include_path, (str, Path)) else list(include_path or [])
    for folder in extra:
        if not Path(folder).is_dir():
            raise TaskError(f"task folder {folder} does not exist; pass a folder of lm-eval task YAMLs")
    return TaskManager(include_path=[str(tasks_dir()), *map(str, extra)])


def check_task_names(manager: TaskManager, names: list[str]) -> None:
    """Unknown task names as a one-line error with the nearest known names (no task is built)."""
    if not names:
        raise TaskError("no task given; name at least one, e.g. arc_easy_local")
    for name in names:
        if not manager.match_tasks([name]):
            near = difflib.get_close_matches(name, manager.all_tasks, n=3)
            hint = f"did you mean {', '.join(near)}?" if near else "list them with `lm_eval ls tasks`"
            raise TaskError(f"task {name!r} is not known to lm-eval or to the shipped tasks; {hint}")
    from lm_eval_layers.task_data import check_sources

    check_sources(shipped_data_names(names))  # their data, before any model is loaded


def load_tasks(manager: TaskManager, names: list[str]) -> dict[str, Any]:
    """The leaf task objects of task and group names (groups flattened)."""
    check_task_names(manager, names)
    try:
        return manager.load(names)["tasks"]
    except ValueError as e:  # lm-eval refuses a task named twice, e.g. beside a group that holds it
        if "Duplicate task" not in str(e):
            raise
        raise TaskError(f"{e}; name each task once (a group already runs its tasks)") from None


if __name__ == "__main__":
    print(tasks_dir())


def shipped_data_names(names: Iterable[str]) -> list[str]:
    """The data folders (`local_name`'s first part, e.g. `arc_easy`, `mmlu`) that the shipped tasks
    and groups among `names` read; other tasks are lm-eval's business."""
    import re

    by_task: dict[str, set[str]] = {}
    for yaml in tasks_dir().rglob("*.yaml"):
        text = yaml.read_text()
        local = re.search(r"^\s*local_name:\s*([\w./-]+)", text, re.M)
        for key in ("task", "group"):
            named = re.search(rf"^{key}:\s*(\S+)", text, re.M)
            if named and local:
                by_task.setdefault(named.group(1), set()).add(local.group(1).split("/")[0])
            elif named:  # a group: the data of the tasks beside it
                siblings = (re.search(r"^\s*local_name:\s*([\w./-]+)", y.read_text(), re.M) for y in yaml.parent.glob("*.yaml"))
                by_task.setdefault(named.group(1), set()).update(m.group(1).split("/")[0] for m in siblings if m)
    return list(dict.fromkeys(folder for name in names for folder in sorted(by_task.get(name, ()))))
