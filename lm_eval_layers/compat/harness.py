"""lm-eval's internals (tested with 0.4.13): HFLM's private rank, world size and token-level
scoring step, its response cache's SqliteDict table, and the name of its console entry point.

lm-eval offers no public seam for any of these; each use below is checked where it is made
(`UpstreamChanged` if the check fails) and tested in tests/test_compat.py.
"""

from __future__ import annotations

import importlib.util
import inspect
from typing import Any

from lm_eval.models.huggingface import HFLM

from lm_eval_layers.compat import UpstreamChanged


class ScoringSeam(HFLM):
    """HFLM with its token-level log-likelihood step (the private `_loglikelihood_tokens`,
    called by `loglikelihood` and `loglikelihood_rolling` with tokenised requests) offered as
    `score_tokens`, which subclasses override, and `hf_score_tokens`, HFLM's own loop."""

    def score_tokens(self, requests: list, disable_tqdm: bool = False, override_bs: int | None = None) -> list[tuple[float, bool]]:
        return self.hf_score_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)

    def hf_score_tokens(self, requests: list, disable_tqdm: bool = False, override_bs: int | None = None) -> list[tuple[float, bool]]:
        return HFLM._loglikelihood_tokens(self, requests, disable_tqdm=disable_tqdm, override_bs=override_bs)

    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, override_bs: int | None = None) -> list[tuple[float, bool]]:
        return self.score_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)


def encoded_requests(lm: HFLM, instances: list[Any]) -> list[tuple[list[int], list[int]]]:
    """lm-eval's own tokenisation of loglikelihood requests, (context, continuation) token ids:
    `lm.loglikelihood` runs with its scoring step replaced by a recorder, so lm-eval's rules
    (empty contexts, whitespace, special tokens) are used as they are, never restated here."""
    recorded: list[tuple[Any, list[int], list[int]]] = []

    def record(requests: list, **_kwargs: Any) -> list[tuple[float, bool]]:
        recorded.extend(requests)
        return [(0.0, False)] * len(requests)

    lm._loglikelihood_tokens = record  # an instance attribute shadows the method for this call
    try:
        lm.loglikelihood(instances, disable_tqdm=True)
    finally:
        del lm._loglikelihood_tokens
    if instances and len(recorded) != len(instances):
        raise UpstreamChanged("lm-eval", "how HFLM.loglikelihood hands tokenised requests to _loglikelihood_tokens")
    return [(ctx, cont) for _, ctx, cont in recorded]


def set_replica(lm: HFLM, rank: int, world_size: int) -> None:
    """Set the rank and world size HFLM splits requests by. lm-eval takes them from accelerate
    under a launcher and offers no public setter (`rank`/`world_size` are read-only properties
    over private fields); a process that evaluates whole variants of its own sets (0, 1)."""
    lm._rank, lm._world_size = rank, world_size
    if (lm.rank, lm.world_size) != (rank, world_size):
        raise UpstreamChanged("lm-eval", "where HFLM keeps its rank and world size")


def use_cache_table(cache_hook: Any, table: str) -> None:
    """Point lm-eval's response cache (the SqliteDict that `CachingLM` and its cache hook share,
    `cache_hook.dbdict`) at the table `table` of the same file, created if new: SqliteDict reads
    its `tablename` on every query, and lm-eval builds the wrapper around an already created model,
    so there is no other place to choose the table."""
    db = getattr(cache_hook, "dbdict", None)
    if db is None:
        return
    from sqlitedict import SqliteDict

    if not isinstance(db, SqliteDict):
        raise UpstreamChanged("lm-eval", "the response cache (no longer a SqliteDict)")
    SqliteDict(db.filename, tablename=table, autocommit=True).close()  # creates the table
    db.tablename = table


def under_lm_eval_cli() -> bool:
    """Whether lm-eval's console entry point (`lm_eval.__main__.cli_evaluate`: the `lm_eval`
    script and `python -m lm_eval`) is on the call stack."""
    spec = importlib.util.find_spec("lm_eval.__main__")
    frame = inspect.currentframe()
    while frame is not None:
        if frame.f_code.co_name == CLI_ENTRY and spec is not None and frame.f_code.co_filename == spec.origin:
            return True
        frame = frame.f_back
    return False


CLI_ENTRY = "cli_evaluate"  # the function behind lm-eval's console script (pyproject `lm_eval = ...`)


def cli_tasks() -> list[str]:
    """The task names of lm-eval's command line (`--tasks a,b` or `--tasks=a,b`) when its console
    entry point is running, so the plugin can check their data before the model loads (lm-eval
    builds the model first and the tasks after); [] otherwise."""
    if not under_lm_eval_cli():
        return []
    import sys

    args = sys.argv[1:]
    for i, arg in enumerate(args):
        value = args[i + 1] if arg == "--tasks" and i + 1 < len(args) else arg.partition("=")[2] if arg.startswith("--tasks=") else None
        if value is not None:
            return [t.strip() for t in value.split(",") if t.strip()]
    return []
