"""Rows of `bench.json` from counted sizes and measured samples, torch-free.

bench.json: `{"plans": [row, …], "settings": {…}}`, rows in the order given (a written
checkpoint's row right after its plan's). Each row: plan (as given; `full` for the unchanged
model), kind (`in-memory` or `checkpoint`), description, blocks, params, bytes, flops_pp_per_token
(at P prompt tokens), flops_tg_per_token (one token after P), pp_tokens_per_s, tg_tokens_per_s,
ttft_s (each the median over the repeats, with `_iqr` beside it: the interquartile range),
peak_memory_mb (after the model was in place: RSS high-water mark on CPU, torch's peak
allocation on CUDA), load_peak_memory_mb (the process until then: loading, less the weights
a memory-mapped file has not yet paged in),
predicted_speedup_pp / _tg (the full model's FLOPs per token over the row's),
measured_speedup_pp / _tg (the row's median tokens/s over the full model's), accuracy (task →
its first higher-is-better metric, named in settings.accuracy_metrics: `acc`, or
`exact_match,remove_whitespace` for nq_open_local; or null), acc (their mean), pareto_pp / pareto_tg (on the front of acc against measured
pp / tg; null without accuracy), samples (every measurement) and layer_plan (the resolved plan).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, Sequence

from lm_eval_layers.cost.flops import Shape, generation_flops, prompt_flops
from lm_eval_layers.cost.pareto import front

SPEEDS = ("pp_tokens_per_s", "tg_tokens_per_s", "ttft_s")


@dataclass(frozen=True)
class Measured:
    """One row's inputs: what was counted and what was measured."""

    label: str
    kind: str
    description: str
    plan: dict[str, Any]
    full: bool  # the unchanged model
    blocks: int
    params: int
    bytes: int
    shape: Shape
    samples: dict[str, list[float]]  # SPEEDS -> one value per repeat
    peak_memory_mb: float
    load_peak_memory_mb: float
    accuracy: dict[str, float] | None


def median_iqr(values: Sequence[float]) -> tuple[float, float]:
    """Median and interquartile range (inclusive quartiles; 0 for a single value)."""
    if len(values) < 2:
        return float(values[0]), 0.0
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return statistics.median(values), q3 - q1


def rows(measured: Sequence[Measured], prompt_tokens: int) -> list[dict[str, Any]]:
    """The bench.json rows; speed-ups are against the first in-memory row of the full model."""
    base = next(m for m in measured if m.full and m.kind == "in-memory")
    base_pp, base_tg = prompt_flops(base.shape, prompt_tokens), generation_flops(base.shape, prompt_tokens)
    base_speed = {k: median_iqr(base.samples[k])[0] for k in SPEEDS}
    out = []
    for m in measured:
        row: dict[str, Any] = {"plan": m.label, "kind": m.kind, "description": m.description, "blocks": m.blocks,
                               "params": m.params, "bytes": m.bytes,
                               "flops_pp_per_token": prompt_flops(m.shape, prompt_tokens),
                               "flops_tg_per_token": generation_flops(m.shape, prompt_tokens)}
        for key in SPEEDS:
            row[key], row[f"{key}_iqr"] = median_iqr(m.samples[key])
        row.update(peak_memory_mb=m.peak_memory_mb, load_peak_memory_mb=m.load_peak_memory_mb,
                   predicted_speedup_pp=base_pp / row["flops_pp_per_token"],
                   measured_speedup_pp=row["pp_tokens_per_s"] / base_speed["pp_tokens_per_s"],
                   predicted_speedup_tg=base_tg / row["flops_tg_per_token"],
                   measured_speedup_tg=row["tg_tokens_per_s"] / base_speed["tg_tokens_per_s"],
                   accuracy=m.accuracy, acc=statistics.mean(m.accuracy.values()) if m.accuracy else None)
        out.append(row)
    for speed in ("pp", "tg"):
        points = [None if r["acc"] is None else (r[f"{speed}_tokens_per_s"], r["acc"]) for r in out]
        for r, on in zip(out, front(points)):
            r[f"pareto_{speed}"] = on
    for r, m in zip(out, measured):
        r.update(samples=m.samples, layer_plan=m.plan)
    return out
