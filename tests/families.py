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
from lm_eval_layers.variant import apply_plan

DEPTH = 4
# Small values for whichever of these keys a family's config has.
SMALL: dict[str, Any] = dict(
    hidden_size=64, d_model=64, n_embd=64, intermediate_size=128, ffn_hidden_size=128, n_inner=128,
    num_hidden_layers=DEPTH, n_layer=DEPTH, num_layers=DEPTH, n_layers=DEPTH,
    num_attention_heads=4, n_head=4, n_heads=4, num_heads=4, num_key_value_heads=2, n_kv_heads=2, num_kv_heads=2,
    head_dim=16, vocab_size=128, max_position_embeddings=256, n_positions=256,
    moe_intermediate_size=32, expert_intermediate_size=32, shared_expert_intermediate_size=32,
    num_experts=4, n_routed_experts=4, num_local_experts=4, moe_num_experts=4, num_experts_per_tok=2, top_k=2,
    moe_topk=2, num_experts_per_token=2, moe_k=2, moe_num_shared_experts=1, moe_layer_end_index=DEPTH - 1,
    n_shared_experts=1, num_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=32,
    qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_group=1, topk_group=1,
    mamba_d_state=16, mamba_n_heads=8, mamba_d_head=16, mamba_head_dim=16, mamba_d_ssm=128, state_size=16,
    ssm_state_size=16, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
    linear_value_head_dim=16, num_nextn_predict_layers=0, sliding_window=8,
    pad_token_id=0, bos_token_id=1, eos_token_id=2, rotary_dim=8, rope_dim=8,
)
# Families whose defaults leave no attention block (or an inconsistent shape) in four blocks.
FAMILY: dict[str, dict[str, Any]] = {
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1),
    "mamba2": dict(num_heads=8, head_dim=16, n_groups=1),
    "bamba": dict(attn_layer_indices=[1]),
    # Gemma 4 without per-layer input embeddings (those models are refused: see arch.POSITION_BOUND)
    **{name: dict(hidden_size_per_layer_input=0) for name in ("gemma4", "gemma4_text", "gemma4_unified", "gemma4_unified_text")},
    "granitemoehybrid": dict(layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"]),
}
# Must be exact for drop and copy-zero, in memory and on disk (issue: every decoder family).
MUST_WORK = ("gemma3", "gemma4", "llama4", "qwen3_5", "qwen3_5_moe", "qwen3_next", "deepseek_v3", "glm4_moe",
             "granitemoehybrid", "nemotron_h", "jamba", "falcon_h1", "lfm2", "phi", "gptj")
# Open gaps, each a WRONG or crash the sweep still finds (or a must-work check not yet exact):
# listed so that any new one fails the test, and closed by deleting its line.
KNOWN_GAPS: dict[tuple[str, str], str] = {
    ("bamba", "cache"): "dropping the stack's only attention block leaves transformers no layer to build masks from",
    ("dory", "disk"): "its config refuses a generic small config on reload (n_input/recurrent/output layers)",
    ("gpt_neo", "cache"): "local/global attention chosen by position inside the cache",
    ("hy_v4", "drop_attn"): "shared indexer layers read top-k indices computed by an earlier block",
    ("inkling2_text", "disk"): "reloading the written folder fails inside transformers (negative dimension)",
    ("inkling2_loop_text", "disk"): "reloading the written folder fails inside transformers (negative dimension)",
    ("longcat_flash", "cache"): "two attention sub-layers per block share one cache index",
    ("mllama", "drop"): "the text model is reached through a property the variant does not follow",
    ("mllama", "copy-zero"): "the text model is reached through a property the variant does not follow",
    ("moshi", "cache"): "depth decoder cache",
    ("openai-gpt", "drop"): "the sweep's identity reference does not fit its block output",
    ("rwkv", "cache"): "recurrent state indexed by block position",
    ("xlm", "drop"): "per-position attention lists outside the block list",
    ("xlm", "cache"): "per-position attention lists outside the block list",
    ("xlstm", "drop_mlp"): "its MLP branch is not used by the block",
    ("zamba2", "drop"): "shared transformer blocks indexed by position",
    ("zamba2", "copy-zero"): "shared transformer blocks indexed by position",
    ("granitemoehybrid", "disk"): "fused experts stored as input_linear/output_linear: zeroed copies refused on disk",
}
CHECKS = ("drop", "copy-zero", "drop_attn", "drop_mlp", "cache", "disk")


def _depth(values: dict[str, Any]) -> int | None:
    return next((values[k] for k in ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
                 if isinstance(values.get(k), int)), None)


def _small(config: Any, extra: dict[str, Any]) -> dict[str, Any]:
    """Overrides that make `config` tiny: small sizes, every per-layer list cut to DEPTH entries
    that keep each kind of block (a hybrid keeps an attention and a state-space block)."""
    values = config.to_dict()
    kw = {k: v for k, v in SMALL.items() if k in values and not isinstance(values[k], (list, dict))}
    kw.update({k: v for k, v in extra.items() if k in values})
    n = _depth(values)
    if n and n > DEPTH:
        lists = {k: v for k, v in values.items() if isinstance(v, list) and len(v) == n and k not in kw}
        firsts = sorted({next(i for i, x in enumerate(v) if str(x) == str(y)) for v in lists.values() for y in v})
        picks = sorted(set(firsts[:DEPTH]))
        for i in range(n):
            if len(picks) >= DEPTH:
                break
            if i not in picks:
                picks = sorted([*picks, i])
        for k, v in lists.items():
            kw[k] = [v[i] for i in picks]
        per_layer = values.get("per_layer_config")
        if isinstance(per_layer, dict):
            kw["per_layer_config"] = {str(picks.index(int(i))): v for i, v in per_layer.items() if int(i) in picks}
    if "qk_rope_head_dim" in values and "head_dim" in values:
        kw["head_dim"] = kw.get("qk_rope_head_dim", SMALL["qk_rope_head_dim"])
    for k in values:
        sub = config.__dict__.get(k)
        if isinstance(sub, T.PretrainedConfig):
            kw[k] = {**sub.to_dict(), **_small(sub, extra)}
    return kw


def tiny_config(model_type: str) -> Any:
    cls = CONFIG_MAPPING[model_type]
    return cls(**_small(cls(), FAMILY.get(model_type, {})))


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
        return (x, *out[1:]) if isinstance(out, tuple) else x

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
        try:
            same = torch.equal(model.generate(IDS, use_cache=True, **kw), model.generate(IDS, use_cache=False, **kw))
        except Exception as e:  # noqa: BLE001
            return "n/a", f"the base model cannot generate here ({type(e).__name__})"
        if not same:
            return "n/a", "the base model's greedy tokens differ with and without its cache"
        with apply_plan(model, _plan(model, drop="1", insert="2:copy")):
            with_cache = model.generate(IDS, use_cache=True, **kw)
            without = model.generate(IDS, use_cache=False, **kw)
        return ("exact", "") if torch.equal(with_cache, without) else ("WRONG", "greedy tokens differ with the cache")

    def disk() -> tuple[str, str]:
        from lm_eval_layers.checkpoint.sources import open_model
        from lm_eval_layers.checkpoint.writer import write_variant

        assert workdir is not None
        src = workdir / model_type
        model.save_pretrained(src)
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
