"""`surgery bench`: what each variant costs beside its accuracy. Parses the options
(`lm_eval_layers.cost.settings`), runs the library (`lm_eval_layers.cost.run`: one process per
plan, repeats interleaved) and reports: a table with the Pareto front marked, bench.json (keys
in `lm_eval_layers/cost/bench_rows.py`) and an optional PNG.

    surgery bench MODEL --plans '' --plans drop=20-27 [--plans preset=llama-pro:4] [--from scores.json]
       [--prompt-tokens 512] [--new-tokens 128] [--batch 1] [--repeats 10] [--device cpu|cuda]
       [--dtype float32] [--threads N] [--tasks arc_easy_local --limit 100] [--include-path DIR] [--checkpoints]
       --out bench.json [--plot pareto.png]

Importing this module costs no torch, transformers or lm-eval."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lm_eval_layers.cost.settings import BenchSettings
from lm_eval_layers.outputs import write_json
from surgery.options import Bars, command, console, results, user_errors


def table(document: dict[str, Any]) -> Any:
    from rich.table import Table

    s = document["settings"]
    out = Table(title=f"{s['model']}: pp{s['prompt_tokens']} / tg{s['new_tokens']}, batch {s['batch']}, {s['dtype']} on "
                      f"{s['device']} ({s['threads']} threads), median ± IQR of {s['repeats']}",
                caption="×: speed-up against the full model, FLOP prediction / measured; front: on the Pareto "
                        "front of acc against pp / tg")
    for col in ("plan", "kind", "blocks", "params", "MB", "pp tok/s", "tg tok/s", "ttft ms", "peak MB",
                "pp × pred/meas", "tg × pred/meas", "acc", "front"):
        out.add_column(col, justify="left" if col in ("plan", "kind", "front") else "right")
    for r in document["plans"]:
        front = ",".join(s for s in ("pp", "tg") if r[f"pareto_{s}"])
        out.add_row(
            r["plan"], r["kind"], str(r["blocks"]), f"{r['params'] / 1e6:.1f}M", f"{r['bytes'] / 1e6:.0f}",
            f"{r['pp_tokens_per_s']:.1f} ± {r['pp_tokens_per_s_iqr']:.1f}",
            f"{r['tg_tokens_per_s']:.2f} ± {r['tg_tokens_per_s_iqr']:.2f}",
            f"{r['ttft_s'] * 1e3:.0f} ± {r['ttft_s_iqr'] * 1e3:.0f}", f"{r['peak_memory_mb']:.0f}",
            f"{r['predicted_speedup_pp']:.2f} / {r['measured_speedup_pp']:.2f}",
            f"{r['predicted_speedup_tg']:.2f} / {r['measured_speedup_tg']:.2f}",
            "–" if r["acc"] is None else f"{r['acc']:.3f}", front or ("" if r["acc"] is not None else "–"))
    return out


@command(BenchSettings)
def bench(settings: BenchSettings) -> None:
    """What each variant costs: parameters, bytes, predicted FLOPs; measured prompt and generation
    speed, time to first token and peak memory (one process per plan); accuracy with --tasks."""
    from rich.progress import BarColumn, MofNCompleteColumn, TimeElapsedColumn

    with user_errors():
        from lm_eval_layers.cost.run import bench as run

        with Bars("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), transient=True) as bars:
            task = bars.add_task("opening the model", total=None)
            document = run(settings, lambda what, done, total: bars.update(task, description=what, completed=done,
                                                                           total=total))
        write_json(settings.out, document)
        if settings.plot is not None:
            from lm_eval_layers.cost.plot import draw

            draw(document["plans"], settings.plot, f"{Path(settings.model).name}: accuracy against speed")
    results.print(table(document))
    console.print(f"written {settings.out}" + (f" and {settings.plot}" if settings.plot else ""))
