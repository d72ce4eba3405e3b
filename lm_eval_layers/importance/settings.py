"""What `surgery score` takes, declared once (`lm_eval_layers.settings`) and checked before any
model loads, and the names it chooses between (methods, estimators, units, metrics).

Imports no torch, transformers, lm-eval or datasets: the command's `--help` and its argument
errors are instant, and the library (`importance/session.py`, `score_model`) takes the same object.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Literal

from lm_eval_layers.calibration import calibration_option, parse_shape, tokens_option
from lm_eval_layers.errors import UsageError
from lm_eval_layers.importance import shapiq_adapter
from lm_eval_layers.plan import unit_name
from lm_eval_layers.precision import DType
from lm_eval_layers.settings import MODEL_HELP, argument, option
from lm_eval_layers.task_suite import include_path_option, limit_option, task_names, tasks_option

EXACT_LIMIT = 16  # units above which --method exact needs --force (2^16 evaluations)


# Angular distance and block influence are means over tokens, cheap to estimate: score keeps the
# 16x128 it always used (not re-measured against larger samples; --tokens takes more). Search
# ranks removals (32x256) and repair fits d² parameters (128x256), so they default to more.
SIMILARITY_TOKENS = "16x128"


class Method(str, Enum):
    """How units are scored: games on tasks (Shapley, exact, leave-one-out, the window
    heuristic) or representation similarity on calibration text (angular distance, block
    influence)."""

    shapley = "shapley"
    exact = "exact"
    ablation = "ablation"
    window = "window"
    angular = "angular"
    bi = "bi"

    @property
    def is_similarity(self) -> bool:
        return self in (Method.angular, Method.bi)


class Estimator(str, Enum):
    """Shapley estimators for `Method.shapley` (besides shapiq's, `shapiq:NAME`): regression-
    adjusted Monte Carlo with a boosted-trees or 3-additive surrogate, paired KernelSHAP,
    antithetic permutations."""

    ramc = "ramc"
    ramc_kadd = "ramc-kadd"
    regression = "regression"
    permutation = "permutation"

    @property
    def nested(self) -> bool:
        """Its coalitions at a smaller budget are a prefix of those at a larger one, so the
        rounds of `--tol` extend each other (regression enumerates whole size strata first)."""
        return self in (Estimator.ramc, Estimator.ramc_kadd, Estimator.permutation)


DEFAULT_ESTIMATOR = Estimator.ramc


def estimator_name(text: str) -> str:
    """The canonical name of a Shapley estimator: a built-in one, or `shapiq:NAME` (NAME one of
    `shapiq_adapter.APPROXIMATORS` or shapiq's own class name), in any case. An unknown name is
    refused, never replaced by another estimator."""
    if text.lower().startswith(shapiq_adapter.PREFIX):
        return shapiq_adapter.PREFIX + shapiq_adapter.check_name(text)
    for e in Estimator:
        if e.value == text.lower():
            return e.value
    raise UsageError(f"--estimator {text!r} is not one of {', '.join(e.value for e in Estimator)}, "
                     f"or shapiq:NAME ({'|'.join(shapiq_adapter.APPROXIMATORS)})")


class Unit(str, Enum):
    """What a player is: a whole block, or one half of a block, its attention or its MLP branch
    (then both halves of every block are players, ordered attn0, mlp0, attn1, …)."""

    block = "block"
    halves = "halves"

    @classmethod
    def _missing_(cls, value: object) -> Unit | None:
        # `--unit attn` and `--unit mlp` were the names of `halves` (both meant every half); files
        # and commands that use them keep working.
        return cls.halves if value in ("attn", "mlp") else None

    def players(self, num_layers: int) -> int:
        return num_layers if self is Unit.block else 2 * num_layers

    def names(self, num_layers: int) -> list[str]:
        if self is Unit.block:
            return [unit_name(i) for i in range(num_layers)]
        return [unit_name(i, half) for i in range(num_layers) for half in ("attn", "mlp")]


class Metric(str, Enum):
    """The per-example column a game averages (see `columns.py`)."""

    acc = "acc"
    acc_norm = "acc_norm"
    loglik = "loglik"
    margin = "margin"


class Position(str, Enum):
    """Where angular distance is measured: the last token of each window, or every token."""

    last = "last"
    all = "all"


@dataclass(frozen=True)
class ScoreSettings:
    """Everything a scoring run is told. Checked on creation, before any model loads."""

    model: str = argument(MODEL_HELP)
    method: Method = option(Method.shapley, "--method", "how units are scored")
    unit: Literal["block", "halves", "attn", "mlp"] = option(
        "block", "--unit", "whole blocks, or halves: the attention and the MLP branch of every block "
        "(attn and mlp mean halves too)")
    tasks: str = tasks_option("arc_easy_local", "the game's value is their mean metric")
    include_path: Path | None = include_path_option()
    limit: int | None = limit_option()
    metric: Metric = option(Metric.acc, "--metric", "per-example metric the game averages")
    budget: int = option(400, "--budget", "coalition evaluations for --method shapley")
    estimator: str = option(DEFAULT_ESTIMATOR.value, "--estimator",
                            f"Shapley estimator: {'|'.join(e.value for e in Estimator)}, or shapiq:NAME (optional extra)")
    tol: float | None = option(None, "--tol", "stop once the widest 95% coalition-sampling half-width is ≤ TOL (or the budget is spent)")
    seed: int = option(0, "--seed")
    level: int = option(3, "--level", "window length for --method window")
    position: Position = option(Position.last, "--position", "angular distance at the last token or all tokens")
    out: Path = option(Path("scores.json"), "--out", "scores JSON (evaluations go to the same name .sqlite)")
    plot: Path | None = option(None, "--plot", "PNG bar chart with error bars")
    resume: bool = option(False, "--resume", "reuse the evaluations stored next to --out")
    force: bool = option(False, "--force", f"replace an existing --out; also allows --method exact above {EXACT_LIMIT} units")
    dtype: DType = option(DType.float32, "--dtype")
    batch_size: int = option(32, "--batch-size", "lm-eval requests per forward pass (as lm_eval --batch_size)")
    calibration: Path | None = calibration_option("text file for angular / bi (default: the local WikiText-2 test text)")
    tokens: str = tokens_option(SIMILARITY_TOKENS, "for angular / bi; up to this many windows, as many as the text holds")

    def __post_init__(self) -> None:
        from lm_eval_layers.calibration import calibration_file

        for field, kind in (("method", Method), ("metric", Metric), ("position", Position), ("dtype", DType)):
            object.__setattr__(self, field, kind(getattr(self, field)))  # Python callers may pass the names
        Unit(self.unit)
        name = estimator_name(self.estimator)
        if self.tol is not None:
            if self.tol <= 0:
                raise UsageError("--tol must be a positive half-width, e.g. --tol 0.01")
            nested = [e.value for e in Estimator if e.nested]
            if self.method != Method.shapley or name not in nested:
                raise UsageError(f"--tol needs --method shapley with --estimator {'|'.join(nested)} (their rounds extend each other)")
        for flag, value, least in (("--budget", self.budget, 4), ("--level", self.level, 1),
                                   ("--batch-size", self.batch_size, 1), ("--limit", self.limit, 1)):
            if value is not None and value < least:
                raise UsageError(f"{flag} {value}: give at least {least}")
        if not self.task_names:
            raise UsageError("--tasks is empty; name at least one task, e.g. --tasks arc_easy_local")
        if self.method.is_similarity:
            if self.players != Unit.block:
                raise UsageError(f"--method {self.method.value} scores blocks; use --unit block")
            calibration_file(self.calibration)
        parse_shape(self.tokens)
        if not self.method.is_similarity and self.tokens != SIMILARITY_TOKENS:
            raise UsageError("--tokens sets the calibration windows of --method angular or bi; leave it out for task methods")

    @property
    def players(self) -> Unit:
        """What a player is (`--unit attn` and `--unit mlp` are `Unit.halves`)."""
        return Unit(self.unit)

    @property
    def task_names(self) -> list[str]:
        return task_names(self.tasks)

    @property
    def shapley_estimator(self) -> str | None:
        """The estimator's canonical name with --method shapley; None for the other methods."""
        return estimator_name(self.estimator) if self.method is Method.shapley else None

    @property
    def store_path(self) -> Path:
        """Where the evaluated coalitions are kept: beside --out, as .sqlite."""
        return self.out.with_suffix(".sqlite")
