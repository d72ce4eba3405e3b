"""`layered`'s generation path (`generate_until`) on the shipped nq_open_local task: a plan
applied in memory generates, greedily and token for token, what `hf` generates on the checkpoint
`surgery prune` writes for the same plan; and `Evaluator` scores a generation task through
lm-eval's own loop (prepared requests are for log-likelihoods)."""

from __future__ import annotations

from pathlib import Path

import lm_eval
import pytest
import torch
import transformers as T
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from typer.testing import CliRunner

from conftest import TASKS
from lm_eval_layers.evaluate import Evaluator
from lm_eval_layers.model import LayeredLM
from lm_eval_layers.plan import PlanSpec
from surgery.cli import app

# drop_attn: a removed attention branch keeps a placeholder in the KV cache, which generation reads back
PLAN = {"drop": "1;3", "drop_attn": "4"}
LIMIT = 5
SHORT = "max_gen_toks=8"  # a few greedy tokens each: seconds, not minutes


@pytest.fixture(scope="module")
def manager() -> TaskManager:
    return TaskManager(include_path=str(TASKS))


@pytest.fixture(scope="module")
def model_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    """The tiny Llama with weights ten times the default init: its greedy generations depend on
    the prompt and on every block (at the default init every prompt generates `::::::::`); with
    room for the task's own 256 new tokens."""
    config = T.AutoConfig.from_pretrained(tiny_llama_dir)
    config.initializer_range, config.max_position_embeddings = 0.2, 512
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("generating")
    T.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(out)
    T.AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def layered(model_dir) -> LayeredLM:
    return LayeredLM(pretrained=str(model_dir), dtype="float32", device="cpu", batch_size=4, **PLAN)


@pytest.fixture(scope="module")
def pruned(model_dir, tmp_path_factory) -> HFLM:
    """`hf` on the folder `surgery prune` writes for PLAN."""
    out = tmp_path_factory.mktemp("pruned") / "model"
    result = CliRunner().invoke(app, ["prune", str(model_dir), "--drop", PLAN["drop"], "--drop-attn", PLAN["drop_attn"],
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    return HFLM(pretrained=str(out), dtype="float32", device="cpu", batch_size=4)


def generate(lm: HFLM, manager: TaskManager) -> tuple[list[str], float]:
    """Each document's generation (before the task's filters) and the task's exact match."""
    out = lm_eval.simple_evaluate(model=lm, tasks=["nq_open_local"], limit=LIMIT, gen_kwargs=SHORT, task_manager=manager,
                                  log_samples=True, bootstrap_iters=0)
    samples = sorted(out["samples"]["nq_open_local"], key=lambda s: s["doc_id"])
    assert [s["doc_id"] for s in samples] == list(range(LIMIT))
    return [s["resps"][0][0] for s in samples], out["results"]["nq_open_local"]["exact_match,remove_whitespace"]


def test_layered_generates_what_hf_generates_on_the_pruned_checkpoint(layered, pruned, manager, local_data):
    layered.use_plan(PlanSpec.from_args(**PLAN))
    texts, score = generate(layered, manager)
    expected, expected_score = generate(pruned, manager)
    assert texts == expected and score == expected_score
    assert len(set(texts)) > 1 and all(t.strip() for t in texts)  # real, prompt-dependent generations
    layered.use_plan(PlanSpec())
    full, _ = generate(layered, manager)
    assert full != texts  # the plan changes what is generated: the comparison above could fail


@pytest.mark.slow  # the task's own 256-token budget: about 20 s for two documents
def test_evaluator_scores_generation_through_lm_eval_loop(layered, manager, local_data):
    evaluator = Evaluator(layered, ["nq_open_local"], manager, limit=2)
    assert evaluator.engine is None and "nq_open_local is generate_until" in evaluator.fallback
    result = evaluator.evaluate(PlanSpec.from_args(**PLAN))
    column = result.examples["nq_open_local"]["exact_match"]
    assert len(column) == 2 and set(column) <= {0.0, 1.0}
    assert result.metrics["nq_open_local"]["exact_match,remove_whitespace"] == sum(column) / 2
    assert layered.plan.is_identity  # left in its full form
