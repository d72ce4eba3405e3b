"""What `surgery prune` and `surgery expand` take, declared once (`lm_eval_layers.settings`),
checked before the model is opened: the plan's syntax, the shard size and the output folder.
Imports no torch, so the command's `--help` and its argument errors are instant."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from lm_eval_layers.calibration import calibration_option, seed_option, tokens_option
from lm_eval_layers.errors import UsageError
from lm_eval_layers.plan import PlanSpec
from lm_eval_layers.precision import DType
from lm_eval_layers.repair.spec import DEFAULT_TOKENS, RepairMethod
from lm_eval_layers.settings import MODEL_HELP, argument, coerce_enums, option, required

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """`5GB` -> 5_000_000_000 (transformers' convention; KiB/MiB/GiB are powers of 2)."""
    m = _SIZE.match(text)
    if not m or float(m.group(1)) <= 0:
        raise UsageError(f"--max-shard-size {text!r} is not a size; write it like 5GB, 500MB or 2GiB")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])


@dataclass(frozen=True)
class WriteSettings:
    """How a variant is written, whatever the plan."""

    model: str = argument(MODEL_HELP)
    out: Path = required("--out", "output folder (must not exist or be empty, unless --force)")
    dtype: DType | None = option(None, "--dtype", "convert floating tensors (default: keep; GGUF: float32)")
    max_shard_size: str = option("5GB", "--max-shard-size", "largest safetensors file, e.g. 5GB, 500MB")
    force: bool = option(False, "--force", "replace a non-empty --out")
    verify: bool = option(False, "--verify", "reload the output and compare logits with the in-memory variant")

    def __post_init__(self) -> None:
        coerce_enums(self)
        parse_size(self.max_shard_size)
        self.spec()  # the plan's syntax, before anything is opened

    @property
    def shard_bytes(self) -> int:
        return parse_size(self.max_shard_size)

    def spec(self) -> PlanSpec:
        raise NotImplementedError


@dataclass(frozen=True)
class PruneSettings(WriteSettings):
    drop: str | None = option(None, "--drop", "blocks to remove, e.g. 24-27 or 3,5-7 or -2")
    keep: str | None = option(None, "--keep", "blocks to keep (the complement of --drop)")
    drop_attn: str | None = option(None, "--drop-attn", "blocks whose attention branch is removed")
    drop_mlp: str | None = option(None, "--drop-mlp", "blocks whose MLP branch is removed")
    scores: Path | None = option(None, "--scores", "scores.json of `surgery score` on this model")
    drop_lowest: int | None = option(None, "--drop-lowest", "with --scores: remove the K lowest-valued units")
    plan: Path | None = option(None, "--plan", "a whole plan: search.json of `surgery search` or a written folder's layer_plan.json")
    repair: RepairMethod | None = option(None, "--repair", "replace each dropped run by a linear map fitted on calibration "
                                         "text, folded into the block before it (training-free; lstsq or cosine)")
    ridge: float = option(0.0, "--ridge", "with --repair: shrink the map towards plain dropping (0: none; scale-free)")
    calibration: Path | None = calibration_option()
    tokens: str = tokens_option(DEFAULT_TOKENS)
    seed: int = seed_option()

    def spec(self) -> PlanSpec:
        from lm_eval_layers.scores_file import read_scores

        if all(v is None for v in (self.drop, self.keep, self.drop_attn, self.drop_mlp, self.scores, self.plan)):
            raise UsageError("prune needs --drop, --keep, --drop-attn, --drop-mlp, --plan or --scores with --drop-lowest")
        fit_options = self.ridge != 0.0 or self.calibration is not None or self.tokens != DEFAULT_TOKENS or self.seed != 0
        if self.repair is None and fit_options:
            raise UsageError("--ridge, --calibration, --tokens and --seed set a repair's fit; add --repair lstsq or leave them out")
        repair = {"repair": self.repair.value, "ridge": self.ridge, "calibration": self.calibration, "tokens": self.tokens,
                  "seed": self.seed} if self.repair else {}
        return PlanSpec.from_args(drop=self.drop, keep=self.keep, drop_attn=self.drop_attn, drop_mlp=self.drop_mlp,
                                  scores=read_scores(self.scores) if self.scores else None, drop_lowest=self.drop_lowest,
                                  plan=self.plan, **repair)


@dataclass(frozen=True)
class ExpandSettings(WriteSettings):
    insert: str | None = option(None, "--insert", "new blocks POS:INIT, e.g. 1:avg-zero,3:copy")
    preset: str | None = option(None, "--preset", "slayer or llama-pro:K")
    drop: str | None = option(None, "--drop", "blocks to remove as well")

    def spec(self) -> PlanSpec:
        if self.insert is None and self.preset is None:
            raise UsageError("expand needs --insert or --preset")
        return PlanSpec.from_args(insert=self.insert, preset=self.preset, drop=self.drop)
