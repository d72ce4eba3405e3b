"""`surgery prune` and `surgery expand` as library calls: a Python user writes a variant exactly
as the CLI does, and the CLI only renders.

    from lm_eval_layers.checkpoint.commands import prune
    from lm_eval_layers.checkpoint.settings import PruneSettings
    result = prune(PruneSettings(model="smollm2", out=Path("pruned"), drop="20-27"))
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from lm_eval_layers.checkpoint.settings import ExpandSettings, PruneSettings, WriteSettings
from lm_eval_layers.errors import UsageError

if TYPE_CHECKING:
    from lm_eval_layers.checkpoint.gguf_out import WrittenGGUF
    from lm_eval_layers.checkpoint.writer import Written

Progress = Callable[[str, int, "int | None"], None]  # (what, done, total or None while unknown)


@dataclass(frozen=True)
class WriteResult:
    """What a prune or expand wrote, and the repair it fitted (if any)."""

    written: Written | WrittenGGUF
    repair: list[dict] = field(default_factory=list)  # one entry per repaired run (`Fit.report`)
    repair_cached: bool = False  # the fit was read back from the on-disk cache


def write_plan(command: str, settings: WriteSettings, progress: Progress = lambda what, done, total: None) -> WriteResult:
    """Check every argument that needs no weights (the plan's syntax, the output folder, the plan
    against the model's depth), fit a repair if the plan has one, then stream the variant to disk."""
    spec = settings.spec()
    if Path(settings.out).suffix == ".gguf":
        return _write_gguf(command, settings, spec, progress)  # no torch: bytes are copied
    from lm_eval_layers.arch import num_layers
    from lm_eval_layers.checkpoint.sources import header_depth, open_model
    from lm_eval_layers.checkpoint.writer import write_variant
    from lm_eval_layers.outputs import check_folder

    model_dir = Path(settings.model).expanduser()
    check_folder(settings.out, settings.force, inside=model_dir if model_dir.is_dir() else None)
    depth = header_depth(settings.model)
    if depth is not None:
        spec.resolve(depth)  # a plan out of range, before the seconds opening a GGUF takes
    progress(f"opening {settings.model}", 0, None)
    source = open_model(settings.model)
    plan = spec.resolve(num_layers(source.config), source.config.get("model_type"))
    dtype = settings.dtype.torch if settings.dtype else None
    fit = None
    if plan.repair is not None:
        from lm_eval_layers.repair.fit import fit_source

        progress("loading the model to fit the repair", 0, None)
        fit = fit_source(source, plan, dtype, progress=progress)
    label = f"writing {plan.describe()}"
    written = write_variant(source, plan, settings.out, command=command, dtype=dtype, max_shard_size=settings.shard_bytes,
                            force=settings.force, verify=settings.verify, repair=fit,
                            progress=lambda done, total: progress(label, done, total))
    return WriteResult(written, list(fit.report) if fit else [], bool(fit and fit.cached))


def _write_gguf(command: str, settings: WriteSettings, spec: Any, progress: Progress) -> WriteResult:
    """GGUF in → GGUF out (`checkpoint.gguf_out`): the output format follows --out's suffix."""
    from lm_eval_layers.checkpoint.gguf_out import write_gguf
    from lm_eval_layers.default_model import gguf_path
    from lm_eval_layers.outputs import check_file

    source = gguf_path(settings.model)
    if source is None:
        raise UsageError(f"--out {settings.out} is a GGUF file but {settings.model} is not: converting safetensors to GGUF "
                         "is llama.cpp's converter's job (convert_hf_to_gguf.py); give a .gguf input or a folder --out")
    if settings.dtype is not None or settings.verify or (getattr(settings, "repair", None) is not None):
        raise UsageError("--dtype, --verify and --repair are for safetensors output; GGUF output keeps the file's quantisation")
    out = check_file(Path(settings.out).expanduser(), settings.force)
    if not out.parent.is_dir():
        out.parent.mkdir(parents=True)
    written = write_gguf(source, spec, out, force=settings.force, progress=lambda done, total: progress("writing", done, total))
    return WriteResult(written)


def prune(settings: PruneSettings, progress: Progress = lambda what, done, total: None) -> WriteResult:
    """Remove blocks (or their attention / MLP branches) and write the result."""
    return write_plan("prune", settings, progress)


def expand(settings: ExpandSettings, progress: Progress = lambda what, done, total: None) -> WriteResult:
    """Insert blocks (copies, averages, function-preserving zero-init) and write the result."""
    return write_plan("expand", settings, progress)
