"""Coalition evaluations (and a search's candidates, `search/evaluations.py`) split across
processes started by `torchrun` or `accelerate launch`.

Every estimator chooses its coalitions without looking at their values, so the whole list is
known before the first evaluation (with `--tol`, the list of each stop-rule round; rank 0's
decision to stop is broadcast after it). Each process holds a replica of the model and takes
every W-th coalition; after each step of W the scores are gathered to rank 0, which commits
them to the one SQLite store (a killed run resumes from the last step). Rank 0 then runs the
estimator on stored values only. With one process this is the same loop without communication.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch


def setup() -> tuple[int, int]:
    """(rank, world size) from the launcher's environment; joins its process group (gloo on
    CPU, nccl on GPUs) when there is more than one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def current() -> tuple[int, int]:
    """(rank, world size) of the process group this process has joined; (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def device() -> str:
    """This process's device: its own GPU under a launcher (LOCAL_RANK), else the CPU."""
    return f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"


def one_replica(lm: Any) -> None:
    """Every process holds a whole replica and evaluates coalitions of its own, so lm-eval must
    not split one variant's requests across processes (under a launcher HFLM takes rank and world
    size from accelerate)."""
    from lm_eval_layers.compat.harness import set_replica

    set_replica(lm, 0, 1)


def broadcast(value: Any, world: int) -> Any:
    """Rank 0's `value` on every rank."""
    if world <= 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def evaluate_shared(todo: list[int], compute: Callable[[int], Any], commit: Callable[[int, Any], None],
                    rank: int, world: int, on_round: Callable[[int], None] = lambda k: None) -> list[int]:
    """Evaluate the coalitions `todo` (bitmasks) across `world` processes; rank 0 commits each
    result as soon as its round is gathered. Returns, on rank 0, how many results came from
    each process."""
    import torch.distributed as dist

    received = [0] * world
    for start in range(0, len(todo), world):
        mine = todo[start + rank] if start + rank < len(todo) else None
        result = (mine, compute(mine)) if mine is not None else None
        if world > 1:
            gathered: list[Any] | None = [None] * world if rank == 0 else None
            dist.gather_object(result, gathered, dst=0)
        else:
            gathered = [result]
        if rank == 0:
            assert gathered is not None
            for source, item in enumerate(gathered):
                if item is not None:
                    commit(*item)
                    received[source] += 1
            on_round(sum(item is not None for item in gathered))
    return received


def finish(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
