"""`surgery search` as a library call: check the settings against the model's depth, load the
model once, score candidates on calibration windows (`engine.py`) or lm-eval tasks
(`task_engine.py`) with a method (`methods.py`, `evolve.py`), keep every evaluated candidate in
a store beside --out (`evaluations.py`; `--resume` reads it back; under `torchrun` each step's
candidates are split across the processes), and return the search.json document (its final
`plan` has the schema of `layer_plan.json`, so every executor reads it)."""

from __future__ import annotations

import time
from typing import Any

import torch

from lm_eval_layers import __version__
from lm_eval_layers.errors import UsageError
from lm_eval_layers.search.methods import (
    Budget, Problem, Progress, angular, block_influence_order, greedy, last, ranked, scores_order,
)
from lm_eval_layers.search.settings import SearchSettings, SearchUnit
from lm_eval_layers.search.removable import all_units, protected_units, unit_parameters
from lm_eval_layers.calibration import calibration_windows, parse_shape

SCHEMA = 1
MINIMISED = {  # what `objective` holds in search.json, per objective: a short label and its meaning
    "nll": ("nll/token", "next-token nll per token of the calibration windows"),
    "kl": ("kl/token", "KL(full ‖ variant) per token of the calibration windows"),
    "acc": ("1 − acc", "1 − acc, the mean over tasks of each task's mean"),
    "acc_norm": ("1 − acc_norm", "1 − acc_norm, the mean over tasks of each task's mean"),
    "loglik": ("−loglik", "−loglik of the gold answer, the mean over tasks of each task's mean"),
}


def model_depth(model: str) -> int:
    """The block count from the model's config alone (no weights read)."""
    from lm_eval_layers.arch import num_layers
    from lm_eval_layers.checkpoint.sources import open_model

    return num_layers(open_model(model).config)


def load_tokenizer(model: str) -> Any:
    import transformers

    from lm_eval_layers.default_model import resolve_alias

    path, gguf = resolve_alias(model, None)
    return transformers.AutoTokenizer.from_pretrained(str(path), **({"gguf_file": gguf} if gguf else {}))


def load_model(model: str, dtype: torch.dtype, device: str) -> Any:
    """The model in inference mode, for a folder, hub id, .gguf file or `smollm2`."""
    import transformers

    from lm_eval_layers.default_model import resolve_alias

    path, gguf = resolve_alias(model, None)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, **({"gguf_file": gguf} if gguf else {}))
    return loaded.to(device).eval()


def check_budget(settings: SearchSettings, num_layers: int) -> list:
    """The removable units, or a refusal naming the budget, `--protect` or `--unit` to change."""
    halves = settings.unit == SearchUnit.halves
    units = all_units(num_layers, halves)
    protected = protected_units(settings.protect, num_layers, halves)
    candidates = [u for u in units if u not in protected]
    if not candidates:
        raise UsageError(f"--protect {settings.protect} covers every block; protect fewer (e.g. 0,-1)")
    if settings.remove is not None and settings.remove >= len(units):
        raise UsageError(f"--remove {settings.remove} removes every unit of the {len(units)}; remove fewer")
    if settings.remove is not None and settings.remove > len(candidates):
        raise UsageError(f"--remove {settings.remove}: only {len(candidates)} units are not protected; "
                         "remove fewer or protect less")
    return candidates


def scores_values(settings: SearchSettings, depth: int) -> tuple[float, ...]:
    """The values of `--method scores:FILE`, refused unless the file scores this model's units."""
    from lm_eval_layers.scores_file import read_scores

    path = settings.method.partition(":")[2]
    scores = read_scores(path)
    units = len(all_units(depth, settings.unit == SearchUnit.halves))
    if scores.num_layers != depth or len(scores.values) != units:
        raise UsageError(f"{path} scores {len(scores.values)} {scores.unit} units of a {scores.num_layers}-block model; "
                         f"this search needs {units} {settings.unit.value} units of {depth} blocks: score this model "
                         "with the same --unit")
    return scores.values


def run_method(settings: SearchSettings, problem: Problem, progress: Progress) -> list:
    name = settings.method_name
    if name == "evolve":
        from lm_eval_layers.search.evolve import evolve

        return evolve(problem, settings.generations, settings.offspring, settings.survivors, progress)
    if name in ("greedy", "beam"):
        return greedy(problem, settings.beam, progress)
    if name == "last":
        return last(problem, progress)
    if name == "angular":
        return angular(problem, progress)
    if name == "bi":
        return ranked(problem, block_influence_order(problem), progress)
    return ranked(problem, scores_order(problem, scores_values(settings, problem.engine.num_layers)), progress)


def check_store(settings: SearchSettings) -> None:
    """An existing store is read only with --resume; --force starts afresh (it is removed once the
    search is about to write); otherwise refused, before any model loads."""
    store = settings.store_path
    if store.exists() and not settings.resume and not settings.force:
        raise UsageError(f"{store} already holds evaluations; pass --resume to reuse them, --force to start afresh, "
                         "or choose another --out")


def store_context(settings: SearchSettings, calibration: dict[str, Any], engine: Any) -> dict[str, Any]:
    """What a stored evaluation answers for: model files, calibration, objective, dtype, unit
    (and for a task objective the tasks in order, documents per task, and the tasks' configs and
    documents: an edited task YAML or other data is never answered from the store)."""
    from lm_eval_layers.default_model import resolve_alias
    from lm_eval_layers.identity import model_identity

    path, gguf = resolve_alias(settings.model, None)
    tasks = ({"tasks": settings.task_names, "limit": settings.limit, "task_identity": engine.evaluator.identity}
             if settings.objective.on_tasks else {})
    return {"model": model_identity(str(path), gguf_file=gguf), "calibration": calibration,
            "objective": settings.objective.value, "dtype": settings.dtype.value, "unit": settings.unit.value, **tasks}


def task_manager_for(settings: SearchSettings) -> Any:
    """lm-eval's task manager with the task names checked (one line for an unknown one), before
    any model loads; None for a calibration objective."""
    if not settings.objective.on_tasks:
        return None
    from lm_eval_layers.task_suite import check_task_names, task_manager

    manager = task_manager(settings.include_path)
    check_task_names(manager, settings.task_names)
    return manager


def engines(settings: SearchSettings, windows: torch.Tensor, manager: Any, progress: Progress) -> tuple[Any, Any, Any]:
    """(model, engine, screening engine or None) for the objective: calibration windows
    (`engine.py`), or lm-eval tasks through prepared requests (`task_engine.py`); evolve screens
    on the first --screen windows, or documents per task."""
    from lm_eval_layers import distributed
    from lm_eval_layers.search.engine import CalibrationEngine

    count = len(windows)
    evolve = settings.method_name == "evolve"
    if not settings.objective.on_tasks:
        model = load_model(settings.model, settings.dtype.torch, distributed.device())
        progress("running the full model on the calibration windows", 0, 1)
        engine = CalibrationEngine(model, windows, settings.objective.value, settings.batch_size)
        screen = None
        if evolve and settings.screen < count:
            screen = CalibrationEngine(model, windows[:settings.screen], settings.objective.value, settings.batch_size)
        return model, engine, screen
    from lm_eval_layers.evaluate import Evaluator
    from lm_eval_layers.model import LayeredLM
    from lm_eval_layers.search.task_engine import TaskEngine

    lm = LayeredLM(pretrained=settings.model, dtype=settings.dtype.value, device=distributed.device())
    distributed.one_replica(lm)
    progress(f"preparing {', '.join(settings.task_names)} and running the full model", 0, 1)
    tasks, objective = settings.task_names, settings.objective.value
    engine = TaskEngine(lm, Evaluator(lm, tasks, manager, settings.limit), objective, windows, settings.batch_size)
    screen = None
    if evolve and settings.screen < max(engine.sizes.values()):  # fewer documents than some task has
        screen = TaskEngine(lm, Evaluator(lm, tasks, manager, settings.screen), objective, windows, settings.batch_size)
    return lm.model, engine, screen


def check_outputs(settings: SearchSettings) -> None:
    """--out, --plot and the store beside --out, refused before anything is read or loaded."""
    from lm_eval_layers.outputs import check_file

    check_file(settings.out, settings.force)
    if settings.plot:
        check_file(settings.plot, settings.force, "--plot")
    check_store(settings)


def check_params(settings: SearchSettings, sizes: dict[Any, int], candidates: list, total: int) -> None:
    """A --params share that removing every unprotected unit still cannot reach is refused
    before the search runs (it would end without meeting it)."""
    if settings.keep_share is None:
        return
    removable = sum(sizes[u] for u in candidates)
    if total - removable > settings.keep_share * total:
        raise UsageError(f"--params {settings.params} cannot be met: removing every unprotected unit keeps "
                         f"{1 - removable / total:.1%}; keep more or protect less")


@torch.no_grad()
def find_plan(settings: SearchSettings, progress: Progress = lambda *a: None) -> dict[str, Any] | None:
    """Run the search; returns the search.json document (on rank 0 of a `torchrun` run, whose
    processes split each step's candidates; None on the others)."""
    from lm_eval_layers import distributed
    from lm_eval_layers.calibration import read_calibration

    from lm_eval_layers.importance.store import Store

    check_outputs(settings)
    manager = task_manager_for(settings)
    rank, world = distributed.setup()
    if rank != 0:
        progress = lambda *a: None  # noqa: E731 — rank 0 reports
    calibration = read_calibration(settings.calibration)
    count, tokens = parse_shape(settings.tokens)
    start = time.perf_counter()
    depth = model_depth(settings.model)
    candidates = check_budget(settings, depth)
    if settings.method_name == "scores":
        scores_values(settings, depth)  # before any weight is read
    windows = calibration_windows(load_tokenizer(settings.model), calibration.text, count, tokens, settings.seed)
    model, engine, screen = engines(settings, windows, manager, progress)

    from lm_eval_layers.arch import layout_for

    layout = layout_for(model)
    sizes = unit_parameters(model, layout, settings.unit == SearchUnit.halves)
    total = sum(p.numel() for p in model.parameters())
    budget = Budget(settings.remove, settings.keep_share)
    check_params(settings, sizes, candidates, total)
    loaded = time.perf_counter()
    calibration_key = {"sha256": calibration.sha256, "windows": count, "tokens": tokens, "seed": settings.seed}
    if rank == 0 and settings.store_path.exists() and not settings.resume:  # --force: start afresh
        settings.store_path.unlink()
    store = Store(settings.store_path if rank == 0 else None, store_context(settings, calibration_key, engine))
    problem = Problem(engine, candidates, sizes, total, budget, model.config.model_type, settings.seed, store, screen)
    steps = run_method(settings, problem, progress)
    distributed.finish(world)
    if rank != 0:
        return None
    return search_document(settings, problem, steps, depth, {"path": str(calibration.path), **calibration_key}, world,
                           start, loaded)


def as_written_block_passes(candidates: int, steps: int, depth: int) -> int:
    """What SLEB's loop as written costs for the same removals: each step runs every remaining
    candidate through the whole stack (a baseline for `block_passes`)."""
    return sum(n * (depth - i - 1) for i, n in enumerate(range(candidates, candidates - steps, -1)))


def search_document(settings: SearchSettings, problem: Problem, steps: list, depth: int, calibration: dict[str, Any],
                    world: int, start: float, loaded: float) -> dict[str, Any]:
    """search.json: the settings, every step, the final plan (in `layer_plan.json`'s schema) and
    what the search cost; `start` and `loaded` are when loading began and ended."""
    removed = steps[-1].removed if steps else []
    plan = problem.plan(removed)
    like_sleb = settings.unit == SearchUnit.block and settings.beam == 1  # SLEB removes whole blocks, one at a time
    return {
        "schema": SCHEMA, "tool": "lm-eval-layers", "version": __version__, "command": "search",
        "model": settings.model, "model_type": problem.model_type, "num_layers": depth,
        "method": settings.method, "unit": settings.unit.value, "objective": settings.objective.value,
        "budget": {"remove": settings.remove, "params": settings.params}, "protect": settings.protect,
        "calibration": calibration,
        **({"tasks": settings.task_names, "limit": settings.limit} if settings.objective.on_tasks else {}),
        "minimised": dict(zip(("label", "meaning"), MINIMISED[settings.objective.value])),
        "dtype": settings.dtype.value, "full_objective": problem.per_token(problem.evaluations.score([])),
        "steps": [step_record(problem, s) for s in steps],
        "plan": plan.to_dict(), "description": plan.describe(),
        "params": problem.kept(removed), "total_params": problem.total_params,
        "block_passes": problem.block_passes, "processes": world,
        "evaluations": evaluation_counts(problem),
        **({"evolve": {"generations": settings.generations, "offspring": settings.offspring,
                       "survivors": settings.survivors, "screen": settings.screen if problem.screen_engine else None}}
           if settings.method_name == "evolve" else {}),
        "as_written_block_passes": as_written_block_passes(len(problem.candidates), len(steps), depth)
        if like_sleb else None,
        "load_seconds": loaded - start, "search_seconds": time.perf_counter() - loaded,
    }


def step_record(problem: Problem, step: Any) -> dict[str, Any]:
    """A step of search.json; `generation` and `evaluations` only where the method has them (evolve)."""
    record = {k: v for k, v in vars(step).items() if v is not None or k not in ("generation", "evaluations")}
    return {**record, "removed": list(step.removed), "plan": problem.plan(step.removed).to_dict()}


def evaluation_counts(problem: Problem) -> dict[str, int]:
    """Candidates scored in this run: computed on the engines, or read back from the store."""
    parts = [problem.evaluations] + ([problem.screening] if problem.screening else [])
    return {"computed": sum(p.computed for p in parts), "stored": sum(p.stored for p in parts),
            **({"screened": problem.screening.count} if problem.screening else {})}
