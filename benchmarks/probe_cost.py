"""What the never-silently-wrong checks cost on SmolLM2 (fp32, CPU): the identity probe inside
`apply_plan` (one forward pass on 6 tokens, then 2 tokens decoded through the cache) and the
checks `surgery prune/expand` run before writing (the written config rebuilt as a weightless
model; claims proven on a narrow random twin). Medians of 5 runs.

    .venv/bin/python benchmarks/probe_cost.py
"""

from __future__ import annotations

import statistics
import time

import torch
import transformers

from common import save
from lm_eval_layers import variant
from lm_eval_layers.checkpoint.sources import open_model, source_layout
from lm_eval_layers.checkpoint.structure import written_problem
from lm_eval_layers.checkpoint.writer import plan_tensors, planned_config
from lm_eval_layers.compat.stored_names import loaded_name
from lm_eval_layers.default_model import smollm2_gguf
from lm_eval_layers.plan import PlanSpec

PLANS = {"drop 24-27": dict(drop="24-27"), "llama-pro:4": dict(preset="llama-pro:4"), "drop_attn 3,7": dict(drop_attn="3,7")}
REPEATS = 5


def apply_cost(model, plan) -> tuple[float, float]:
    """Median seconds of apply_plan, and of the probe inside it."""
    real = variant.probe.check
    totals, probes = [], []
    for _ in range(REPEATS):
        spent = [0.0]

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - start

        variant.probe.check = timed
        try:
            start = time.perf_counter()
            variant.apply_plan(model, plan).restore()
            totals.append(time.perf_counter() - start)
        finally:
            variant.probe.check = real
        probes.append(spent[0])
    return statistics.median(totals), statistics.median(probes)


def write_check_cost(source, plan) -> float:
    layout = source_layout(source)
    tensors = plan_tensors(source, plan, layout, None)
    config = planned_config(source, plan, layout, None)
    loaded: dict[int, list[str]] = {}
    for t in tensors:
        if t.slot is not None:
            loaded.setdefault(t.slot.source, []).append(loaded_name("llama", t.rel))
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        assert written_problem(source, config, plan, layout, loaded) is None
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    path = smollm2_gguf()
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    source = open_model("smollm2")
    rows = {}
    for name, kwargs in PLANS.items():
        plan = PlanSpec.from_args(**kwargs).resolve(30)
        total, probe = apply_cost(model, plan)
        rows[name] = {"apply_plan_s": total, "probe_s": probe, "apply_without_probe_s": total - probe,
                      "write_checks_s": write_check_cost(source, plan)}
        print(name, {k: round(v, 3) for k, v in rows[name].items()}, flush=True)
    save("probe_cost", {"model": "SmolLM2-135M-Instruct fp32 CPU", "threads": torch.get_num_threads(), "plans": rows},
         ("plans",))


if __name__ == "__main__":
    main()
