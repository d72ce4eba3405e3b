"""The identity probe: a block the plan says computes the identity is run once and must return
its input; a removed branch must compute what its written form (zeroed output projections)
computes. Checked where the variant is built, so a family whose blocks write the residual stream
through a module nobody named is refused in one line instead of giving a wrong number.

One forward pass of the variant on a few tokens (any plan: a variant that fails is refused in one
line, not at evaluation time); each checked slot's call (its arguments as the model passed them)
is recorded and replayed on the alternative block where one is needed; then its last token is
decoded through the cache and must get the same logits.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import torch
from torch import nn

from lm_eval_layers.arch import Layout
from lm_eval_layers.plan import LayerPlan, Slot

PROBE_TOKENS = 6


def _hidden(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"


def claims(slot: Slot) -> bool:
    """Does the plan claim something of this slot that the probe checks?"""
    return slot.zero_out or slot.drop_attn or slot.drop_mlp


def written_form(layout: Layout, block: nn.Module, slot: Slot, clone: Callable[..., nn.Module]) -> nn.Module:
    """The block as a checkpoint stores a removed branch: the source's tensors with the branch's
    output projections zeroed (`clone(block, replace)` shares every other tensor)."""
    replace = {
        id(p): nn.Parameter(torch.zeros_like(p), requires_grad=False)
        for name, p in block.named_parameters() if layout.is_output(name, attn=slot.drop_attn, mlp=slot.drop_mlp)
    }
    return clone(block, replace)


def writers(block: nn.Module, args: tuple, kwargs: dict[str, Any], hidden: int) -> list[str]:
    """Modules of `block` that still write a nonzero vector of the hidden size (innermost first)."""
    found: list[str] = []
    handles = []
    for name, module in block.named_modules():
        if not name or not any(True for _ in module.parameters(recurse=False)):
            continue

        def hook(_m: nn.Module, _i: Any, out: Any, name: str = name) -> None:
            t = _hidden(out)
            if isinstance(t, torch.Tensor) and t.shape[-1:] == (hidden,) and bool(t.detach().abs().sum() > 0):
                found.append(name)

        handles.append(module.register_forward_hook(hook))
    try:
        block(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    innermost = [n for n in found if not any(o != n and o.startswith(n + ".") for o in found)]
    return [n for n in innermost if not re.search(r"(norm|(^|\.)ln)", n, re.IGNORECASE)][::-1]  # nearest the output first


def _ids(model: nn.Module) -> torch.Tensor:
    embeddings = model.get_input_embeddings()
    vocab = embeddings.weight.shape[0]
    return ((torch.arange(PROBE_TOKENS) * 37 + 11) % vocab).unsqueeze(0).to(embeddings.weight.device)


def check(model: nn.Module, blocks: nn.ModuleList, plan: LayerPlan, layout: Layout, original: nn.ModuleList,
          clone: Callable[..., nn.Module], family: str) -> str | None:
    """Why the variant is not what its plan claims (None when every claim holds on the probe):
    it must run, its identity blocks and removed branches must be what they claim, and decoding
    with its cache must give the logits it gives without."""
    if plan.is_identity:
        return None
    checked = [k for k, slot in enumerate(plan.slots) if claims(slot)]
    calls: dict[int, list[Any]] = {}
    handles = []
    for k in checked:
        def pre(_m: nn.Module, args: tuple, kwargs: dict[str, Any], k: int = k) -> None:
            calls[k] = [args, kwargs, _hidden(args[0] if args else kwargs["hidden_states"]).detach().clone()]

        def post(_m: nn.Module, _args: tuple, _kwargs: dict[str, Any], out: Any, k: int = k) -> None:
            calls[k].append(_hidden(out).detach().clone())

        handles.append(blocks[k].register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(blocks[k].register_forward_hook(post, with_kwargs=True))
    ids = _ids(model)
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits
    except Exception as e:  # noqa: BLE001 - a variant that cannot run is refused, not run
        return f"{family} cannot run this plan: the variant fails on a probe input ({_line(e)})"
    finally:
        for h in handles:
            h.remove()
    hidden = model.get_input_embeddings().weight.shape[-1]
    for k in checked:
        problem = _slot_problem(k, plan.slots[k], calls.get(k, []), blocks, layout, original, clone, family, hidden)
        if problem:
            return problem
    return cache_problem(model, family, ids, logits)


def _slot_problem(k: int, slot: Slot, call: list[Any], blocks: nn.ModuleList, layout: Layout, original: nn.ModuleList,
                  clone: Callable[..., nn.Module], family: str, hidden: int) -> str | None:
    """Does slot `k` do what the plan claims on the input the probe gave it (`call`: args, kwargs, input, output)?"""
    if len(call) != 4:
        return f"block {k} of the variant was never called on a probe input, so its plan cannot be checked"
    args, kwargs, x, y = call
    kwargs = {**kwargs, **{key: None for key in ("past_key_values", "past_key_value", "cache", "layer_past") if key in kwargs}}
    with torch.no_grad():
        if (slot.zero_out or (slot.drop_attn and slot.drop_mlp)) and not torch.equal(x, y):
            what = "its zeroed output projections" if slot.zero_out else "both of its branches removed"
            culprits = writers(blocks[k], args, kwargs, hidden) if slot.zero_out else []
            through = f" ({', '.join(culprits[:3])} still writes to the residual stream)" if culprits else ""
            return (f"{family} block {k} ({slot.describe()}) is not the identity with {what}{through}, "
                    f"so {'this insert' if slot.zero_out else 'removing both branches'} cannot be built exactly")
        if slot.zero_out or any(p.device.type == "meta" for p in original[slot.source].parameters()):
            return None  # offloaded weights: the written form cannot be rebuilt here (the twin proved it)
        written = written_form(layout, original[slot.source], slot, clone)
        try:
            stored = _hidden(written(*args, **kwargs))
        except Exception as e:  # noqa: BLE001
            return f"{family} block {k} cannot be run again as a checkpoint stores it ({_line(e)})"
    if not torch.equal(stored, y):
        half = "attention and MLP branches" if slot.drop_attn and slot.drop_mlp else "attention branch" if slot.drop_attn else "MLP branch"
        return (f"{family} block {k}: removing its {half} in memory computes something else than the zeroed "
                "output projections a checkpoint stores, so the branch writes the residual stream through "
                "modules no layout names")
    return None


_CACHE_OUTPUTS = ("cache", "past_key_values", "state", "cache_params")  # what transformers models return their cache as


def cache_problem(model: nn.Module, family: str, ids: torch.Tensor, logits: torch.Tensor) -> str | None:
    """The probe's last token decoded through the variant's cache must get the logits the forward
    pass without a cache gave it (`logits` for `ids`): a block reading another block's cache entry,
    or a per-layer state built for the wrong kind of layer, breaks this. The cache goes back in
    under the name the model returned it by."""
    try:
        with torch.no_grad():
            prefill = model(input_ids=ids[:, :-1], use_cache=True)
            key = next((k for k in _CACHE_OUTPUTS if prefill.get(k) is not None), None)
            if key is None:
                return None  # the model keeps no cache
            step = model(input_ids=ids[:, -1:], use_cache=True, **{key: prefill[key]})
    except Exception as e:  # noqa: BLE001
        return f"{family} cannot decode with this plan and a cache ({_line(e)})"
    cached, plain = step.logits[0, -1].float(), logits[0, -1].float()
    dtype = next(model.parameters()).dtype
    # a state-space layer's chunked scan and its one-step recurrence differ at 1e-3 of the logits in
    # fp32 (Bamba); a misplaced cache entry moves them by tenths
    tolerance = (1e-2 if dtype == torch.float32 else 5e-2) * max(1.0, plain.abs().max().item())
    if (cached - plain).abs().max().item() > tolerance:
        return (f"{family}: with this plan, decoding with the KV cache gives other logits than a forward pass "
                "without it (a block reads state kept for another position), so the plan is refused")
    return None
