"""One benchmark row in a process of its own, so each row's peak memory is its own and no row
inherits another's allocator state.

The process loads the model (`from_pretrained`, like `lm_eval --model hf` and `layered`), and
for an in-memory variant applies the plan (`variant.apply_plan`, the weights the plan keeps are
shared), dropping the blocks no slot uses, so it holds what the written checkpoint of the plan
holds (less where a branch is removed: the checkpoint stores it as a zeroed projection, memory
drops it). Then it hands freed memory back to the OS, moves the model to its device, starts the
peak-memory count from there, warms up once and answers one measurement per request.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any


@dataclass(frozen=True)
class Job:
    """What one worker measures."""

    model: str  # a folder from_pretrained reads (with `gguf_file`, the folder of a GGUF file)
    gguf_file: str | None
    plan: dict[str, Any] | None  # LayerPlan.to_dict() to apply in memory; None: the model as stored
    dtype: str
    device: str
    threads: int  # torch intra-op threads; 0: torch's default
    batch: int
    prompt_tokens: int
    new_tokens: int
    repeats: int


@dataclass(frozen=True)
class Ready:
    threads: int
    load_peak_memory_mb: float  # the process until the model was in place (weights still unread in a mmap not counted)


def load(job: Job) -> Any:
    """The model of `job`, on its device, holding only the weights its plan computes with."""
    import transformers

    from lm_eval_layers.plan import LayerPlan
    from lm_eval_layers.precision import DType
    from lm_eval_layers.variant import apply_plan

    transformers.utils.logging.disable_progress_bar()  # one bar per worker would interleave with ours
    kwargs = {"gguf_file": job.gguf_file} if job.gguf_file else {}
    model = transformers.AutoModelForCausalLM.from_pretrained(job.model, dtype=DType(job.dtype).torch, **kwargs).eval()
    plan = None if job.plan is None else LayerPlan.from_dict(job.plan)
    if plan is not None and not plan.is_identity:
        # The handle is not kept: it holds the original stack, the only reference to the blocks
        # no slot uses, so they are freed (the slots share the kept blocks' tensors).
        apply_plan(model, plan)
    return model.to(job.device)


def serve(conn: Connection, job: Job) -> None:
    """The worker's main: load, send `Ready`, then for each of `job.repeats` requests one
    `timing.Sample`, then the peak memory (MB) since the model was in place. A failure is sent
    as its traceback text."""
    try:
        import torch

        from lm_eval_layers.cost import timing

        if job.threads:
            torch.set_num_threads(job.threads)
        device = torch.device(job.device)
        model = load(job)
        timing.release_freed_memory()
        load_peak = timing.peak_memory_mb(device)
        timing.reset_peak_memory(device)
        ids = timing.prompt_ids(model.config.get_text_config().vocab_size, job.batch, job.prompt_tokens).to(device)
        clock = timing.Clock(device)
        timing.measure(model, ids, job.new_tokens, clock)  # warm-up: first-call allocations, kernel selection
        conn.send(Ready(torch.get_num_threads(), load_peak))
        for _ in range(job.repeats):
            conn.recv()
            conn.send(timing.measure(model, ids, job.new_tokens, clock))
        conn.send(timing.peak_memory_mb(device))
    except Exception:  # the parent reports it with the row's name
        conn.send(traceback.format_exc())
    finally:
        conn.close()
