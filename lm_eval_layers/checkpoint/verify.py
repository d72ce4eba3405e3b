"""`--verify`: reload a written checkpoint and compare its logits with the in-memory `layered`
variant of the same plan (the model the plugin evaluates)."""

from __future__ import annotations

from pathlib import Path

import torch

from lm_eval_layers.plan import LayerPlan
from lm_eval_layers.variant import apply_plan
from lm_eval_layers.errors import UsageError
from lm_eval_layers.checkpoint.sources import GGUFFile, Source


def _load(path: Path, dtype: torch.dtype, gguf_file: str | None = None):
    import transformers

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, **kwargs).eval()


def load_source(source: Source, dtype: torch.dtype):
    """The source as a transformers model in inference mode (a GGUF file dequantised)."""
    if isinstance(source, GGUFFile):
        return _load(source.path.parent, dtype, source.path.name)
    assert source.folder is not None
    return _load(source.folder, dtype)


def verify(written: Path, source: Source, plan: LayerPlan, dtype: torch.dtype, exact: bool,
           transforms: dict[int, torch.Tensor] | None = None) -> float:
    """Max |Δ logit| on a short prompt; raises unless identical (`exact`, no dtype conversion)
    or within rounding of the new dtype. A repaired plan's variant folds the same `transforms`."""
    from lm_eval_layers.arch import layout_for
    from lm_eval_layers.repair.fold import folded_tensors

    reference = load_source(source, dtype)
    vocab = reference.get_input_embeddings().weight.shape[0]
    ids = (torch.arange(7, 7 + 24 * 37, 37) % vocab).unsqueeze(0)
    layout = layout_for(reference)
    tensors = folded_tensors(layout.find_blocks(reference), layout, plan, transforms) if transforms else None
    with torch.no_grad(), apply_plan(reference, plan, tensors):
        expected = reference(ids).logits.float()
    del reference
    with torch.no_grad():
        got = _load(written, dtype)(ids).logits.float()
    diff = (got - expected).abs().max().item()
    allowed = 0.0 if exact else 2e-2 * expected.abs().max().item()
    if diff > allowed:
        raise UsageError(f"verification failed: written checkpoint differs from the in-memory variant by {diff:.3g} (allowed {allowed:.3g})")
    return diff
