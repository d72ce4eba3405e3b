"""`surgery search` as a library call: check the settings against the model's depth, load the
model once, score candidates on calibration windows (`engine.py`) with a method
(`methods.py`), and return the search.json document (its final `plan` has the schema of
`layer_plan.json`, so every executor reads it)."""

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
from lm_eval_layers.search.units import all_units, protected_units, unit_parameters
from lm_eval_layers.calibration import calibration_windows, parse_shape

SCHEMA = 1


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
    if name in ("greedy", "beam"):
        return greedy(problem, settings.beam, progress)
    if name == "last":
        return last(problem, progress)
    if name == "angular":
        return angular(problem, progress)
    if name == "bi":
        return ranked(problem, block_influence_order(problem), progress)
    return ranked(problem, scores_order(problem, scores_values(settings, problem.engine.num_layers)), progress)


@torch.no_grad()
def find_plan(settings: SearchSettings, progress: Progress = lambda *a: None) -> dict[str, Any]:
    """Run the search; returns the search.json document."""
    from lm_eval_layers.calibration import read_calibration
    from lm_eval_layers.outputs import check_file

    check_file(settings.out, settings.force)
    if settings.plot:
        check_file(settings.plot, settings.force, "--plot")
    calibration = read_calibration(settings.calibration)
    count, tokens = parse_shape(settings.tokens)
    start = time.perf_counter()
    depth = model_depth(settings.model)
    candidates = check_budget(settings, depth)
    if settings.method_name == "scores":
        scores_values(settings, depth)  # before any weight is read
    windows = calibration_windows(load_tokenizer(settings.model), calibration.text, count, tokens, settings.seed)
    model = load_model(settings.model, settings.dtype.torch, "cuda" if torch.cuda.is_available() else "cpu")

    from lm_eval_layers.arch import layout_for
    from lm_eval_layers.search.engine import CalibrationEngine

    layout = layout_for(model)
    sizes = unit_parameters(model, layout, settings.unit == SearchUnit.halves)
    total = sum(p.numel() for p in model.parameters())
    budget = Budget(settings.remove, settings.keep_share)
    if settings.keep_share is not None and total - sum(sizes[u] for u in candidates) > settings.keep_share * total:
        raise UsageError(f"--params {settings.params} cannot be met: removing every unprotected unit keeps "
                         f"{1 - sum(sizes[u] for u in candidates) / total:.1%}; keep more or protect less")
    loaded = time.perf_counter()
    progress("running the full model on the calibration windows", 0, 1)
    engine = CalibrationEngine(model, windows, settings.objective.value, settings.batch_size)
    problem = Problem(engine, candidates, sizes, total, budget, model.config.model_type, settings.seed)
    steps = run_method(settings, problem, progress)
    removed = steps[-1].removed if steps else []
    plan = problem.plan(removed)
    sleb = sum(n * (depth - i - 1) for i, n in enumerate(range(len(candidates), len(candidates) - len(steps), -1)))
    return {
        "schema": SCHEMA, "tool": "lm-eval-layers", "version": __version__, "command": "search",
        "model": settings.model, "model_type": model.config.model_type, "num_layers": depth,
        "method": settings.method, "unit": settings.unit.value, "objective": settings.objective.value,
        "budget": {"remove": settings.remove, "params": settings.params}, "protect": settings.protect,
        "calibration": {"path": str(calibration.path), "sha256": calibration.sha256, "windows": count,
                        "tokens": tokens, "seed": settings.seed},
        "dtype": settings.dtype.value, "full_objective": problem.per_token(engine.full_scores),
        "steps": [{**vars(s), "removed": list(s.removed), "plan": problem.plan(s.removed).to_dict()} for s in steps],
        "plan": plan.to_dict(), "description": plan.describe(),
        "params": problem.kept(removed), "total_params": total,
        "block_passes": engine.block_passes,
        # what SLEB's loop as written costs for the same removals: every candidate runs the whole stack
        "as_written_block_passes": sleb if settings.unit == SearchUnit.block and settings.beam == 1 else None,
        "load_seconds": loaded - start, "search_seconds": time.perf_counter() - loaded,
    }
