"""What `surgery search` takes, declared once, checked before the model loads."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from lm_eval_layers.errors import UsageError
from lm_eval_layers.precision import DType, float16_needs_a_gpu
from lm_eval_layers.shares import parse_share
from lm_eval_layers.settings import MODEL_HELP, argument, coerce_enums, option, required
from lm_eval_layers.calibration import calibration_option, parse_shape, seed_option, tokens_option
from lm_eval_layers.task_suite import include_path_option, limit_option, task_names, tasks_option

DEFAULT_TASK = "arc_easy_local"


class SearchUnit(str, Enum):
    block = "block"
    halves = "halves"  # attention and MLP branches as separate units


class Objective(str, Enum):
    """What a search minimises: calibration-text nll or kl (`engine.py`), or the error of a task
    metric on lm-eval tasks (`task_engine.py`: 1 − acc, 1 − acc_norm, or −loglik of the gold answer)."""

    nll = "nll"
    kl = "kl"
    acc = "acc"
    acc_norm = "acc_norm"
    loglik = "loglik"

    @property
    def on_tasks(self) -> bool:
        return self not in (Objective.nll, Objective.kl)


METHODS = ("greedy", "beam:B", "last", "bi", "angular", "scores:FILE", "evolve")


@dataclass(frozen=True)
class SearchSettings:
    model: str = argument(MODEL_HELP)
    out: Path = required("--out", "search.json to write (refused if it exists, unless --force)")
    remove: int | None = option(None, "--remove", "units to remove")
    params: str | None = option(None, "--params", "keep at most this share of the parameters, e.g. 75%")
    unit: SearchUnit = option(SearchUnit.block, "--unit", "whole blocks, or attention and MLP branches separately")
    method: str = option("greedy", "--method", "greedy (SLEB), beam:B (the B best sets per step), last (the deepest units), "
                         "bi (ShortGPT's block influence), angular (Gromov et al.'s closest contiguous run) or scores:FILE "
                         "(a `surgery score` ranking, lowest first) or evolve (EvoPress: mutate the removal set, screen on few windows, keep the best)")
    protect: str = option("0,-1", "--protect", "blocks never removed (plan syntax; '' for none)")
    objective: Objective = option(Objective.nll, "--objective", "nll of the calibration text, kl from the full model's "
                                  "next-token distribution, or a task metric (acc, acc_norm, loglik of the gold answer) on --tasks")
    tasks: str | None = tasks_option(None, f"what a task --objective is measured on (default {DEFAULT_TASK})")
    include_path: Path | None = include_path_option()
    limit: int | None = limit_option()
    calibration: Path | None = calibration_option()
    tokens: str = tokens_option("32x256")
    seed: int = seed_option()
    batch_size: int = option(4, "--batch-size", "windows per forward pass (logits of one batch exist at a time)")
    dtype: DType = option(DType.float32, "--dtype", "compute dtype (float32 on CPU)")
    generations: int = option(20, "--generations", "evolve: at most this many generations")
    offspring: int = option(16, "--offspring", "evolve: children per generation, each one swap from the best set, screened")
    survivors: int = option(2, "--survivors", "evolve: screened children scored on every calibration window per generation")
    screen: int = option(4, "--screen", "evolve: calibration windows children are screened on (the first ones; "
                         "documents per task with a task --objective)")
    plot: Path | None = option(None, "--plot", "PNG of the objective against units removed")
    resume: bool = option(False, "--resume", "reuse the evaluations stored next to --out (the .sqlite of its name)")
    force: bool = option(False, "--force", "replace an existing --out / --plot, and start a stored search afresh")

    def __post_init__(self) -> None:
        coerce_enums(self)
        if (self.remove is None) == (self.params is None):
            raise UsageError("give one budget: --remove K (units) or --params P% (share of parameters kept)")
        if self.remove is not None and self.remove < 1:
            raise UsageError(f"--remove {self.remove}: remove at least 1 unit")
        if self.params is not None:
            self.keep_share  # noqa: B018 — parses and checks it
        self.beam  # noqa: B018
        parse_shape(self.tokens)
        if not self.objective.on_tasks and (self.tasks is not None or self.include_path is not None):
            raise UsageError(f"--tasks and --include-path are for a task objective; add --objective acc, acc_norm or "
                             f"loglik, or leave them out for --objective {self.objective.value}")
        if self.tasks is not None and not task_names(self.tasks):
            raise UsageError(f"--tasks is empty; name at least one task, e.g. --tasks {DEFAULT_TASK}")
        if self.objective.on_tasks and self.limit is not None and self.limit < 1:
            raise UsageError(f"--limit {self.limit}: give at least 1 document per task")
        if self.batch_size < 1:
            raise UsageError("--batch-size must be at least 1")
        for name in ("generations", "offspring", "survivors", "screen"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name} {getattr(self, name)}: give at least 1")
        if self.survivors > self.offspring:
            raise UsageError(f"--survivors {self.survivors} exceeds --offspring {self.offspring}; survivors are chosen among them")
        if self.dtype == DType.float16:
            float16_needs_a_gpu("--dtype")

    @property
    def keep_share(self) -> float | None:
        if self.params is None:
            return None
        return parse_share("--params", self.params, allow_whole=False)

    @property
    def beam(self) -> int:
        """The beam width of greedy (1) and beam:B; 0 for the methods that do not search."""
        name, _, arg = self.method.partition(":")
        if name in ("greedy", "last", "bi", "angular", "evolve") and not arg:
            if name == "angular" and self.unit == SearchUnit.halves:
                raise UsageError("--method angular removes a contiguous run of blocks; use --unit block")
            if name == "bi" and self.unit == SearchUnit.halves:
                raise UsageError("--method bi ranks whole blocks; use --unit block")
            return 1 if name == "greedy" else 0
        if name == "beam" and arg.isdigit() and int(arg) >= 1:
            return int(arg)
        if name == "scores" and arg:
            if not Path(arg).is_file():
                raise UsageError(f"--method {self.method}: no scores file at {arg}; give a scores.json of `surgery score`")
            return 0
        raise UsageError(f"--method {self.method}: use one of {', '.join(METHODS)} (e.g. beam:4)")

    @property
    def task_names(self) -> list[str]:
        """The tasks of a task objective (default arc_easy_local); none for nll and kl."""
        return (task_names(self.tasks) or [DEFAULT_TASK]) if self.objective.on_tasks else []

    @property
    def store_path(self) -> Path:
        """Where every evaluated candidate is kept: beside --out, as .sqlite."""
        return self.out.with_suffix(".sqlite")

    @property
    def method_name(self) -> str:
        return self.method.partition(":")[0]
