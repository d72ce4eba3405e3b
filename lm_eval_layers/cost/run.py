"""`surgery bench` as a library call: resolve the plans against the model, count each, start
one worker process per row (`worker.py`), measure the rows interleaved — repeat r runs every row
once, starting one row further along, so load drift hits all rows alike and no row always runs
first — then accuracy through the `Evaluator`, and return bench.json's document (`bench_rows.py`).

Workers load one after another (no two loads compete) and each waits idle while another row is
measured, so a measurement never shares the CPU with another row.
"""

from __future__ import annotations

import multiprocessing
import os
import platform
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable

from lm_eval_layers.arch import check_plan, num_layers
from lm_eval_layers.checkpoint.sources import GGUFFile, Source, header_depth, open_model
from lm_eval_layers.cost.count import size
from lm_eval_layers.cost.bench_rows import SPEEDS, Measured, rows
from lm_eval_layers.cost.settings import FULL, BenchSettings
from lm_eval_layers.cost.worker import Job, Ready, serve
from lm_eval_layers.errors import UsageError
from lm_eval_layers.plan import LayerPlan, PlanSpec

Progress = Callable[[str, int, int], None]  # (what, done, total)


def resolve(settings: BenchSettings, source: Source) -> list[tuple[str, LayerPlan]]:
    """(label, plan) per plan, the full model first when it was not given (speed-ups need it);
    refused before anything runs when the prompt and the new tokens exceed the model's context."""
    text = source.hf_config.get_text_config()
    context = getattr(text, "max_position_embeddings", None)
    if context is not None and settings.prompt_tokens + settings.new_tokens > context:
        raise UsageError(f"--prompt-tokens {settings.prompt_tokens} + --new-tokens {settings.new_tokens} exceed the "
                         f"model's context of {context} tokens; use at most {context} in all")
    depth, model_type = num_layers(source.config), source.config.get("model_type")
    plans = [(label, spec.resolve(depth, model_type)) for label, spec in settings.specs()]
    for _, plan in plans:
        check_plan(plan, source.hf_config)
    if not any(plan.is_identity for _, plan in plans):
        plans.insert(0, (FULL, PlanSpec().resolve(depth, model_type)))
    return plans


def _measure(jobs: list[Job], names: list[str], repeats: int, progress: Progress) -> list[tuple[Ready, list[Any], float]]:
    """Start the workers one by one, then interleave their repeats; (ready, samples, peak) per job."""
    spawn = multiprocessing.get_context("spawn")  # a fresh interpreter: nothing inherited from this process
    procs, conns, ready = [], [], []
    total = len(jobs) * (1 + repeats)
    try:
        for k, job in enumerate(jobs):
            mine, theirs = spawn.Pipe()
            proc = spawn.Process(target=serve, args=(theirs, job), daemon=True)
            proc.start()
            theirs.close()
            procs.append(proc)
            conns.append(mine)
            ready.append(_answer(mine, names[k]))
            progress(f"loaded {names[k]}", k + 1, total)
        samples: list[list[Any]] = [[] for _ in jobs]
        for r in range(repeats):
            for step in range(len(jobs)):
                k = (r + step) % len(jobs)
                conns[k].send("run")
                samples[k].append(_answer(conns[k], names[k]))
                progress(f"repeat {r + 1}/{repeats}: {names[k]}", len(jobs) * (1 + r) + step + 1, total)
        peaks = [float(_answer(c, n)) for c, n in zip(conns, names)]
        return list(zip(ready, samples, peaks))
    finally:  # a worker still waiting after a failure elsewhere is stopped
        for proc in procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
                proc.join()


def _answer(conn: Any, name: str) -> Any:
    """A worker's next message; a traceback text (or a closed pipe) is the worker failing."""
    try:
        message = conn.recv()
    except EOFError:
        raise RuntimeError(f"the worker measuring {name} exited without an answer (out of memory?)") from None
    if isinstance(message, str):
        raise RuntimeError(f"the worker measuring {name} failed:\n{message}")
    return message


def accuracy_metrics(manager: Any, names: list[str]) -> dict[str, tuple[str, str]]:
    """Per leaf task (groups flattened), the metric bench reports as its accuracy and the key
    `Evaluator` reports it under: the task's first higher-is-better metric (`acc` for the
    multiple-choice tasks, `exact_match` for nq_open_local), keyed `metric` under lm-eval's
    default filter and `metric,FILTER` under a task's own first filter
    (`exact_match,remove_whitespace`). Decided before anything is timed, so a task with no such
    metric (a perplexity) is refused up front instead of failing after every measurement."""
    from lm_eval_layers.task_suite import load_tasks

    chosen = {}
    for name, task in load_tasks(manager, names).items():
        better = task.higher_is_better()
        metric = next((m for m in task.aggregation() if better.get(m)), None)
        if metric is None:
            raise UsageError(f"task {name} has no higher-is-better metric to report as accuracy (it reports "
                             f"{', '.join(task.aggregation())}); bench tasks like arc_easy_local or nq_open_local")
        filters = task.config.filter_list or [{"name": "none"}]
        chosen[name] = (metric, metric if filters[0]["name"] == "none" else f"{metric},{filters[0]['name']}")
    return chosen


def _accuracy(settings: BenchSettings, plans: list[LayerPlan], manager: Any,
              metrics: dict[str, tuple[str, str]], progress: Progress) -> list[dict[str, float]]:
    """Each plan's accuracy per task: the metric `accuracy_metrics` chose (prepared requests
    report bare metric names, lm-eval's loop filtered ones)."""
    from lm_eval_layers.evaluate import Evaluator
    from lm_eval_layers.model import LayeredLM

    steps = len(plans) + 2
    progress("accuracy: loading the model", 0, steps)
    lm = LayeredLM(pretrained=settings.model, dtype=settings.dtype.value, device=settings.device.value,
                   batch_size=settings.eval_batch_size)
    progress("accuracy: preparing the requests (the full model runs once)", 1, steps)
    evaluator = Evaluator(lm, settings.task_names, manager=manager, limit=settings.limit)
    out = []
    for k, plan in enumerate(plans):
        progress(f"accuracy: {plan.describe()}", 2 + k, steps)
        reported = evaluator.evaluate(plan).metrics
        row = {}
        for task, (metric, key) in metrics.items():
            values = reported[task]
            if key not in values and metric not in values:
                raise RuntimeError(f"{task} reported {sorted(values)}, not its metric {key}")
            row[task] = float(values[key] if key in values else values[metric])
        out.append(row)
    return out


def bench(settings: BenchSettings, progress: Progress = lambda what, done, total: None) -> dict[str, Any]:
    """Measure every plan of `settings` and return bench.json's document."""
    started = time.time()
    load_before = os.getloadavg()
    manager, metrics = None, {}
    if settings.task_names:
        from lm_eval_layers.task_suite import task_manager

        manager = task_manager(settings.include_path)
        metrics = accuracy_metrics(manager, settings.task_names)
    depth = header_depth(settings.model)
    if depth is not None:  # plans out of range, before the seconds opening a GGUF takes
        for _, spec in settings.specs():
            spec.resolve(depth)
    source = open_model(settings.model)
    plans = resolve(settings, source)
    folder, gguf = (str(source.path.parent), source.path.name) if isinstance(source, GGUFFile) else (str(source.folder), None)
    base = Job(folder, gguf, None, settings.dtype.value, settings.device.value, settings.threads, settings.batch,
               settings.prompt_tokens, settings.new_tokens, settings.repeats)
    rows_in: list[tuple[int, str, Job]] = []  # (index into plans, kind, job)
    with tempfile.TemporaryDirectory(prefix="surgery-bench-") as work:
        for k, (label, plan) in enumerate(plans):
            rows_in.append((k, "in-memory", replace(base, plan=plan.to_dict())))
            if settings.checkpoints and not plan.is_identity:
                from lm_eval_layers.checkpoint.writer import write_variant

                progress(f"writing {label}", 0, 1)
                written = write_variant(source, plan, Path(work) / str(k), command="bench", metadata=False)
                rows_in.append((k, "checkpoint", replace(base, model=str(written.out), gguf_file=None)))
        names = [f"{plans[k][0]} ({kind})" for k, kind, _ in rows_in]
        results = _measure([job for *_, job in rows_in], names, settings.repeats, progress)
    by_plan: list[dict[str, float] | None] = [None] * len(plans)
    if settings.task_names:
        by_plan = list(_accuracy(settings, [plan for _, plan in plans], manager, metrics, progress))
    measured = []
    for (k, kind, _), (ready, samples, peak) in zip(rows_in, results):
        label, plan = plans[k]
        acc = by_plan[k] if kind == "in-memory" else None  # a checkpoint computes what its plan does (tests/test_surgery.py)
        counted = size(source, plan, settings.dtype.torch)
        measured.append(Measured(
            label, kind, plan.describe(), plan.to_dict(), plan.is_identity, len(plan.slots), counted.params,
            counted.bytes, counted.shape, {key: [getattr(s, key) for s in samples] for key in SPEEDS},
            peak, ready.load_peak_memory_mb, acc))
    return {"plans": rows(measured, settings.prompt_tokens),
            "settings": {**_record(settings, results[0][0].threads, load_before, started),
                         "accuracy_metrics": {task: key for task, (_, key) in metrics.items()}}}


def _record(settings: BenchSettings, threads: int, load_before: tuple[float, float, float], started: float) -> dict[str, Any]:
    """Every option and what the numbers depend on: threads, versions, machine, load."""
    import torch
    import transformers

    given = {k: (str(v) if isinstance(v, Path) else getattr(v, "value", v)) for k, v in asdict(settings).items()}
    device = torch.cuda.get_device_name() if settings.device.value == "cuda" else _cpu_name()
    return {**given, "threads": threads, "torch": torch.__version__, "transformers": transformers.__version__,
            "device_name": device, "cpu_count": os.cpu_count(), "load_average_before": list(load_before),
            "load_average_after": list(os.getloadavg()), "seconds": time.time() - started}


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()
