"""The fast repeated-evaluation path gives lm-eval's numbers: per-request log-likelihoods within
1e-4 of the `hf` path and identical acc / acc_norm, for the full model and several variants, on
every log-likelihood task of the suite; and it reuses the full model's prefix."""

from __future__ import annotations

import pytest
from lm_eval.tasks import TaskManager

from conftest import DATA, TASKS
from lm_eval_layers.evaluate import evaluate_plans
from lm_eval_layers.fast import FastEvaluator, PreparedTasks, UnsupportedTask
from lm_eval_layers.model import LayeredLM
from lm_eval_layers.plan import PlanSpec

SUITE = ["arc_easy_local", "arc_challenge_local", "piqa_local", "boolq_local", "winogrande_local",
         "openbookqa_local", "sciq_local", "copa_local", "lambada_openai_local"]
PLANS = [{}, {"drop": "1;3"}, {"drop": 0}, {"insert": "2:avg", "drop_attn": 0}, {"drop_mlp": 5, "preset": "llama-pro:2"}]


@pytest.fixture(scope="module")
def setup(tiny_llama_dir):
    lm = LayeredLM(pretrained=str(tiny_llama_dir), dtype="float32", device="cpu", batch_size=16)
    return lm, TaskManager(include_path=str(TASKS))


@pytest.fixture(scope="module")
def fast(setup):
    lm, manager = setup
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LM_EVAL_LAYERS_DATA", str(DATA))
        yield FastEvaluator(lm, PreparedTasks(lm, SUITE, manager, limit=4))


@pytest.mark.parametrize("kwargs", PLANS, ids=[str(p) for p in PLANS])
def test_fast_path_matches_lm_eval(setup, fast, kwargs, local_data):
    lm, manager = setup
    plan = PlanSpec.from_args(**kwargs).resolve(6)
    metrics, examples = fast.evaluate(plan)
    slow = evaluate_plans(lm, [("x", plan)], SUITE, manager, limit=4, log_samples=True)[0]
    fast_ll = {(r.task, r.doc_id, r.idx): ll for r, (ll, _) in zip(fast.prepared.requests, fast.loglikelihoods(plan))}
    for task in SUITE:
        samples = sorted(slow.samples[task], key=lambda s: s["doc_id"])
        for s in samples:
            for idx, resp in enumerate(s["filtered_resps"]):
                assert fast_ll[(task, s["doc_id"], idx)] == pytest.approx(float(resp[0]), abs=1e-4)
        for metric in ("acc", "acc_norm"):
            if metric in samples[0]:
                assert examples[task][metric] == [s[metric] for s in samples], (task, metric)
                assert metrics[task][metric] == pytest.approx(slow.metrics[task][f"{metric},none"])


def test_prefix_reuse_runs_only_the_blocks_after_the_first_change(fast):
    fast.evaluate(PlanSpec.from_args(drop=4).resolve(6))
    assert fast.blocks_run == 1  # block 5 only: blocks 0-3 come from the cached boundary
    fast.evaluate(PlanSpec.from_args(drop=0).resolve(6))
    assert fast.blocks_run == 5
    fast.evaluate(PlanSpec.from_args(insert="3:copy").resolve(6))
    assert fast.blocks_run == 3  # copy(3), 4, 5
    fast.evaluate(PlanSpec().resolve(6))
    assert fast.blocks_run == 0  # the full model's results are kept


def test_rolling_tasks_are_refused_clearly(setup, local_data):
    lm, manager = setup
    with pytest.raises(UnsupportedTask, match="wikitext_local is loglikelihood_rolling"):
        PreparedTasks(lm, ["wikitext_local"], manager, limit=1)
