"""A narrow random twin of a model: the same family, depth and pattern of layer kinds, every width
small. A plan is proven on it with the identity probe before any weight is read (the plugin, which
refuses a bad plan before a 30 s load) or when none is (the checkpoint writer): an identity block,
a removed branch, a cache that still lines up are properties of the family's code and the layer
pattern, not of the weights. The family sweep (tests/families.py) builds its tiny models with `narrow`.
"""

from __future__ import annotations

from typing import Any

import torch

from lm_eval_layers.arch import COUNT_KEYS

# Small values for whichever of these keys a family's config has.
NARROW: dict[str, Any] = dict(
    hidden_size=64, d_model=64, n_embd=64, intermediate_size=128, ffn_hidden_size=128, n_inner=128,
    num_attention_heads=4, n_head=4, n_heads=4, num_heads=4, num_key_value_heads=2, n_kv_heads=2, num_kv_heads=2,
    head_dim=16, vocab_size=128, max_position_embeddings=256, n_positions=256,
    moe_intermediate_size=32, expert_intermediate_size=32, shared_expert_intermediate_size=32,
    num_experts=4, n_routed_experts=4, num_local_experts=4, moe_num_experts=4, num_experts_per_tok=2, top_k=2,
    moe_topk=2, num_experts_per_token=2, moe_k=2, moe_num_shared_experts=1,
    n_shared_experts=1, num_shared_experts=1, kv_lora_rank=16, q_lora_rank=32,
    qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_group=1, topk_group=1,
    mamba_d_state=16, mamba_n_heads=8, mamba_d_head=16, mamba_head_dim=16, mamba_d_ssm=128, state_size=16,
    ssm_state_size=16, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
    linear_value_head_dim=16, num_nextn_predict_layers=0, sliding_window=8,
    pad_token_id=0, bos_token_id=1, eos_token_id=2, rotary_dim=8, rope_dim=8,
)


def _depth(values: dict[str, Any]) -> int | None:
    return next((values[k] for k in COUNT_KEYS if isinstance(values.get(k), int)), None)


def narrow(config: Any, depth: int | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Keyword arguments that rebuild `config`'s class narrow (and, with `depth`, with fewer blocks:
    every per-layer list cut to entries that keep each kind of block)."""
    import transformers

    values = config.to_dict()
    kw = {k: v for k, v in NARROW.items() if k in values and not isinstance(values[k], (list, dict))}
    n = _depth(values)
    if depth is not None and n and n > depth:
        kw.update({k: depth for k in COUNT_KEYS if k in values and isinstance(values[k], int)})
        lists = {k: v for k, v in values.items() if isinstance(v, list) and len(v) == n}
        firsts = sorted({next(i for i, x in enumerate(v) if str(x) == str(y)) for v in lists.values() for y in v})
        picks = sorted(set(firsts[:depth]))
        picks += [i for i in range(n) if i not in picks][: depth - len(picks)]
        picks.sort()
        kw.update({k: [v[i] for i in picks] for k, v in lists.items()})
        per_layer = values.get("per_layer_config")
        if isinstance(per_layer, dict):
            kw["per_layer_config"] = {str(picks.index(int(i))): v for i, v in per_layer.items() if int(i) in picks}
    if "qk_rope_head_dim" in values:  # multi-head latent attention: its head sizes derive from these
        for key, value in (("head_dim", NARROW["qk_rope_head_dim"]),
                           ("qk_head_dim", NARROW["qk_rope_head_dim"] + NARROW["qk_nope_head_dim"])):
            if key in values:
                kw[key] = value
    if {"expand", "num_heads", "head_dim"} <= set(values):  # Mamba-2: heads × head size = expand × width
        kw.update(num_heads=NARROW["hidden_size"] * values["expand"] // NARROW["head_dim"], n_groups=1)
    kw.update({k: v for k, v in (extra or {}).items() if k in values})
    for k in values:
        sub = config.__dict__.get(k)
        if isinstance(sub, transformers.PretrainedConfig):
            kw[k] = {**sub.to_dict(), **narrow(sub, depth, extra)}
    return kw


def twin_model(config: Any, seed: int = 0) -> Any:
    """A random fp32 model of `config` made narrow: same family, depth and per-layer fields."""
    import transformers

    twin = type(config)(**{**config.to_dict(), **narrow(config)})
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(twin, dtype=torch.float32).eval()


def twin_problem(config: Any, plan: Any) -> tuple[str | None, bool]:
    """(why the plan fails on a narrow random twin of `config`'s model, or None; whether the twin
    could be built at all, so that the plan was proven)."""
    import dataclasses

    from lm_eval_layers.errors import LayersError
    from lm_eval_layers.variant import apply_plan

    if plan.is_identity:
        return None, True
    try:
        twin = twin_model(config)
    except Exception:  # noqa: BLE001 - a config that cannot be made narrow proves nothing either way
        return None, False
    try:
        apply_plan(twin, dataclasses.replace(plan, repair=None)).restore()
    except LayersError as e:
        return f"{e} (proven on a narrow random twin of the model)", True
    return None, True
