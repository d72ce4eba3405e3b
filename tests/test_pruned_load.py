"""The plugin loads only the blocks a drop plan keeps (lm_eval_layers/pruned_load.py): the same
numbers as the whole model with the plan applied in memory, the parameters of the pruned model
only, nothing left on disk, and no silent switch to a plan whose blocks were never loaded."""

from __future__ import annotations

import tempfile

import pytest
import torch
from lm_eval.api.instance import Instance

from lm_eval_layers.errors import PlanError
from lm_eval_layers.model import LayeredLM
from lm_eval_layers.plan import PlanSpec

pytestmark = pytest.mark.usefixtures("no_grad")

REQUESTS = [Instance("loglikelihood", {}, ("The capital of France is", " Paris"), idx=0),
            Instance("loglikelihood", {}, ("One, two, three,", " four"), idx=1),
            Instance("loglikelihood", {}, ("", " Hello there"), idx=2)]


def _lm(folder, **args) -> LayeredLM:
    return LayeredLM(pretrained=str(folder), dtype="float32", device="cpu", batch_size=2, **args)


def test_a_drop_plan_loads_only_the_kept_blocks_and_gives_the_in_memory_numbers(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the kept blocks are written
    pruned = _lm(tiny_llama_dir, drop="1-2")
    whole = _lm(tiny_llama_dir, drop="1-2", keep_base=True)
    assert pruned.pruned_on_load and not whole.pruned_on_load
    assert len(pruned.model.model.layers) == len(whole.model.model.layers) == 4
    per_block = sum(p.numel() for p in whole.model.model.layers[0].parameters())
    assert sum(p.numel() for p in pruned.model.parameters()) == sum(p.numel() for p in whole.model.parameters())
    base = _lm(tiny_llama_dir)
    assert sum(p.numel() for p in base.model.parameters()) - sum(p.numel() for p in pruned.model.parameters()) == 2 * per_block
    got, expected = pruned.loglikelihood(REQUESTS, disable_tqdm=True), whole.loglikelihood(REQUESTS, disable_tqdm=True)
    assert torch.allclose(torch.tensor([g[0] for g in got]), torch.tensor([e[0] for e in expected]), atol=1e-6, rtol=0)
    assert [g[0] for g in got] != [b[0] for b in base.loglikelihood(REQUESTS, disable_tqdm=True)]
    assert list(tmp_path.iterdir()) == []  # the temporary folder is gone once the weights are loaded


def test_a_model_loaded_pruned_refuses_to_switch_plans(tiny_llama_dir):
    lm = _lm(tiny_llama_dir, drop="4")
    assert lm.use_plan(PlanSpec.from_args(drop="4")) == lm.plan  # the plan it was loaded with
    with pytest.raises(PlanError, match="keep_base=True"):
        lm.use_plan(PlanSpec.from_args(drop="3"))


def test_plans_that_add_or_change_blocks_load_the_whole_model(tiny_llama_dir):
    assert not _lm(tiny_llama_dir, insert="2:copy-zero").pruned_on_load
    assert not _lm(tiny_llama_dir, drop_attn="2").pruned_on_load
