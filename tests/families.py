"""Every decoder family in the installed transformers' causal-LM mapping, as a tiny random model
built from a generic small config (transformers' own test suite builds small configs the same
way), held against plain references: exact / refused / WRONG / crash for each check.

Used by `tests/test_families.py` (fails on any WRONG or crash, and when a must-work family is not
exact) and by `benchmarks/families.py` (the README's architecture table).
"""

from __future__ import annotations

import logging
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import transformers as T
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from lm_eval_layers.arch import layout_for
from lm_eval_layers.errors import LayersError
from lm_eval_layers.plan import LayerPlan, PlanSpec
from lm_eval_layers.twin import narrow
from lm_eval_layers.variant import apply_plan

DEPTH = 4
# Families whose defaults leave no attention block (or an inconsistent shape) in four blocks.
FAMILY: dict[str, dict[str, Any]] = {
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1),
    "bamba": dict(attn_layer_indices=[1, 3]),
    # Gemma 4 without per-layer input embeddings (those models are refused: see arch.POSITION_BOUND)
    **{name: dict(hidden_size_per_layer_input=0) for name in ("gemma4", "gemma4_text", "gemma4_unified", "gemma4_unified_text")},
    "granitemoehybrid": dict(layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"]),
}
# Must be exact for drop and copy-zero, in memory and on disk (issue: every decoder family).
MUST_WORK = ("gemma3", "gemma4", "llama4", "qwen3_5", "qwen3_5_moe", "qwen3_next", "deepseek_v3", "glm4_moe",
             "granitemoehybrid", "nemotron_h", "jamba", "falcon_h1", "lfm2", "phi", "gptj")
CHECKS = ("drop", "copy-zero", "drop_attn", "drop_mlp", "cache", "disk")


def tiny_config(model_type: str) -> Any:
    """The family's default config made narrow and DEPTH blocks deep (`lm_eval_layers.twin.narrow`)."""
    cls = CONFIG_MAPPING[model_type]
    extra = {"first_k_dense_replace": 1, "moe_layer_end_index": DEPTH - 1, **FAMILY.get(model_type, {})}
    return cls(**narrow(cls(), DEPTH, extra))


def tiny_model(model_type: str, seed: int = 0) -> T.PreTrainedModel:
    """A tiny fp32 model with random weights; norms perturbed so that every block changes the logits."""
    config = tiny_config(model_type)
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@dataclass
class FamilyResult:
    model_type: str
    cls: str = ""
    status: dict[str, str] = field(default_factory=dict)  # check -> exact | refused | WRONG | crash | n/a
    detail: dict[str, str] = field(default_factory=dict)  # check -> the refusal line, Δ or the crash

    def row(self) -> list[str]:
        return [self.model_type, *(self.status.get(c, "n/a") for c in CHECKS)]


IDS = torch.tensor([[5, 17, 33, 9, 71, 42, 100, 3, 64, 27]])


def _logits(model: Any, ids: torch.Tensor = IDS) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits.float()


def _plan(model: Any, **kwargs: Any) -> LayerPlan:
    from lm_eval_layers.arch import num_layers

    return PlanSpec.from_args(**kwargs).resolve(num_layers(model.config))


def _identity_hook(block: torch.nn.Module):
    """Makes `block` return its input (the reference for dropping it)."""
    def hook(_m: Any, args: tuple, kwargs: dict[str, Any], out: Any) -> Any:
        x = args[0] if args else kwargs["hidden_states"]
        return type(out)([x, *out[1:]]) if isinstance(out, (tuple, list)) else x

    return block.register_forward_hook(hook, with_kwargs=True)


def _compare(got: torch.Tensor, expected: torch.Tensor) -> tuple[str, str]:
    diff = (got - expected).abs().max().item() if got.shape == expected.shape else float("inf")
    return ("exact", "") if diff <= 1e-5 * max(1.0, expected.abs().max().item()) else ("WRONG", f"max |Δ logit| {diff:.3g}")


def _run(result: FamilyResult, check: str, fn: Callable[[], tuple[str, str]]) -> None:
    try:
        result.status[check], result.detail[check] = fn()
    except LayersError as e:
        result.status[check], result.detail[check] = "refused", str(e).splitlines()[0]
    except Exception as e:  # noqa: BLE001 - a crash is what the sweep reports
        line = traceback.format_exception_only(type(e), e)[-1].strip()
        result.status[check], result.detail[check] = "crash", line[:300]


def sweep_family(model_type: str, workdir: Path | None = None) -> FamilyResult:
    """Every check on one family (a tiny random model of it); `workdir` enables the disk check."""
    result = FamilyResult(model_type)
    try:
        model = tiny_model(model_type)
        base = _logits(model)
        result.cls = type(model).__name__
    except Exception as e:  # noqa: BLE001 - the family cannot be built from a generic small config
        result.detail["build"] = traceback.format_exception_only(type(e), e)[-1].strip()[:200]
        return result

    def drop() -> tuple[str, str]:
        plan = _plan(model, drop="1")
        with apply_plan(model, plan):
            got = _logits(model)
        blocks = layout_for(model).find_blocks(model)
        handle = _identity_hook(blocks[1])
        try:
            expected = _logits(model)
        finally:
            handle.remove()
        return _compare(got, expected)

    def copy_zero() -> tuple[str, str]:
        with apply_plan(model, _plan(model, insert="1:copy-zero")):
            got = _logits(model)
        return _compare(got, base)

    def half(which: str) -> Callable[[], tuple[str, str]]:
        def check() -> tuple[str, str]:
            # the probe compares the in-memory branch removal with its written form (zeroed projections)
            with apply_plan(model, _plan(model, **{which: "1"})):
                got = _logits(model)
            return ("exact", "") if not torch.equal(got, base) else ("WRONG", "removing the branch changed nothing")
        return check

    def cache() -> tuple[str, str]:
        kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
        scored = dict(output_scores=True, return_dict_in_generate=True, **kw)
        try:
            with_cache, without = (torch.stack(model.generate(IDS, use_cache=c, **scored).scores) for c in (True, False))
        except Exception as e:  # noqa: BLE001
            return "n/a", f"the base model cannot generate here ({type(e).__name__})"
        if (with_cache - without).abs().max() > 1e-3 * max(1.0, without.abs().max().item()):
            return "n/a", "the base model's generation scores differ with and without its cache"
        with apply_plan(model, _plan(model, drop="1", insert="2:copy")):
            with_cache = model.generate(IDS, use_cache=True, **kw)
            without = model.generate(IDS, use_cache=False, **kw)
        return ("exact", "") if torch.equal(with_cache, without) else ("WRONG", "greedy tokens differ with the cache")

    def disk() -> tuple[str, str]:
        from lm_eval_layers.checkpoint.sources import open_model
        from lm_eval_layers.checkpoint.writer import write_variant

        assert workdir is not None
        src = workdir / model_type
        try:
            model.save_pretrained(src)
            T.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
        except Exception as e:  # noqa: BLE001
            return "n/a", f"transformers cannot reload the family's own save_pretrained folder ({type(e).__name__})"
        plan = _plan(model, drop="1", insert="2:copy-zero")
        write_variant(open_model(str(src)), plan, workdir / f"{model_type}-out", metadata=False)
        with apply_plan(model, plan):
            expected = _logits(model)
        reloaded = T.AutoModelForCausalLM.from_pretrained(workdir / f"{model_type}-out", dtype=torch.float32).eval()
        return _compare(_logits(reloaded), expected)

    with torch.no_grad():
        _run(result, "drop", drop)
        _run(result, "copy-zero", copy_zero)
        _run(result, "drop_attn", half("drop_attn"))
        _run(result, "drop_mlp", half("drop_mlp"))
    _run(result, "cache", cache)
    if workdir is not None:
        _run(result, "disk", disk)
    return result


def decoder_families() -> list[str]:
    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def quiet() -> None:
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    T.logging.set_verbosity_error()
    T.logging.disable_progress_bar()
