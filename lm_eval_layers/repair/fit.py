"""Fitting the map that stands in for each dropped run of blocks, on calibration windows.

For a run a..b of dropped blocks, over every position of the calibration windows:
  M = what block a−1's MLP branch adds to the residual (its down projection's output)
  X = block a−1's output,  Y = block b's output in the unpruned model,  D = Y − X + M
lstsq:  T = argmin_T ‖M T − D‖² + A·s·‖T − I‖²,  s = tr(MᵀM)/d
        i.e. (MᵀM + A·s·I) T = MᵀD + A·s·I, from MᵀM and MᵀD accumulated in float64 batch by
        batch (two d×d matrices; never the activations). With T the repaired block outputs
        X − M + M T ≈ Y. The ridge shrinks towards T = I, which is plain dropping, not towards
        T = 0 (which would also delete block a−1's MLP); s makes A independent of the scale of
        the activations and of the number of tokens.
cosine: T minimising mean_t (1 − cos(x_t − m_t + m_t T, y_t)), by Adam from the lstsq solution
        for COSINE_STEPS minibatch steps (this keeps X − M, M and Y of the calibration windows).
Several runs are fitted in order, shallowest first, each on the variant whose earlier runs are
already repaired (X and M come from it; Y always from the unpruned model).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

from lm_eval_layers.arch import fold_problem, layout_for
from lm_eval_layers.errors import PlanError, UnsupportedArchitecture
from lm_eval_layers.plan import LayerPlan
from lm_eval_layers.repair import cache
from lm_eval_layers.repair.fold import folded_tensors, projection
from lm_eval_layers.repair.spec import SAFE_TOKENS_PER_DIM, RepairMethod, repair_runs
from lm_eval_layers.variant import apply_plan

COSINE_STEPS = 300
COSINE_LR = 1e-4
COSINE_ROWS = 2048  # positions per optimiser step

log = logging.getLogger("lm_eval_layers")
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Fit:
    """The fitted maps, by the original block each folds into, and what the fit measured."""

    transforms: dict[int, torch.Tensor]  # float64 [d, d]
    report: list[dict[str, Any]]  # per run: blocks, folded_into, tokens, residual vs plain drop, seconds
    cached: bool = False

    def tensors(self, model: nn.Module, plan: LayerPlan) -> dict[int, dict[str, torch.Tensor]]:
        """The variant's own repaired tensors, by slot (for `apply_plan`)."""
        layout = layout_for(model)
        return folded_tensors(layout.find_blocks(model), layout, plan, self.transforms)


def check_foldable(model: nn.Module, plan: LayerPlan) -> list[tuple[int, int]]:
    """The runs to fit, or a refusal naming why this family cannot take a folded map."""
    runs = repair_runs(plan)
    layout = layout_for(model)
    blocks = layout.find_blocks(model)
    for a, _ in runs:
        problem = fold_problem(layout, blocks[a - 1], model.config)
        if problem:
            raise UnsupportedArchitecture(f"repair cannot fold a map into this model: {problem}; prune without repair")
        proj = blocks[a - 1].get_submodule(projection(layout))
        if not hasattr(proj, "weight") or proj.weight.dim() != 2:
            raise UnsupportedArchitecture(f"repair folds into {projection(layout)}, which is a {type(proj).__name__} "
                                          "without a 2-d weight (quantised?); load the model unquantised")
    return runs


@torch.no_grad()
def fit_key(identity: dict[str, Any], dtype: torch.dtype, plan: LayerPlan) -> str:
    """What a fit is cached under: the model's files and loading settings, its dtype, the plan."""
    return cache.cache_key({**identity, "dtype": str(dtype)}, plan.to_dict())


def fit_repair(model: nn.Module, tokenizer: Any, plan: LayerPlan, identity: dict[str, Any] | None = None,
               batch_size: int = 8, progress: Progress = lambda *a: None) -> Fit:
    """The maps of `plan.repair` for the unpruned `model` (no plan applied). With `identity` (what
    the model is: files, dtype, settings) the result is cached under it and the plan."""
    from lm_eval_layers.calibration import calibration_windows, read_calibration
    from pathlib import Path

    repair = plan.repair
    if repair is None:
        raise PlanError("the plan has no repair; add repair=lstsq")
    runs = check_foldable(model, plan)
    key = fit_key(identity, next(model.parameters()).dtype, plan) if identity else None
    hit = cache.load(key) if key else None
    if hit is not None:
        return Fit(*hit, cached=True)
    repair.check_text()
    text = read_calibration(Path(repair.calibration)).text
    windows = calibration_windows(tokenizer, text, repair.windows, repair.tokens, repair.seed)
    hidden = model.get_input_embeddings().weight.shape[1]
    if windows.numel() < SAFE_TOKENS_PER_DIM * hidden:
        log.warning(f"warning: {windows.numel():,} calibration tokens fit a {hidden}×{hidden} map; below "
                    f"{SAFE_TOKENS_PER_DIM * hidden:,} ({SAFE_TOKENS_PER_DIM} per hidden dimension) the fit may worsen the "
                    "model: give more tokens=, or ridge=")
    device = next(model.parameters()).device
    batches = [b.to(device) for b in windows.split(batch_size)]
    transforms: dict[int, torch.Tensor] = {}
    report = []
    for r, (a, b) in enumerate(runs):
        start = time.perf_counter()
        sums = Sums(hidden, keep=repair.method is RepairMethod.cosine)
        layout = layout_for(model)
        earlier = folded_tensors(layout.find_blocks(model), layout, plan, transforms) if r else None
        for i, ids in enumerate(batches):
            progress(f"fitting the map for blocks {a}-{b}", i, len(batches))
            x, m, y = activations(model, plan, earlier, a, b, ids=ids)
            sums.add(x, m, y)
        t = sums.solve(repair.ridge)
        if repair.method is RepairMethod.cosine:
            t = sums.cosine(t, repair.seed)
        transforms[a - 1] = t
        report.append({"blocks": [a, b], "folded_into": a - 1, "tokens": sums.rows,
                       "residual_vs_drop": sums.residual(t) / sums.gap, "seconds": time.perf_counter() - start})
    progress("fitted", len(batches), len(batches))
    if key:
        cache.save(key, transforms, report)
    return Fit(transforms, report)


class _Stop(Exception):
    """Raised by a hook once the last block a fit needs has run: the rest of the stack is skipped."""


@contextlib.contextmanager
def _taps(pairs: list[tuple[nn.Module, str]], last: nn.Module, out: dict[str, torch.Tensor]) -> Iterator[None]:
    """Forward hooks recording each module's output under its name; `last` then stops the pass."""
    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, _args: Any, output: Any) -> None:
            out[name] = (output[0] if isinstance(output, tuple) else output).detach()
            if module is last and all(n in out for _, n in pairs):
                raise _Stop

        return record

    handles = [module.register_forward_hook(hook(name)) for module, name in pairs]
    try:
        yield
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()


def _run(model: nn.Module, ids: torch.Tensor, pairs: list[tuple[nn.Module, str]], last: nn.Module) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    with _taps(pairs, last, out):
        model(input_ids=ids, use_cache=False)
    return out


def activations(model: nn.Module, plan: LayerPlan, earlier: dict[int, dict[str, torch.Tensor]] | None, a: int, b: int,
                 ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """X, M (block a−1 of the variant with the `earlier` runs' folded tensors) and Y (block b of the
    unpruned model) for one batch; for the first run (`earlier` None) the variant's prefix is the
    unpruned model's, so one pass gives all three."""
    first = earlier is None
    layout = layout_for(model)
    blocks = layout.find_blocks(model)
    taps = [(blocks[b], "y")]
    if first:
        taps += [(blocks[a - 1], "x"), (blocks[a - 1].get_submodule(projection(layout)), "m")]
    out = _run(model, ids, taps, blocks[b])
    if not first:
        slot = next(k for k, s in enumerate(plan.slots) if s.source == a - 1)
        with apply_plan(model, plan, earlier) as variant:
            block = variant.blocks[slot]
            out.update(_run(model, ids, [(block, "x"), (block.get_submodule(projection(layout)), "m")], block))
    return out["x"], out["m"], out["y"]


class Sums:
    """MᵀM, MᵀD, ‖D‖² and ‖Y − X‖² accumulated in float64 (and, for cosine, the activations);
    public so one accumulation can be solved at several ridges (`benchmarks/repair.py`)."""

    def __init__(self, d: int, keep: bool) -> None:
        self.mm = torch.zeros(d, d, dtype=torch.float64)
        self.md = torch.zeros(d, d, dtype=torch.float64)
        self.dd = 0.0
        self.gap = 0.0  # ‖Y − X‖²: the residual of plain dropping (T = I)
        self.rows = 0
        self.kept: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = [] if keep else None

    def add(self, x: torch.Tensor, m: torch.Tensor, y: torch.Tensor) -> None:
        d = x.shape[-1]
        x, m, y = (v.reshape(-1, d).to(torch.float64) for v in (x, m, y))
        target = y - x + m
        self.mm += (m.T @ m).cpu()
        self.md += (m.T @ target).cpu()
        self.dd += float(target.square().sum())
        self.gap += float((y - x).square().sum())
        self.rows += x.shape[0]
        if self.kept is not None:
            self.kept.append(((x - m).float().cpu(), m.float().cpu(), y.float().cpu()))

    def solve(self, ridge: float) -> torch.Tensor:
        d = self.mm.shape[0]
        eye = torch.eye(d, dtype=torch.float64)
        shrink = ridge * torch.trace(self.mm) / d
        # gelsd: the least-norm solution when MᵀM is singular (fewer tokens than dimensions)
        return torch.linalg.lstsq(self.mm + shrink * eye, self.md + shrink * eye, driver="gelsd").solution

    def residual(self, t: torch.Tensor) -> float:
        """‖M T − D‖² from the sums: tr(Tᵀ MᵀM T) − 2 tr(Tᵀ MᵀD) + ‖D‖²."""
        return float(torch.trace(t.T @ self.mm @ t) - 2 * torch.trace(t.T @ self.md) + self.dd)

    def cosine(self, start: torch.Tensor, seed: int) -> torch.Tensor:
        assert self.kept is not None
        base, m, y = (torch.cat(v) for v in zip(*self.kept))
        t = start.float().clone().requires_grad_(True)
        opt = torch.optim.Adam([t], lr=COSINE_LR)
        gen = torch.Generator().manual_seed(seed)
        with torch.enable_grad():
            for _ in range(COSINE_STEPS):
                rows = torch.randint(0, len(m), (min(COSINE_ROWS, len(m)),), generator=gen)
                pred = base[rows] + m[rows] @ t
                loss = (1 - torch.nn.functional.cosine_similarity(pred, y[rows], dim=-1)).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
        return t.detach().to(torch.float64)


def fit_source(source: Any, plan: LayerPlan, dtype: torch.dtype | None = None, progress: Progress = lambda *a: None) -> Fit:
    """The maps for a plan written from a checkpoint source (what `surgery prune --repair` fits):
    the model loaded in the dtype it is written in (float32 for GGUF), cached under its files; a
    cached fit is read back before any weight is loaded."""
    from lm_eval_layers.checkpoint.sources import GGUFFile, load_tokenizer
    from lm_eval_layers.checkpoint.verify import load_source
    from lm_eval_layers.identity import model_identity

    dtype = dtype or next(iter(source.infos.values())).dtype
    if isinstance(source, GGUFFile):
        identity = model_identity(str(source.path.parent), gguf_file=source.path.name)
    else:
        identity = model_identity(str(source.folder))
    hit = cache.load(fit_key(identity, dtype, plan))
    if hit is not None:  # fitted before for these files, dtype and plan: no weight is read
        return Fit(*hit, cached=True)
    model = load_source(source, dtype)
    if torch.cuda.is_available():
        model = model.cuda()
    return fit_repair(model, load_tokenizer(source), plan, identity=identity, progress=progress)
