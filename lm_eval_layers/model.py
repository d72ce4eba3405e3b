"""`LayeredLM`: lm-eval's `hf` model with a layer plan applied in memory.

    lm_eval --model layered --model_args pretrained=MODEL,drop=24-27 --tasks ...

Everything else is lm-eval's `HFLM` (subclassed, not forked), so every `hf` argument keeps
working. Log-likelihood requests of causal models run each shared context once
(`loglikelihood.py`): the same numbers as `hf` (to float rounding), less compute; `fast=False`
gives `hf`'s own loop. The plan is resolved against the config before any weight is loaded, so a bad plan
fails in a second, not after minutes of loading.
"""

from __future__ import annotations

from typing import Any

import transformers
from tqdm import tqdm
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from lm_eval_layers.arch import check_plan, num_layers
from lm_eval_layers.default_model import resolve_alias
from lm_eval_layers.errors import UsageError
from lm_eval_layers.identity import digest, model_identity
from lm_eval_layers.loglikelihood import Request, attention_window, make_batches, run_batches
from lm_eval_layers.plan import LayerPlan, PlanSpec, plan_args
from lm_eval_layers.scores_file import load_scores
from lm_eval_layers.variant import Variant, apply_plan, clone_model


# `hf` arguments that change where or how fast a model runs, not the numbers it computes; every
# other argument (dtype, max_length, tokenizer options, peft, …) is part of a variant's identity.
_PLACEMENT_ARGS = frozenset({
    "batch_size", "max_batch_size", "device", "parallelize", "device_map", "max_memory_per_gpu",
    "max_cpu_memory", "offload_folder", "trust_remote_code",
})


def _load_config(pretrained: str, kwargs: dict[str, Any]) -> Any:
    """The model's config only (no weights), with the same loading options HFLM will use."""
    options = {
        key: kwargs[key]
        for key in ("revision", "subfolder", "gguf_file", "trust_remote_code")
        if kwargs.get(key) is not None
    }
    try:
        return transformers.AutoConfig.from_pretrained(pretrained, **options)
    except (OSError, ValueError) as e:
        raise UsageError(
            f"cannot load a model config from {pretrained!r} ({str(e).splitlines()[0][:200]}); give a folder with "
            "config.json, a .gguf file, a hub id or smollm2"
        ) from None


@register_model("layered")
class LayeredLM(HFLM):
    """An `hf` model evaluated as a variant: blocks dropped, halves removed, blocks inserted."""

    def __init__(self, pretrained: str | transformers.PreTrainedModel = "smollm2", fast: bool = True, **kwargs: Any) -> None:
        self.fast = fast if isinstance(fast, bool) else str(fast).lower() in ("1", "true", "yes")
        spec = PlanSpec.from_args(**load_scores(plan_args(kwargs)))
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
            check_plan(plan, config)  # e.g. averaged mixture-of-experts blocks: refused before loading
        self._settings = _settings(pretrained, kwargs, self.fast)
        self._cache_db: Any = None  # lm-eval's response cache, once `set_cache_hook` hands it over
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
            self.variant = apply_plan(_base_model(self._model), plan)
        self.plan = plan
        self._use_cache_table()
        return plan

    def set_cache_hook(self, cache_hook: Any) -> None:
        """lm-eval's `--use_cache` (`CachingLM`) keys each answer by the request alone, never by
        the model, so every variant of one `pretrained=` would read the others' answers. The
        cache hook it hands us holds the very SqliteDict that `CachingLM` reads and writes; we
        point it at a table of this variant's own (named by a digest of the model's files, the
        settings and the resolved plan), so variants sharing a cache path never share answers
        and a repeated variant is answered from its table. lm-eval offers no other seam: the
        wrapper is built inside `simple_evaluate` around an already created model."""
        super().set_cache_hook(cache_hook)
        self._cache_db = getattr(cache_hook, "dbdict", None)
        self._use_cache_table()

    def _use_cache_table(self) -> None:
        db = getattr(self, "_cache_db", None)
        if db is None:
            return
        from sqlitedict import SqliteDict

        table = "layered-" + digest({**self._settings, "plan": self.plan.to_dict()})
        SqliteDict(db.filename, tablename=table, autocommit=True).close()  # creates the table
        db.tablename = table

    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, override_bs: int | None = None) -> list[tuple[float, bool]]:
        """Shared contexts computed once (causal models); `hf`'s loop otherwise or with fast=False."""
        if not self.fast or self.backend != "causal":
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        reqs = [Request.from_tokens(ctx, cont, self.max_length) for _, ctx, cont in requests]
        rows = override_bs or (self.batch_size if isinstance(self.batch_size, int) else self.max_batch_size)
        batches = make_batches(reqs, rows, window=attention_window(self.model.config))
        bar = tqdm(total=len(reqs), disable=disable_tqdm or self.rank != 0, desc="Running loglikelihood requests")
        results = run_batches(self.model, batches, len(reqs), self.softmax_dtype, progress=bar.update)
        bar.close()
        for (key, _, _), answer in zip(requests, results):
            if key is not None:  # rolling windows are cached per document by loglikelihood_rolling
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return results


def _base_model(model: Any) -> Any:
    """The transformers model a plan acts on: a PEFT model's base model (adapters stay in its
    blocks' linear layers, so dropped blocks take their adapters with them)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _settings(pretrained: Any, kwargs: dict[str, Any], fast: bool) -> dict[str, Any]:
    """Everything besides the plan that decides this model's log-likelihoods."""
    if isinstance(pretrained, transformers.PreTrainedModel):
        pretrained = pretrained.name_or_path
    settings = {k: v for k, v in kwargs.items() if k not in _PLACEMENT_ARGS}
    model = model_identity(str(pretrained), kwargs.get("revision"), kwargs.get("subfolder"), kwargs.get("gguf_file"))
    adapter = model_identity(str(kwargs["peft"]), kwargs.get("revision")) if kwargs.get("peft") else None
    return {**settings, "model": model, "peft": adapter, "fast": fast}
