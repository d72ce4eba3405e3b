"""Per-architecture facts, as data: where the decoder blocks live, the attribute names of their
attention and MLP branches, the branches' output projections, and the config fields that count
or describe layers.

Adding a family is one `Layout` line in `ARCHITECTURES`. A model whose `model_type` is not listed
still works when one of the known layouts matches its module tree (most Llama-style models do).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import nn

from lm_eval_layers.errors import UnsupportedArchitecture

if TYPE_CHECKING:
    from lm_eval_layers.plan import LayerPlan


@dataclass(frozen=True)
class Layout:
    """Where the parts of a decoder stack live, relative to the *ForCausalLM module."""

    blocks: str  # dotted path to the nn.ModuleList of decoder blocks
    attn: str  # attribute of a block holding the attention branch
    mlp: str | None  # attribute holding the MLP branch (None: not a submodule, e.g. OPT)
    attn_out: str  # the attention branch's output projection, relative to a block
    mlp_out: str  # the MLP branch's output projection, relative to a block
    layer_count: str = "num_hidden_layers"  # config.json key counting the blocks
    per_layer: tuple[str, ...] = ("layer_types",)  # config lists with one entry per block
    residual_inside: bool = False  # branches add the residual themselves: branch(x, residual)

    @property
    def out_projections(self) -> tuple[str, str]:
        """The modules that write into the residual stream (zeroed by `*-zero` inserts)."""
        return self.attn_out, self.mlp_out

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
        names = dict(block.named_modules())
        wanted = [self.attn, *self.out_projections] + ([self.mlp] if self.mlp else [])
        return all(w in names for w in wanted)


LLAMA_LIKE = Layout("model.layers", "self_attn", "mlp", "self_attn.o_proj", "mlp.down_proj")
GPT2 = Layout("transformer.h", "attn", "mlp", "attn.c_proj", "mlp.c_proj", layer_count="n_layer")
GPT_NEOX = Layout("gpt_neox.layers", "attention", "mlp", "attention.dense", "mlp.dense_4h_to_h")
FALCON = Layout("transformer.h", "self_attention", "mlp", "self_attention.dense", "mlp.dense_4h_to_h")
BLOOM = Layout(
    "transformer.h", "self_attention", "mlp", "self_attention.dense", "mlp.dense_4h_to_h",
    layer_count="n_layer", residual_inside=True,
)
OPT = Layout("model.decoder.layers", "self_attn", None, "self_attn.out_proj", "fc2")

ARCHITECTURES: dict[str, Layout] = {
    **{
        name: LLAMA_LIKE
        for name in (
            "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3",
            "olmo", "olmo2", "granite", "smollm3", "cohere", "glm", "helium", "stablelm",
        )
    },
    "gpt2": GPT2,
    "gpt_neox": GPT_NEOX,
    "falcon": FALCON,
    "bloom": BLOOM,
    "opt": OPT,
}
_KNOWN_LAYOUTS = tuple(dict.fromkeys(ARCHITECTURES.values()))


def text_config(config: Any) -> Any:
    """The decoder's config (multimodal models nest it)."""
    getter = getattr(config, "get_text_config", None)
    return getter(decoder=True) if getter else config


def num_layers(config: Any) -> int:
    """Depth of the decoder stack, from a config object or a config.json dict (no weights)."""
    if isinstance(config, dict):
        values = config.get("text_config", config) if not _count(config) else config
    else:
        values = vars(text_config(config))
    count = _count(values)
    if count is None:
        raise UnsupportedArchitecture(
            f"cannot tell how many blocks the model has (no num_hidden_layers / n_layer / num_layers in its config); "
            "add its layer-count key to a Layout in lm_eval_layers/arch.py"
        )
    return count


def _count(values: dict[str, Any]) -> int | None:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(values.get(key), int):
            return values[key]
    return None


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
    count_keys = (layout.layer_count, "num_hidden_layers", "n_layer", "num_layers")
    count_key = next((key for key in count_keys if key in values), layout.layer_count)
    updates: dict[str, Any] = {count_key: len(plan.slots)}
    for key in layout.per_layer:
        per_layer = values.get(key)
        if isinstance(per_layer, (list, tuple)) and len(per_layer) == plan.num_layers:
            updates[key] = [per_layer[slot.source] for slot in plan.slots]
    window_layers = values.get("max_window_layers")
    if isinstance(window_layers, int) and not isinstance(window_layers, bool):
        # Qwen2: blocks below max_window_layers use full attention; count them in the new stack.
        updates["max_window_layers"] = sum(1 for slot in plan.slots if slot.source < window_layers)
    return updates
