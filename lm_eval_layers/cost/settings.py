"""What `surgery bench` takes, declared once (`lm_eval_layers.settings`), and checked before
the model is opened: plan syntax, counts, output files and the device. Imports no torch unless
`--device cuda` asks whether there is a GPU."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from lm_eval_layers.errors import LayersError, UsageError
from lm_eval_layers.outputs import check_file
from lm_eval_layers.plan import PlanSpec, plan_text_args
from lm_eval_layers.precision import DType
from lm_eval_layers.scores_file import Scores, load_scores, read_scores
from lm_eval_layers.settings import MODEL_HELP, argument, option, required
from lm_eval_layers.task_suite import include_path_option, limit_option, task_names, tasks_option

FULL = "full"  # the label of the unchanged model


class Device(str, Enum):
    cpu = "cpu"
    cuda = "cuda"


def plan_from_text(text: str) -> PlanSpec:
    """A plan in the plugin's syntax (`plan.plan_text_args`); repairs are refused: bench measures cost."""
    for part in text.split(","):
        if part.partition("=")[0].strip() in ("repair", "ridge", "calibration", "tokens") and "=" in part:
            raise UsageError(f"plan {text!r}: a repair does not change a variant's cost (same tensors, same shapes); bench "
                             "the plan without it and evaluate the repaired model with lm_eval --model layered")
    try:
        args = plan_text_args(text)
    except LayersError as e:
        raise UsageError(str(e)) from None
    try:
        return PlanSpec.from_args(**load_scores(args))
    except LayersError as e:
        raise UsageError(f"plan {text!r}: {e}") from None


def lowest_series(scores: Scores, ks: str | None) -> list[int]:
    """The K of a scores file's `drop_lowest=K` series: as given (`2,4,8`), else 0 to half the
    units in steps of an eighth of them."""
    n = len(scores.values)
    if ks is None:
        return list(range(0, n // 2 + 1, max(1, n // 8)))
    try:
        series = [int(k) for k in ks.split(",")]
    except ValueError:
        raise UsageError(f"--drop-lowest {ks!r}: give whole numbers of units, e.g. 2,4,8") from None
    bad = [k for k in series if not 0 <= k < n]
    if bad:
        raise UsageError(f"--drop-lowest {bad[0]}: the scores file has {n} units; use 0..{n - 1}")
    return series


def _search_steps(path: Path) -> list[tuple[str, PlanSpec]] | None:
    """The plan after each step of a `surgery search` output, labelled by what it removed so
    far; None when the file is not a search.json."""
    import json

    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("command") != "search":
        return None
    from lm_eval_layers.plan import LayerPlan

    return [(f"{len(step['removed'])} removed ({step['removed'][-1]})",
             PlanSpec(fixed=(LayerPlan.from_dict(step["plan"]), doc.get("model_type"))))
            for step in doc["steps"]]


@dataclass(frozen=True)
class BenchSettings:
    model: str = argument(MODEL_HELP)
    out: Path = required("--out", "bench.json to write")
    plans: list[str] | None = option(None, "--plans", "a plan in the plugin's syntax, repeated: '' (the full model), "
                                     "drop=20-27, preset=llama-pro:4, drop=3;5-7,drop_attn=0")
    from_file: Path | None = option(None, "--from", "scores.json of `surgery score` (its drop_lowest=K series) or search.json of "
                                     "`surgery search` (the plan after each step)")
    drop_lowest: str | None = option(None, "--drop-lowest", "with --from: the K of the series, e.g. 2,4,8 "
                                     "(default: 0 to half the units in steps of an eighth)")
    prompt_tokens: int = option(512, "--prompt-tokens", "prompt length P (pp: tokens/s over P tokens)")
    new_tokens: int = option(128, "--new-tokens", "tokens generated after the prompt (tg: tokens/s)")
    batch: int = option(1, "--batch", "sequences per forward")
    repeats: int = option(10, "--repeats", "measurements per plan after one warm-up (median and IQR reported)")
    device: Device = option(Device.cpu, "--device", "where the model runs")
    dtype: DType = option(DType.float32, "--dtype", "weights and compute dtype")
    threads: int = option(0, "--threads", "torch threads (0: torch's default, one per core)")
    tasks: str | None = tasks_option(None, "accuracy of every plan (Evaluator): each task's first higher-is-better "
                                     "metric, e.g. acc, or exact_match for a generation task")
    include_path: Path | None = include_path_option()
    limit: int | None = limit_option()
    eval_batch_size: int = option(32, "--eval-batch-size", "batch size of the accuracy evaluation")
    checkpoints: bool = option(False, "--checkpoints", "also time each plan written as a checkpoint "
                               "(the `surgery prune`/`expand` folder, in a temporary folder) and loaded as is")
    plot: Path | None = option(None, "--plot", "PNG of accuracy against measured tg and pp (needs --tasks)")
    force: bool = option(False, "--force", "replace existing --out / --plot files")

    def __post_init__(self) -> None:
        for flag, value, least in (("--prompt-tokens", self.prompt_tokens, 1), ("--new-tokens", self.new_tokens, 1),
                                   ("--batch", self.batch, 1), ("--repeats", self.repeats, 1),
                                   ("--threads", self.threads, 0), ("--eval-batch-size", self.eval_batch_size, 1)):
            if value < least:
                raise UsageError(f"{flag} {value}: must be at least {least}")
        if self.limit is not None and self.limit < 1:
            raise UsageError(f"--limit {self.limit}: must be at least 1 document")
        if self.drop_lowest is not None and self.from_file is None:
            raise UsageError("--drop-lowest picks a series of a scores file; give it with --from scores.json")
        if self.include_path is not None and not self.task_names:
            raise UsageError("--include-path adds task YAMLs for --tasks; give --tasks to measure accuracy with them")
        if self.plot is not None and not self.task_names:
            raise UsageError("--plot draws accuracy against speed; give --tasks to measure accuracy")
        check_file(self.out, self.force)
        if self.plot is not None:
            check_file(self.plot, self.force, "--plot")
        self.specs()
        if self.device is Device.cuda:
            import torch

            if not torch.cuda.is_available():
                raise UsageError("--device cuda: torch sees no CUDA device here; use --device cpu")

    @property
    def task_names(self) -> list[str]:
        return task_names(self.tasks)

    def specs(self) -> list[tuple[str, PlanSpec]]:
        """(label, plan) in the order given: --plans, then the --from series."""
        given = [(text.strip() or FULL, plan_from_text(text)) for text in self.plans or []]
        if self.from_file is not None and _search_steps(self.from_file) is not None:
            if self.drop_lowest is not None:
                raise UsageError("--drop-lowest picks a series of a scores file; a search.json brings its own steps")
            given += [(FULL, PlanSpec())] + _search_steps(self.from_file)
        elif self.from_file is not None:
            scores = read_scores(self.from_file)
            given += [(f"drop_lowest={k}" if k else FULL,
                       PlanSpec.from_args(scores=scores, drop_lowest=k) if k else PlanSpec())
                      for k in lowest_series(scores, self.drop_lowest)]
        if not given:
            raise UsageError("give plans to bench with --plans (e.g. --plans '' --plans drop=20-27) or --from scores.json")
        return given
