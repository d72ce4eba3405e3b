"""Apply a layer plan to a loaded model in place, and undo it.

Every slot gets its own module object (so each attention has its own `layer_idx` and KV-cache
entry), but original blocks share the original parameters and buffers: applying a plan copies
no weights. Only synthesised `avg` blocks, zeroed output projections and a repair's folded down
projections (`tensors`, from `lm_eval_layers.repair`) own new tensors.
The original `nn.ModuleList` and config values are kept and put back by `Variant.restore()`.
A plan is proven once per model by the identity probe (`lm_eval_layers.probe`) when first applied:
whatever it claims that does not hold is refused in one line, and nothing stays applied.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from lm_eval_layers.arch import INDEX_ATTRIBUTES, Layout, check_plan, computed_mismatch, config_updates, layout_for, text_config
from lm_eval_layers.compat.offload import offloaded_values
from lm_eval_layers import probe
from lm_eval_layers.plan import LayerPlan, PlanError, Slot
from lm_eval_layers.recipes import synthesize

_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


class _Skipped(nn.Module):
    """A removed branch: adds nothing to the residual stream and computes nothing.

    Its output has the shape of the branch it replaces (a tensor, or a tuple whose first item is
    the branch's output: attention weights, router logits, … are None), learned once by calling
    the replaced branch on the first input, without the cache.
    """

    def __init__(self, replaced: nn.Module, residual_inside: bool = False) -> None:
        super().__init__()
        self._replaced = (replaced,)  # a tuple: not a submodule, so its parameters are not the slot's
        self._arity: int | None = None  # None: not learned; 0: a tensor; n: a tuple of n
        self.residual_inside = residual_inside

    def _output(self, hidden_states: torch.Tensor, args: tuple, kwargs: dict[str, Any]) -> Any:
        if self._arity is None:  # learned without the cache, which only this module's placeholder may touch
            uncached = {k: None if k in _CACHE_KWARGS else v for k, v in kwargs.items()}
            with torch.no_grad():
                out = self._replaced[0](hidden_states, *args, **uncached)
            self._arity = len(out) if isinstance(out, (tuple, list)) else 0
        zero = args[0] if self.residual_inside else torch.zeros_like(hidden_states)
        return zero if self._arity == 0 else (zero, *(None,) * (self._arity - 1))


class SkippedAttention(_Skipped):
    """A removed attention branch (or a hybrid's state-space / linear-attention mixer).

    An attention branch still records the tokens in its KV-cache entry (one-wide zero keys: a
    zero-width entry would count as empty), because transformers reads the past length from
    cache layer 0."""

    def __init__(self, replaced: nn.Module, residual_inside: bool = False, records_cache: bool = True) -> None:
        super().__init__(replaced, residual_inside)
        self.layer_idx = 0
        self.records_cache = records_cache

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
        cache = next((kwargs[k] for k in _CACHE_KWARGS if kwargs.get(k) is not None), None)
        layers = getattr(cache, "layers", None)
        keeps_keys = layers is None or (self.layer_idx < len(layers) and hasattr(layers[self.layer_idx], "keys"))
        if self.records_cache and cache is not None and hasattr(cache, "update") and keeps_keys:
            batch, length = hidden_states.shape[:2]
            placeholder = hidden_states.new_zeros(batch, 1, length, 1)
            cache.update(placeholder, placeholder, self.layer_idx)
        return self._output(hidden_states, args, kwargs)


class SkippedMLP(_Skipped):
    """A removed MLP branch (dense or mixture of experts)."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return self._output(hidden_states, args, kwargs)


ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")  # mixers that hold a KV cache


def clone_structure(module: nn.Module, replace: dict[int, Any] | None = None) -> nn.Module:
    """A new module tree sharing every tensor and config of `module` (or `replace`'s stand-ins)."""
    memo: dict[int, Any] = {}
    for sub in module.modules():
        for value in sub.__dict__.values():
            if hasattr(value, "to_dict") and hasattr(value, "model_type"):  # a transformers config
                memo[id(value)] = value
    for tensor in (*module.parameters(), *module.buffers()):
        memo[id(tensor)] = tensor
    memo.update(replace or {})
    return copy.deepcopy(module, memo)


def clone_model(model: nn.Module) -> nn.Module:
    """A clone of a whole model with its own module tree and config, sharing every tensor."""
    config = copy.deepcopy(model.config)
    return clone_structure(
        model, {id(model.config): config, id(text_config(model.config)): text_config(config)}
    )


def _set_layer_idx(module: nn.Module, idx: int) -> None:
    for sub in module.modules():
        for name in INDEX_ATTRIBUTES:
            if isinstance(getattr(sub, name, None), int) and not isinstance(getattr(sub, name), bool):
                setattr(sub, name, idx)


def _in_memory(block: nn.Module, device: torch.device) -> None:
    """A synthesised block owns its tensors: drop the offload hooks cloned from its source (they
    would load the source's weights) and only move inputs to the block's device."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module, remove_hook_from_module

    remove_hook_from_module(block, recurse=True)
    add_hook_to_module(block, AlignDevicesHook(execution_device=device))


def build_slot(layout: Layout, blocks: nn.ModuleList, slot: Slot, idx: int,
               own: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """The module for one slot: a structural clone of its source, with shared or new tensors
    (`own`: tensors by name in the block that this slot holds instead of its source's)."""
    source = blocks[slot.source]
    replace: dict[int, Any] = {}
    for name, param in source.named_parameters():
        if own and name in own:
            replace[id(param)] = nn.Parameter(own[name], requires_grad=False)
    offloaded: dict[int, torch.Tensor] = {}
    if slot.synthesized:
        for j in slot.sources:  # weights accelerate offloaded (parallelize=True) are read back
            offloaded.update(offloaded_values(blocks[j]))
        others = [dict(blocks[j].named_parameters()) for j in slot.sources]
        for name, param in source.named_parameters():
            own = offloaded.get(id(param), param.data)
            values = [offloaded.get(id(o[name]), o[name].data).to(own.device) for o in others]  # sources may sit on other GPUs
            tensor = synthesize(layout, slot, name, values)
            if tensor is not param.data:
                replace[id(param)] = nn.Parameter(tensor, requires_grad=False)
    block = clone_structure(source, replace)
    if offloaded:
        _in_memory(block, next(iter(offloaded.values())).device)
    for kind, gone in (("attn", slot.drop_attn), ("mlp", slot.drop_mlp)):
        if not gone:
            continue
        branch = layout.branch(source, kind)
        if branch is None:
            what = "token mixer (attention)" if kind == "attn" else "MLP"
            raise PlanError(f"drop_{kind}: block {slot.source} has no separate {what} module ({type(source).__name__}); "
                            "drop the whole block instead")
        replaced = getattr(block, branch)
        if kind == "attn":
            setattr(block, branch, SkippedAttention(replaced, layout.residual_inside, branch in ATTENTION_NAMES))
        else:
            setattr(block, branch, SkippedMLP(replaced, layout.residual_inside))
    _set_layer_idx(block, idx)
    return block


class Variant:
    """A plan applied to a model in place; `restore()` brings back the original exactly.

    `tensors` (slot -> tensor name in the block -> tensor) are tensors the variant owns in place
    of its source block's: a repaired plan's folded projections (`lm_eval_layers.repair`)."""

    def __init__(self, model: nn.Module, plan: LayerPlan, tensors: dict[int, dict[str, torch.Tensor]] | None = None) -> None:
        self.model = model
        self.plan = plan
        self.layout = layout_for(model)
        check_plan(plan, model.config)
        self.layout.check(plan)
        if plan.repair is not None and tensors is None:
            raise PlanError("a repaired plan needs its fitted tensors: fit them with lm_eval_layers.repair.fit.fit_repair "
                            "and pass fit.tensors(model, plan)")
        parent, name = self.layout.parent_and_name(model)
        self._parent, self._name = parent, name
        self.original_blocks: nn.ModuleList = getattr(parent, name)
        self._check_stack()
        self._config = text_config(model.config)
        values = self._config.to_dict()
        updates = config_updates(self._config, self.layout, plan)
        self._saved_config = {key: values[key] if key in values else getattr(self._config, key, None) for key in updates}
        family = getattr(self._config, "model_type", type(model).__name__)
        blocks = self._build_blocks(tensors, family)
        setattr(parent, name, blocks)
        self.blocks = blocks
        self._follow_depth()
        self._config_class = type(self._config)
        try:
            self._update_config(updates, family)
            proven: set = self.original_blocks.__dict__.setdefault("_lm_eval_layers_proven", set())
            key = (plan.num_layers, plan.slots)
            problem = None if key in proven else probe.check(model, blocks, plan, self.layout, self.original_blocks,
                                                               clone_structure, family)
        except BaseException:
            self.restore()
            raise
        if problem:
            self.restore()
            raise PlanError(problem)
        proven.add(key)  # a plan's claims are properties of the family's code, not of the weights: proven once per model

    def _check_stack(self) -> None:
        """Refused before anything changes: a stack that already holds a variant (one plan at a
        time), or one of another depth than the plan's."""
        if getattr(self.original_blocks, "_lm_eval_layers_variant", False):
            raise PlanError("this model already has a layer plan applied; restore() it before applying another")
        if len(self.original_blocks) != self.plan.num_layers:
            raise PlanError(
                f"the plan is for {self.plan.num_layers} blocks but the model has {len(self.original_blocks)}; "
                "resolve the plan against this model's config"
            )

    def _build_blocks(self, tensors: dict[int, dict[str, torch.Tensor]] | None, family: str) -> nn.ModuleList:
        """The variant's stack, one module per slot sharing the original tensors, marked as a
        variant; a family whose blocks cannot be cloned that way is refused in one line."""
        try:
            blocks = nn.ModuleList(
                build_slot(self.layout, self.original_blocks, slot, idx, (tensors or {}).get(idx))
                for idx, slot in enumerate(self.plan.slots)
            )
        except RuntimeError as e:  # e.g. weight-normed parameters that cannot be cloned without copying
            raise PlanError(f"{family}: its blocks cannot be cloned with shared weights "
                            f"({str(e).splitlines()[0][:120]})") from None
        blocks._lm_eval_layers_variant = True
        return blocks

    def _follow_depth(self) -> None:
        """Depths the stack's owner copied from its config at build time (Gemma 4's first shared-KV
        block is `num_hidden_layers - num_kv_shared_layers`) take the plan's depth, as a model
        built for the plan would have them; `restore()` puts them back."""
        self._saved_depths = {k: v for k, v in vars(self._parent).items() if not k.startswith("_") and type(v) is int
                              and v == self.plan.num_layers}
        for key in self._saved_depths:
            setattr(self._parent, key, len(self.plan.slots))

    def _update_config(self, updates: dict[str, Any], family: str) -> None:
        """Set the config fields the plan changes, refused in one line where a field is computed;
        per-layer lists the config computes wrongly for the plan's stack are stored for this
        variant instead (a subclass shadows them; `restore()` takes it away)."""
        pinned = computed_mismatch(self._config, self.plan, updates)
        for key, value in updates.items():
            try:
                setattr(self._config, key, value)
            except (AttributeError, TypeError, ValueError, NotImplementedError):
                raise PlanError(f"{family}: its config field {key!r} is computed, not stored, so it cannot follow the plan") from None
        if pinned:
            self._config.__class__ = type(self._config_class.__name__, (self._config_class,), dict.fromkeys(pinned))
            self._config.__dict__.update(pinned)
        self._pinned = tuple(pinned)

    def restore(self) -> None:
        """Put the original blocks and config fields back (idempotent)."""
        setattr(self._parent, self._name, self.original_blocks)
        for key, value in getattr(self, "_saved_depths", {}).items():
            setattr(self._parent, key, value)
        for key, value in self._saved_config.items():
            try:
                setattr(self._config, key, value)
            except (AttributeError, TypeError, ValueError, NotImplementedError):
                pass  # a field the config refused to change was never changed
        self._config.__class__ = self._config_class
        for key in getattr(self, "_pinned", ()):
            self._config.__dict__.pop(key, None)

    def __enter__(self) -> Variant:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


def apply_plan(model: nn.Module, plan: LayerPlan, tensors: dict[int, dict[str, torch.Tensor]] | None = None) -> Variant:
    """Turn `model` into the plan's variant, in place; undo with `.restore()` or a `with` block."""
    return Variant(model, plan, tensors)
