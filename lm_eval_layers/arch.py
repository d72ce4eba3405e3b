"""Per-architecture facts, as data: where the decoder blocks live, the attribute names of their
attention and MLP branches, the branches' output projections, and the config fields that count
or describe layers.

Adding a family is one `Layout` line in `ARCHITECTURES`. A model whose `model_type` is not listed
still works when one of the known layouts matches its module tree (most Llama-style models do).
Mixture-of-experts blocks are dropped, copied and zeroed like dense ones (every expert's output
projection is an output projection) but never averaged: two blocks' experts do not correspond.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import nn

from lm_eval_layers.errors import PlanError, UnsupportedArchitecture

if TYPE_CHECKING:
    from lm_eval_layers.plan import LayerPlan


COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")  # the names transformers configs count blocks by


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
    attn_out: str  # the attention branch's output projection
    mlp_out: tuple[str, ...]  # every tensor through which the MLP branch writes the residual stream
    layer_count: str = "num_hidden_layers"  # config.json key counting the blocks
    per_layer: tuple[str, ...] = ("layer_types",)  # config lists with one entry per block
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
        patterns = ((self.attn_out,) if attn else ()) + (self.mlp_out if mlp else ())
        return any(_pattern(p).match(name) for p in patterns)

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

    def matches(self, model: nn.Module) -> bool:
        blocks = self.find_blocks(model)
        if blocks is None or len(blocks) == 0:
            return False
        block = blocks[0]
        modules = dict(block.named_modules())
        tensors = [name for name, _ in block.named_parameters()]
        return (
            all(m in modules for m in (self.attn, self.mlp) if m)
            and any(self.is_output(t, mlp=False) for t in tensors)
            and any(self.is_output(t, attn=False) for t in tensors)
        )


@functools.lru_cache(maxsize=None)
def _pattern(pattern: str) -> re.Pattern[str]:
    return re.compile(re.escape(pattern).replace(r"\*", r"\d+") + r"(\..+)?$")


LLAMA_LIKE = Layout("model.layers", "self_attn", "mlp", "self_attn.o_proj", ("mlp.down_proj",))
STARCODER2 = Layout("model.layers", "self_attn", "mlp", "self_attn.o_proj", ("mlp.c_proj",))
# Mixture-of-experts MLPs: fused experts in memory, one tensor per expert in hub checkpoints, a
# shared expert (Qwen2-MoE), and dense MLPs in the blocks a Qwen-MoE config lists as mlp_only.
MOE = Layout(
    "model.layers", "self_attn", "mlp", "self_attn.o_proj",
    ("mlp.experts.down_proj", "mlp.experts.*.down_proj", "mlp.shared_expert.down_proj", "mlp.down_proj"),
    experts=True, dense_blocks="mlp_only_layers",
)
MIXTRAL = Layout(  # hub checkpoints name the MLP block_sparse_moe and the experts' projections w1/w2/w3
    "model.layers", "self_attn", "mlp", "self_attn.o_proj",
    ("mlp.experts.down_proj", "block_sparse_moe.experts.*.w2"), experts=True,
)
GPT2 = Layout("transformer.h", "attn", "mlp", "attn.c_proj", ("mlp.c_proj",), layer_count="n_layer", conv1d=True)
GPT_NEOX = Layout("gpt_neox.layers", "attention", "mlp", "attention.dense", ("mlp.dense_4h_to_h",))
FALCON = Layout("transformer.h", "self_attention", "mlp", "self_attention.dense", ("mlp.dense_4h_to_h",))
BLOOM = Layout(
    "transformer.h", "self_attention", "mlp", "self_attention.dense", ("mlp.dense_4h_to_h",),
    layer_count="n_layer", residual_inside=True,
)
OPT = Layout("model.decoder.layers", "self_attn", None, "self_attn.out_proj", ("fc2",))

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
_KNOWN_LAYOUTS = tuple(dict.fromkeys(ARCHITECTURES.values()))


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


def check_plan(plan: "LayerPlan", config: Any) -> None:
    """Refuse a plan the config's family cannot build, from the config alone (no weights)."""
    layout = ARCHITECTURES.get(getattr(text_config(config), "model_type", None))
    if layout is not None:
        layout.check(plan)


def layout_for(model: nn.Module) -> Layout:
    """The layout of a loaded model: by model_type, else the first known layout that fits."""
    model_type = getattr(text_config(model.config), "model_type", None)
    layout = ARCHITECTURES.get(model_type)
    if layout is not None and layout.matches(model):
        return layout
    for candidate in _KNOWN_LAYOUTS:
        if candidate.matches(model):
            return candidate
    raise UnsupportedArchitecture(
        f"architecture {model_type!r} ({type(model).__name__}) is not supported: its decoder blocks, "
        "attention/MLP branches or output projections are not where any known layout puts them; add a "
        f"Layout for {model_type!r} to ARCHITECTURES in lm_eval_layers/arch.py"
    )


def layer_config_updates(layout: Layout, plan: "LayerPlan", values: dict[str, Any]) -> dict[str, Any]:
    """New values of every config field that counts or describes layers, for a plan's variant.

    `values` are the original text-config fields (a config.json dict or a config's attributes);
    used for the in-memory variant and for the config.json that `surgery` writes, so both agree.
    """
    count_key = next((key for key in layout.count_keys if key in values), layout.layer_count)
    updates: dict[str, Any] = {count_key: len(plan.slots)}
    for key in layout.per_layer:
        per_layer = values.get(key)
        if isinstance(per_layer, (list, tuple)) and len(per_layer) == plan.num_layers:
            updates[key] = [per_layer[slot.source] for slot in plan.slots]
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
