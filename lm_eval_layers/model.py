"""`LayeredLM`: lm-eval's `hf` model with a layer plan applied in memory.

    lm_eval --model layered --model_args pretrained=MODEL,drop=24-27 --tasks ...

Everything else is lm-eval's `HFLM` (subclassed, not forked), so every `hf` argument keeps
working. The plan is resolved against the config before any weight is loaded, so a bad plan
fails in a second, not after minutes of loading.
"""

from __future__ import annotations

from typing import Any

import transformers
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from lm_eval_layers.arch import num_layers
from lm_eval_layers.default_model import resolve_alias
from lm_eval_layers.plan import LayerPlan, PlanSpec, plan_args
from lm_eval_layers.variant import Variant, apply_plan, clone_model


def _load_config(pretrained: str, kwargs: dict[str, Any]) -> Any:
    """The model's config only (no weights), with the same loading options HFLM will use."""
    options = {
        key: kwargs[key]
        for key in ("revision", "subfolder", "gguf_file", "trust_remote_code")
        if kwargs.get(key) is not None
    }
    return transformers.AutoConfig.from_pretrained(pretrained, **options)


@register_model("layered")
class LayeredLM(HFLM):
    """An `hf` model evaluated as a variant: blocks dropped, halves removed, blocks inserted."""

    def __init__(self, pretrained: str | transformers.PreTrainedModel = "smollm2", **kwargs: Any) -> None:
        spec = PlanSpec.from_args(**plan_args(kwargs))
        pretrained, gguf_file = resolve_alias(pretrained, kwargs.pop("gguf_file", None))
        if gguf_file is not None:
            kwargs["gguf_file"] = gguf_file
        if isinstance(pretrained, transformers.PreTrainedModel):
            # Leave the caller's model untouched: the variant lives on a clone sharing its weights.
            plan = spec.resolve(num_layers(pretrained.config), pretrained.config.model_type)
            if not plan.is_identity:
                pretrained = clone_model(pretrained)
        else:
            config = _load_config(pretrained, kwargs)
            plan = spec.resolve(num_layers(config), config.model_type)
        super().__init__(pretrained=pretrained, **kwargs)
        self.plan: LayerPlan = LayerPlan.identity(plan.num_layers)
        self.variant: Variant | None = None
        self.use_plan(plan)

    def use_plan(self, plan: LayerPlan | PlanSpec) -> LayerPlan:
        """Switch this loaded model to another variant in place (no reload, no weight copies)."""
        if isinstance(plan, PlanSpec):
            plan = plan.resolve(self.plan.num_layers)
        if self.variant is not None:
            self.variant.restore()
            self.variant = None
        if not plan.is_identity:
            self.variant = apply_plan(self._model, plan)
        self.plan = plan
        return plan
