"""`LayeredLM`: lm-eval's `hf` model with a layer plan applied in memory.

    lm_eval --model layered --model_args pretrained=MODEL,drop=24-27 --tasks ...

Everything else is lm-eval's `HFLM` (subclassed, not forked), so every `hf` argument keeps
working. Log-likelihood requests of causal models run as prepared requests (`loglikelihood.py`:
each shared context once), the same numbers as `hf` to float rounding with less compute;
`fast=False` (the user-facing switch) gives `hf`'s own loop. The arguments and the plan are checked
against the config before any weight is loaded, so a misspelt key or a bad plan fails in a
second, not after minutes of loading; under lm-eval's console script it is one `error:` line.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import inspect
import logging
import sys
from typing import Any, Iterator

import torch
import transformers
from tqdm import tqdm
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from lm_eval_layers.compat.harness import ScoringSeam, cli_tasks, under_lm_eval_cli, use_cache_table
from lm_eval_layers.compat.loading import loading_options

from lm_eval_layers.arch import check_plan, num_layers
from lm_eval_layers.twin import twin_problem
from lm_eval_layers.default_model import resolve_alias
from lm_eval_layers.errors import LayersError, PlanError, UsageError
from lm_eval_layers.identity import digest, model_identity
from lm_eval_layers.loglikelihood import Request, attention_window, make_batches, run_batches
from lm_eval_layers.plan import LayerPlan, PlanSpec, plan_args
from lm_eval_layers.pruned_load import loads_pruned, pruned_folder
from lm_eval_layers.scores_file import load_scores
from lm_eval_layers.task_data import check_sources
from lm_eval_layers.task_suite import shipped_data_names
from lm_eval_layers.variant import Variant, apply_plan, clone_model


_LOG = logging.getLogger("lm_eval.layered")  # under lm-eval's logger: shown with its own lines, at its level

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
class LayeredLM(ScoringSeam):
    """An `hf` model evaluated as a variant: blocks dropped, halves removed, blocks inserted."""

    def __init__(self, pretrained: str | transformers.PreTrainedModel = "smollm2", fast: bool | str = True,
                 keep_base: bool | str = False, **kwargs: Any) -> None:
        with _one_line_under_lm_eval_cli():
            self.prepared = _switch("fast", fast)  # prepared requests for log-likelihoods, or hf's own loop
            keep_base = _switch("keep_base", keep_base)  # hold the whole model, to switch plans with use_plan
            check_sources(shipped_data_names(cli_tasks()))  # the shipped tasks' data, before the model loads
            spec = PlanSpec.from_args(**load_scores(plan_args(kwargs)))
            _check_dtypes(kwargs)
            pretrained, gguf_file = resolve_alias(pretrained, kwargs.pop("gguf_file", None))
            if gguf_file is not None:
                kwargs["gguf_file"] = gguf_file
            config = pretrained.config if isinstance(pretrained, transformers.PreTrainedModel) else _load_config(pretrained, kwargs)
            _check_names(kwargs, config)
            plan = spec.resolve(num_layers(config), config.model_type)
            check_plan(plan, config)  # e.g. averaged mixture-of-experts blocks: refused before loading
            problem, _ = twin_problem(config, plan)  # the identity probe on a narrow random twin, before loading
            if problem:
                raise PlanError(problem)
            if isinstance(pretrained, transformers.PreTrainedModel) and not plan.is_identity:
                pretrained = clone_model(pretrained)  # the caller's model is left untouched
            if not plan.is_identity:  # say what is evaluated: a plan file or a scores file names no blocks
                _LOG.info("layered plan: %s", plan.describe())
            self._settings = _settings(pretrained, kwargs, self.prepared)
            self.pruned_on_load = loads_pruned(pretrained, plan, kwargs, keep_base)
            self.plan: LayerPlan = LayerPlan.identity(plan.num_layers)
            self.variant: Variant | None = None
            if self.pruned_on_load:  # the dropped blocks are never loaded
                with pruned_folder(pretrained, kwargs.pop("gguf_file", None), plan, kwargs.get("dtype")) as folder:
                    super().__init__(pretrained=str(folder), **kwargs)
                self.plan = plan
                self._use_cache_table()
            else:
                super().__init__(pretrained=pretrained, **kwargs)
                self.use_plan(plan)

    def use_plan(self, plan: LayerPlan | PlanSpec) -> LayerPlan:
        """Switch this loaded model to another variant in place (no reload, no weight copies)."""
        if isinstance(plan, PlanSpec):
            plan = plan.resolve(self.plan.num_layers)
        if self.pruned_on_load:
            if plan != self.plan:
                raise PlanError(f"this model was loaded without the blocks its plan ({self.plan.describe()}) removes; "
                                "give keep_base=True to switch plans with use_plan")
            return plan
        if self.variant is not None:
            self.variant.restore()
            self.variant = None
        if not plan.is_identity:
            base = _base_model(self.model)
            self.variant = apply_plan(base, plan, self._repaired_tensors(base, plan))
        self.plan = plan
        self._use_cache_table()
        return plan

    def _repaired_tensors(self, base: Any, plan: LayerPlan) -> dict[int, dict[str, torch.Tensor]] | None:
        """A repaired plan's folded projections: fitted on the unpruned model (once per model,
        settings and plan: the fit is cached on disk), then owned by the variant."""
        if plan.repair is None:
            return None
        from lm_eval_layers.repair.fit import fit_repair

        with _one_line_under_lm_eval_cli():
            fit = fit_repair(base, self.tokenizer, plan, identity=self._settings)
        return fit.tensors(base, plan)

    def set_cache_hook(self, cache_hook: Any) -> None:
        """lm-eval's `--use_cache` (`CachingLM`) keys each answer by the request alone, never by
        the model, so every variant of one `pretrained=` would read the others' answers. The
        cache hook it hands us holds the very SqliteDict that `CachingLM` reads and writes; we
        point it at a table of this variant's own (named by a digest of the model's files, the
        settings and the resolved plan), so variants sharing a cache path never share answers
        and a repeated variant is answered from its table. lm-eval offers no other seam: the
        wrapper is built inside `simple_evaluate` around an already created model."""
        super().set_cache_hook(cache_hook)
        self._use_cache_table()

    def _use_cache_table(self) -> None:
        if getattr(self, "cache_hook", None) is not None:  # set by lm-eval's LM.__init__, after our first use_plan
            use_cache_table(self.cache_hook, "layered-" + digest({**self._settings, "plan": self.plan.to_dict()}))

    def score_tokens(self, requests: list, disable_tqdm: bool = False, override_bs: int | None = None) -> list[tuple[float, bool]]:
        """Prepared requests, each shared context computed once (causal models); `hf`'s loop
        otherwise or with fast=False."""
        if not self.prepared or self.backend != "causal":
            return self.hf_score_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
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


def _settings(pretrained: Any, kwargs: dict[str, Any], prepared: bool) -> dict[str, Any]:
    """Everything besides the plan that decides this model's log-likelihoods."""
    if isinstance(pretrained, transformers.PreTrainedModel):
        pretrained = pretrained.name_or_path
    settings = {k: v for k, v in kwargs.items() if k not in _PLACEMENT_ARGS}
    model = model_identity(str(pretrained), kwargs.get("revision"), kwargs.get("subfolder"), kwargs.get("gguf_file"))
    adapter = model_identity(str(kwargs["peft"]), kwargs.get("revision")) if kwargs.get("peft") else None
    return {**settings, "model": model, "peft": adapter, "prepared": prepared}


# -- argument checks: every key and value named by the plugin itself, before any weight is read --

_DTYPE_ARGS = ("dtype", "softmax_dtype", "mixed_precision_dtype")
_TRUE, _FALSE = ("true", "yes", "1"), ("false", "no", "0")


def _switch(name: str, value: Any) -> bool:
    """A boolean model_arg (lm-eval's parser turns `True`/`False` into bools, `1`/`0` into ints)."""
    text = str(value).strip().strip("'\"").lower()
    if isinstance(value, bool) or text in _TRUE + _FALSE:
        return value if isinstance(value, bool) else text in _TRUE
    raise UsageError(f"{name}={value!r} is not a switch; use {name}=True or {name}=False")


def _check_dtypes(kwargs: dict[str, Any]) -> None:
    """`hf` would fail with an AttributeError from torch after start-up (`dtype=float8`)."""
    for name in _DTYPE_ARGS:
        value = kwargs.get(name)
        if value is None or isinstance(value, torch.dtype) or value == "auto":
            continue
        if not isinstance(getattr(torch, str(value), None), torch.dtype):
            raise UsageError(f"{name}={value}: not a torch dtype; use auto, float32, bfloat16 or float16")


def _named_parameters(function: Any) -> set[str]:
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {name for name, p in inspect.signature(function).parameters.items() if p.kind in kinds}


@functools.cache
def _hf_arguments() -> frozenset[str]:
    """The arguments of lm-eval's `hf` model (its signature)."""
    return frozenset(_named_parameters(HFLM.__init__) - {"self"})


def _check_names(kwargs: dict[str, Any], config: Any) -> None:
    """Every key is a plan argument (taken out already), an `hf` argument, a transformers loading
    option or a config field to override; anything else (`dorp=24-27`) is named here, with the
    nearest known key, instead of failing inside transformers with a TypeError."""
    known = _hf_arguments() | loading_options()
    for key in kwargs:
        if key in known or hasattr(config, key):
            continue
        public = [k for k in sorted(known) if not k.startswith("_")]
        near = difflib.get_close_matches(key, [*PlanSpec.ARGS, "fast", "keep_base", *public], n=1, cutoff=0.6)
        hint = (f"did you mean {near[0]}?" if near else
                f"give a plan argument ({', '.join(PlanSpec.ARGS)}), an hf argument (dtype, device, batch_size, …) "
                "or a transformers loading option (attn_implementation, …)")
        raise UsageError(f"{key}: unknown argument of the layered model; {hint}")


@contextlib.contextmanager
def _one_line_under_lm_eval_cli() -> Iterator[None]:
    """lm-eval's console script shows every exception as a traceback; a user's mistake is one
    `error:` line and exit code 2 there, as in `surgery`. Python callers (`simple_evaluate`, a
    notebook) still get the `LayersError`."""
    try:
        yield
    except LayersError as e:
        if not under_lm_eval_cli():
            raise
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        raise SystemExit(2) from None
