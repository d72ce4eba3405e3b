"""Per-architecture facts, as data: where the decoder blocks live, the attribute names of their
attention and MLP branches, the branches' output projections, and the config fields that count
or describe layers.

The table holds what cannot be found from a loaded model (tensor names on disk that differ from
the names in memory, residual adds inside branches). Everything else is found from the module
tree (`discover`): the decoder's list of blocks (a multimodal wrapper's language model), each
block's token mixer (attention, Mamba, linear attention) and MLP, and every projection through
which a block writes the residual stream (shared experts and dense MLPs beside the experts
included). What is found is proven where it is used: a block said to be the identity is run on a
probe input (`lm_eval_layers.probe`). Mixture-of-experts blocks are dropped, copied and zeroed like
dense ones but never averaged: two blocks' experts do not correspond.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lm_eval_layers.errors import PlanError, UnsupportedArchitecture

if TYPE_CHECKING:
    from lm_eval_layers.plan import LayerPlan


COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")  # the names transformers configs count blocks by

# Attributes through which a block's modules know their position (cache entry, recurrent state):
# every slot of a variant gets its own.
INDEX_ATTRIBUTES = ("layer_idx", "layer_id")

# Attribute names of a block's token-mixing branch (attention, state-space, linear attention) and of
# its MLP branch, in the order they are looked for.
MIXER_NAMES = ("self_attn", "attn", "attention", "self_attention", "mamba", "mixer", "linear_attn",
               "temporal_block", "conv", "token_mixer")
MLP_NAMES = ("mlp", "feed_forward", "block_sparse_moe", "ffn", "moe", "mlp_block", "channel_mix")
# Leaf names of projections that write a branch's result (output dim = hidden size).
OUTPUT_LEAVES = frozenset({
    "o_proj", "out_proj", "down_proj", "c_proj", "dense", "dense_4h_to_h", "w2", "fc2", "fc_out", "wo",
    "output_proj", "proj_out", "linear_2", "output_linear", "out", "down", "output", "value",
})


@dataclass(frozen=True)
class Layout:
    """Where the parts of a decoder stack live, relative to the *ForCausalLM module.

    Output projections are tensor-name patterns relative to a block: a pattern names a module or
    a parameter (`mlp.down_proj` covers `mlp.down_proj.weight` and `.bias`), and `*` stands for an
    expert index. They cover both the names a loaded model uses and the names its checkpoints use,
    which differ for mixtures of experts (fused `mlp.experts.down_proj` in memory, one
    `experts.N.down_proj.weight` per expert on the hub).
    """

    blocks: str  # dotted path to the nn.ModuleList of decoder blocks
    attn: str  # attribute of a block holding the attention branch
    mlp: str | None  # attribute holding the MLP branch (None: not a submodule, e.g. OPT)
    attn_out: tuple[str, ...]  # every tensor through which the token mixer writes the residual stream
    mlp_out: tuple[str, ...]  # every tensor through which the MLP branch writes the residual stream
    layer_count: str = "num_hidden_layers"  # config.json key counting the blocks
    per_layer: tuple[str, ...] = ("layer_types",)  # config lists with one entry per block
    other_out: tuple[str, ...] = ()  # writers outside both branches (zeroed only with the whole block)
    residual_inside: bool = False  # branches add the residual themselves: branch(x, residual)
    experts: bool = False  # the MLP is a mixture of experts: two blocks' experts do not align
    dense_blocks: str | None = None  # config list of blocks with a dense MLP among MoE ones (Qwen-MoE)
    conv1d: bool = False  # projections are GPT-2's Conv1D: weights stored [in, out], not nn.Linear's [out, in]

    @property
    def count_keys(self) -> tuple[str, ...]:
        """Config keys that may count the blocks, this family's own first."""
        return tuple(dict.fromkeys((self.layer_count, *COUNT_KEYS)))

    @property
    def layer_keys(self) -> tuple[str, ...]:
        """Every config key that counts or describes blocks (what a plan must keep consistent)."""
        dense = (self.dense_blocks, "decoder_sparse_step") if self.dense_blocks else ()
        return (*self.count_keys, "max_window_layers", *self.per_layer, *dense)

    def is_output(self, name: str, attn: bool = True, mlp: bool = True) -> bool:
        """Does tensor `name` (relative to a block) write the attention / MLP branch into the
        residual stream? Zeroing all such tensors of a branch silences it (`*-zero` inserts)."""
        patterns = (self.attn_out if attn else ()) + (self.mlp_out if mlp else ()) + (self.other_out if attn and mlp else ())
        return any(_pattern(p).match(name) for p in patterns)

    def branch(self, block: nn.Module, kind: str) -> str | None:
        """The attribute of `block` holding its token mixer (`attn`) or MLP (`mlp`): the family's
        own name first; hybrid stacks name the mixer differently from block to block."""
        own, names = (self.attn, MIXER_NAMES) if kind == "attn" else (self.mlp, MLP_NAMES)
        children = dict(block.named_children())
        return next((n for n in (own, *names) if n and isinstance(children.get(n), nn.Module)), None)

    def check(self, plan: "LayerPlan") -> None:
        """Refuse what this family cannot build, before any weight is touched."""
        if not self.experts:
            return
        for slot in plan.slots:
            if len(slot.sources) > 1:
                raise PlanError(
                    f"insert {slot.source}:{slot.init} averages blocks {slot.source} and {slot.sources[1]}, but they are "
                    "mixture-of-experts blocks whose experts do not correspond; use copy or copy-zero"
                )

    def parent_and_name(self, model: nn.Module) -> tuple[nn.Module, str]:
        *path, name = self.blocks.split(".")
        parent = model
        for part in path:
            parent = getattr(parent, part)
        return parent, name

    def find_blocks(self, model: nn.Module) -> nn.ModuleList | None:
        try:
            parent, name = self.parent_and_name(model)
        except AttributeError:
            return None
        blocks = getattr(parent, name, None)
        return blocks if isinstance(blocks, nn.ModuleList) else None


@functools.lru_cache(maxsize=None)
def _pattern(pattern: str) -> re.Pattern[str]:
    return re.compile(re.escape(pattern).replace(r"\*", r"\d+") + r"(\..+)?$")


LLAMA_LIKE = Layout("model.layers", "self_attn", "mlp", ("self_attn.o_proj",), ("mlp.down_proj",))
STARCODER2 = Layout("model.layers", "self_attn", "mlp", ("self_attn.o_proj",), ("mlp.c_proj",))
# Mixture-of-experts MLPs: fused experts in memory, one tensor per expert in hub checkpoints, a
# shared expert (Qwen2-MoE), and dense MLPs in the blocks a Qwen-MoE config lists as mlp_only.
MOE = Layout(
    "model.layers", "self_attn", "mlp", ("self_attn.o_proj",),
    ("mlp.experts.down_proj", "mlp.experts.*.down_proj", "mlp.shared_expert.down_proj", "mlp.down_proj"),
    experts=True, dense_blocks="mlp_only_layers",
)
MIXTRAL = Layout(  # hub checkpoints name the MLP block_sparse_moe and the experts' projections w1/w2/w3
    "model.layers", "self_attn", "mlp", ("self_attn.o_proj",),
    ("mlp.experts.down_proj", "block_sparse_moe.experts.*.w2"), experts=True,
)
GPT2 = Layout("transformer.h", "attn", "mlp", ("attn.c_proj",), ("mlp.c_proj",), layer_count="n_layer", conv1d=True)
GPT_NEOX = Layout("gpt_neox.layers", "attention", "mlp", ("attention.dense",), ("mlp.dense_4h_to_h",))
FALCON = Layout("transformer.h", "self_attention", "mlp", ("self_attention.dense",), ("mlp.dense_4h_to_h",))
BLOOM = Layout(
    "transformer.h", "self_attention", "mlp", ("self_attention.dense",), ("mlp.dense_4h_to_h",),
    layer_count="n_layer", residual_inside=True,
)
OPT = Layout("model.decoder.layers", "self_attn", None, ("self_attn.out_proj",), ("fc2",))

ARCHITECTURES: dict[str, Layout] = {
    **{
        name: LLAMA_LIKE
        for name in (
            "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3",
            "olmo", "olmo2", "granite", "smollm3", "cohere", "glm", "helium", "stablelm",
        )
    },
    "starcoder2": STARCODER2,
    **{name: MOE for name in ("qwen2_moe", "qwen3_moe", "olmoe")},
    "mixtral": MIXTRAL,
    "gpt2": GPT2,
    "gpt_neox": GPT_NEOX,
    "falcon": FALCON,
    "bloom": BLOOM,
    "opt": OPT,
}


# Submodules that normalise the MLP branch's output before it joins the residual stream (Gemma 2/3,
# OLMo 2): a map fitted on the residual stream cannot be folded into the branch's weights there.
MLP_OUTPUT_NORMS = ("post_feedforward_layernorm", "post_mlp_layernorm", "post_ffw_norm")


def fold_problem(layout: Layout, block: nn.Module, config: Any) -> str | None:
    """Why a map on the MLP branch's output cannot be folded into this family's down projection
    (None when it can: the branch's output is added to the residual unnormalised, through one
    projection)."""
    names = {name.rsplit(".", 1)[-1] for name, _ in block.named_modules()}
    norm = next((n for n in MLP_OUTPUT_NORMS if n in names), None)
    if norm:
        return f"its blocks normalise the MLP output ({norm}) before the residual"
    if layout.experts:
        return "its MLP is a mixture of experts (every expert's projection would need the map)"
    if getattr(text_config(config), "do_layer_norm_before", True) is False:
        return "its blocks normalise after the residual (do_layer_norm_before=false)"
    return None


def text_config(config: Any) -> Any:
    """The decoder's config (multimodal models nest it)."""
    getter = getattr(config, "get_text_config", None)
    return getter(decoder=True) if getter else config


def num_layers(config: Any) -> int:
    """Depth of the decoder stack, from a config object or a config.json dict (no weights)."""
    if isinstance(config, dict):
        values = config.get("text_config", config) if _count(config) is None else config
    else:
        text = text_config(config)
        values = {"model_type": getattr(text, "model_type", None), **vars(text)}
        for key in COUNT_KEYS:  # a count the config computes (Nemotron-H: the length of its layer types)
            if not isinstance(values.get(key), int) and isinstance(getattr(text, key, None), int):
                values[key] = getattr(text, key)
    count = _count(values)
    if count is None:
        raise UnsupportedArchitecture(
            f"cannot tell how many blocks the model has (no {' / '.join(COUNT_KEYS)} in its config); "
            "add its layer-count key to a Layout in lm_eval_layers/arch.py"
        )
    return count


def _count(values: dict[str, Any]) -> int | None:
    keys = ARCHITECTURES.get(values.get("model_type"), LLAMA_LIKE).count_keys
    return next((values[key] for key in keys if isinstance(values.get(key), int)), None)


# Config fields that tie blocks to their positions in ways no plan can keep (when set): why.
POSITION_BOUND = {
    "hidden_size_per_layer_input": "feeds each block its own slice of a per-layer input embedding, chosen by position",
    "num_kv_shared_layers": "has blocks that read another block's KV cache",
}


def check_plan(plan: "LayerPlan", config: Any) -> None:
    """Refuse a plan the config's family cannot build, from the config alone (no weights)."""
    text = text_config(config)
    values = text.to_dict() if not plan.is_identity else {}
    for key, why in POSITION_BOUND.items():
        value = values.get(key)
        if value:
            raise PlanError(f"{getattr(text, 'model_type', 'this family')} {why} ({key}={value}), so its blocks "
                            "cannot be dropped, repeated or moved")
    layout = ARCHITECTURES.get(getattr(text, "model_type", None))
    if layout is not None:
        layout.check(plan)


def layout_for(model: nn.Module) -> Layout:
    """The layout of a loaded model (or a weightless one): the table's facts for its family where it
    has a line, completed from the module tree (`discover`)."""
    model_type = getattr(text_config(model.config), "model_type", None)
    table = ARCHITECTURES.get(model_type)
    return discover(model, table if table is not None and table.find_blocks(model) is not None else None)


# Module-tree parts that are never the decoder stack of a causal LM (towers of multimodal wrappers).
_NOT_DECODER = re.compile(r"(^|\.)(vision|visual|audio|image|vit|speech|encoder|vision_tower|vision_model|audio_tower)[^.]*(\.|$)")


def _block_path(model: nn.Module) -> str | None:
    """Dotted path of the decoder's block list: a ModuleList as long as the text config's depth,
    outside vision and audio towers where there is one, the language model's first."""
    try:
        depth = num_layers(model.config)
    except UnsupportedArchitecture:
        depth = None
    found = [
        name for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) > 0 and (depth is None or len(module) == depth)
    ]
    # a tower's list only when there is no other (BERT-style decoders keep their blocks in `encoder`)
    found.sort(key=lambda n: (bool(_NOT_DECODER.search(n)), "language_model" not in n, n.count("."), n))
    return found[0] if found else None


def _out_dim(module: nn.Module, param: torch.Tensor) -> tuple[int, ...]:
    """The sizes a parameter may write (its output dimension; fused expert tensors: either of their last two)."""
    if param.dim() == 1:
        return (param.shape[0],)
    if param.dim() >= 3:
        return tuple(param.shape[-2:])
    return (param.shape[1],) if type(module).__name__ == "Conv1D" else (param.shape[0],)


def _writers(block: nn.Module, hidden: int) -> list[tuple[str, str]]:
    """(pattern, first path component) of every projection in `block` that writes a vector of the
    hidden size and is named like an output projection; digits become `*`, and a fused experts
    tensor (`experts.down_proj`) also matches the per-expert names checkpoints store."""
    out = []
    for name, param in block.named_parameters():
        parts = name.split(".")
        path = parts[:-1] if parts[-1] in ("weight", "bias") else parts
        if not path or path[-1] not in OUTPUT_LEAVES:
            continue
        owner = block.get_submodule(".".join(parts[:-1])) if len(parts) > 1 else block
        if hidden not in _out_dim(owner, param):
            continue
        pattern = ".".join("*" if p.isdigit() else p for p in path)
        out.append((pattern, path[0]))
        if parts[-1] not in ("weight", "bias") and len(path) > 1 and path[-2] == "experts":
            out.append((".".join([*path[:-1], "*", path[-1]]), path[0]))
    return out


def discover(model: nn.Module, base: Layout | None = None) -> Layout:
    """The layout found from the module tree, with the table's facts (`base`) kept and its output
    projections completed by the ones found."""
    path = base.blocks if base is not None else _block_path(model)
    if path is None:
        model_type = getattr(text_config(model.config), "model_type", None)
        raise UnsupportedArchitecture(
            f"architecture {model_type!r} ({type(model).__name__}) is not supported: no list of decoder blocks as long as "
            "its config's layer count was found in the model"
        )
    lookup = Layout(path, base.attn if base else "", base.mlp if base else None, (), ())
    blocks = lookup.find_blocks(model)
    assert blocks is not None
    parent, name = lookup.parent_and_name(model)
    siblings = [n for n, m in parent.named_children() if n != name and isinstance(m, nn.ModuleList) and len(m) == len(blocks)]
    if siblings:
        model_type = getattr(text_config(model.config), "model_type", None)
        raise UnsupportedArchitecture(
            f"architecture {model_type!r} ({type(model).__name__}) keeps each block's parts in parallel lists "
            f"({', '.join([name, *siblings][:4])}), so a plan cannot move whole blocks"
        )
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    hidden = weight.shape[-1] if weight is not None else getattr(text_config(model.config), "hidden_size", None)
    attn_names = [lookup.branch(b, "attn") for b in blocks]
    mlp_names = [lookup.branch(b, "mlp") for b in blocks]
    outs: dict[str, list[str]] = {"attn": list(base.attn_out) if base else [], "mlp": list(base.mlp_out) if base else [], "other": []}
    for block, attn, mlp in zip(blocks, attn_names, mlp_names):
        for pattern, head in _writers(block, hidden):
            kind = "attn" if head == attn else "mlp" if head == mlp else "other"
            if pattern not in outs[kind]:
                outs[kind].append(pattern)
    count_key = base.layer_count if base else next(
        (k for k in COUNT_KEYS if isinstance(getattr(text_config(model.config), k, None), int)), "num_hidden_layers")
    return Layout(
        path,
        base.attn if base else next((a for a in attn_names if a), ""),
        base.mlp if base else next((m for m in mlp_names if m), None),
        tuple(outs["attn"]), tuple(outs["mlp"]), count_key,
        base.per_layer if base else ("layer_types",),
        other_out=tuple(outs["other"]),
        residual_inside=base.residual_inside if base else False,
        experts=(base.experts if base else False) or any(".experts." in f".{n}" for b in blocks for n, _ in b.named_parameters()),
        dense_blocks=base.dense_blocks if base else None,
        conv1d=(base.conv1d if base else False) or any(type(m).__name__ == "Conv1D" for m in blocks[0].modules()),
    )


# Config keys that are lists or index-keyed dicts but never describe layers.
_NOT_PER_LAYER = frozenset({
    "architectures", "eos_token_id", "bos_token_id", "pad_token_id", "bad_words_ids", "suppress_tokens",
    "begin_suppress_tokens", "time_step_limit", "mrope_section", "id2label", "label2id", "image_token_ids",
    "forced_decoder_ids", "rope_scaling", "rope_parameters", "auto_map",
})
# Integer keys counting the leading dense blocks of a mixture-of-experts stack.
LEADING_DENSE_KEYS = ("first_k_dense_replace", "num_dense_layers", "moe_layer_start_index", "first_dense_layers")
_INDEX_LIST = re.compile(r"(idxs|indices|_ids|_layers|_layer_ids|index_layers)$")


def _is_index_list(key: str, value: Any, n: int) -> bool:
    """A list of block indices (`full_attn_idxs`, `attn_layer_indices`, `mlp_only_layers`), not one entry per block."""
    if not (_INDEX_LIST.search(key) and isinstance(value, (list, tuple))):
        return False
    ints = all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < n for v in value)
    increasing = all(a < b for a, b in zip(value, value[1:]))
    return ints and increasing and (len(value) != n or list(value) == list(range(n)))


def _index_keyed(value: Any, n: int) -> bool:
    return isinstance(value, dict) and bool(value) and all(
        (isinstance(k, int) or (isinstance(k, str) and k.isdigit())) and int(k) < n for k in value)


def layer_config_updates(layout: Layout, plan: "LayerPlan", values: dict[str, Any]) -> dict[str, Any]:
    """New values of every config field that counts or describes layers, for a plan's variant.

    `values` are the original text-config fields (a config.json dict or a config's attributes);
    used for the in-memory variant and for the config.json that `surgery` writes, so both agree.
    Whatever its name: a list with one entry per block follows the plan, a list of block indices
    is renumbered, a dict keyed by block index is rekeyed (its keys' zero padding kept), and a
    count of leading dense blocks counts them in the new stack. Fields that cannot follow a plan
    (a pattern computed from the index) are caught by `checkpoint.structure` and the identity probe.
    """
    n = plan.num_layers
    count_key = next((key for key in layout.count_keys if key in values), layout.layer_count)
    # a count stored as None is computed from a per-layer list (Nemotron-H), which follows below
    updates: dict[str, Any] = {} if count_key in values and values[count_key] is None else {count_key: len(plan.slots)}
    for key, value in values.items():
        if key in updates or key in _NOT_PER_LAYER or key == layout.dense_blocks or key == count_key:
            continue
        if _is_index_list(key, value, n):
            updates[key] = [k for k, slot in enumerate(plan.slots) if slot.source in set(value)]
        elif isinstance(value, (list, tuple)) and len(value) == n and n > 1:
            updates[key] = [value[slot.source] for slot in plan.slots]
        elif _index_keyed(value, n):
            width = max(len(str(k)) for k in value)
            by_index = {int(k): v for k, v in value.items()}
            as_str = isinstance(next(iter(value)), str)
            updates[key] = {
                (str(k).zfill(width) if as_str else k): by_index[slot.source]
                for k, slot in enumerate(plan.slots) if slot.source in by_index
            }
    for key in LEADING_DENSE_KEYS:
        lead = values.get(key)
        if isinstance(lead, int) and not isinstance(lead, bool):
            updates[key] = _leading(plan, lead)
    window_layers = values.get("max_window_layers")
    if isinstance(window_layers, int) and not isinstance(window_layers, bool):
        # Qwen2: blocks below max_window_layers use full attention; count them in the new stack.
        updates["max_window_layers"] = sum(1 for slot in plan.slots if slot.source < window_layers)
    dense = values.get(layout.dense_blocks) if layout.dense_blocks else None
    if isinstance(dense, (list, tuple)):
        # Qwen-MoE builds a dense MLP in block i when i is listed or (i + 1) % decoder_sparse_step
        # != 0; the new stack lists its dense blocks explicitly, with a step of 1.
        step = values.get("decoder_sparse_step") or 1
        dense_sources = {i for i in range(plan.num_layers) if i in dense or (i + 1) % step}
        updates[layout.dense_blocks] = [k for k, slot in enumerate(plan.slots) if slot.source in dense_sources]
        if "decoder_sparse_step" in values:
            updates["decoder_sparse_step"] = 1
    return updates


def _leading(plan: "LayerPlan", lead: int) -> int:
    """How many of the new stack's first slots come from the original's first `lead` blocks."""
    return next((k for k, slot in enumerate(plan.slots) if slot.source >= lead), len(plan.slots))


# Computed lists that change nothing the model itself computes unless their key is set: Gemma 4 marks
# the last block of each attention kind "store" (its KV states kept for an assistant model to read);
# only num_kv_shared_layers > 0 makes one of its own blocks read them, and that is refused
# (POSITION_BOUND). An assistant paired with a cut model reads the new stack's last blocks.
_BOOKKEEPING = {"kv_sharing_modes": "num_kv_shared_layers"}


def computed_layer_fields(config: Any) -> dict[str, list[Any]]:
    """Per-layer lists a config *computes* (properties, e.g. Jamba's `layers_block_type` from
    `attn_layer_period`/`offset`): no stored field to cut, so a plan may silently move them."""
    from transformers import PretrainedConfig

    n = num_layers(config)
    out: dict[str, list[Any]] = {}
    for name in dir(type(config)):
        if name.startswith("_") or not isinstance(inspect.getattr_static(type(config), name, None), property):
            continue
        if hasattr(PretrainedConfig, name):  # the base class's own (deprecated aliases among them): not the family's
            continue
        try:
            value = getattr(config, name)
        except Exception:  # noqa: BLE001 - a property that cannot be read says nothing about layers
            continue
        if isinstance(value, (list, tuple)) and len(value) == n:
            out[name] = list(value)
    return out


def computed_mismatch(config: Any, plan: "LayerPlan", updates: dict[str, Any]) -> dict[str, list[Any]]:
    """The computed per-layer lists that a config with `updates` gets wrong for `plan`'s stack:
    name -> the list the stack needs."""
    if not computed_layer_fields(config):
        return {}
    return misplaced(config, plan, type(config).from_dict({**config.to_dict(), **updates}))


def misplaced(config: Any, plan: "LayerPlan", after: Any) -> dict[str, list[Any]]:
    """The per-layer lists `config` computes that the plan's config `after` computes wrongly."""
    got = computed_layer_fields(after)
    needed = {name: [values[s.source] for s in plan.slots] for name, values in computed_layer_fields(config).items()
              if not (name in _BOOKKEEPING and not getattr(config, _BOOKKEEPING[name], 0))}
    return {name: want for name, want in needed.items() if got.get(name) != want}


_PATTERN_KEY = re.compile(r"(period|offset|interval)$")


def repattern(config: Any, plan: "LayerPlan", updates: dict[str, Any]) -> dict[str, Any]:
    """Values of the config's integer pattern keys (`attn_layer_period`/`_offset`, …) under which
    its computed per-layer lists describe the plan's stack; {} when none do (or none is needed)."""
    if not computed_mismatch(config, plan, updates):
        return {}
    values = config.to_dict()
    keys = [k for k, v in values.items() if _PATTERN_KEY.search(k) and isinstance(v, int) and not isinstance(v, bool)]
    groups: dict[str, list[str]] = {}
    for key in keys:
        groups.setdefault(_PATTERN_KEY.sub("", key), []).append(key)
    found: dict[str, Any] = {}
    for group in groups.values():
        wrong = len(computed_mismatch(config, plan, {**updates, **found}))
        for combo in itertools.product(range(len(plan.slots) + 1), repeat=len(group)):
            try:
                fixed = len(computed_mismatch(config, plan, {**updates, **found, **dict(zip(group, combo))})) < wrong
            except Exception:  # noqa: BLE001 - a combination the config refuses
                continue
            if fixed:
                found.update(dict(zip(group, combo)))
                break
    return found if not computed_mismatch(config, plan, {**updates, **found}) else {}


def config_updates(config: Any, layout: Layout, plan: "LayerPlan") -> dict[str, Any]:
    """Every config change a plan's variant needs (`layer_config_updates`, and pattern keys set so
    that computed per-layer lists follow the plan where some values do), from a config object."""
    updates = layer_config_updates(layout, plan, config.to_dict())
    return {**updates, **repattern(config, plan, updates)}
