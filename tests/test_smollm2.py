"""The real embedded model, SmolLM2-135M-Instruct (30 Llama blocks, from its GGUF): the
cornerstone finding, function-preserving expansion, and cached generation through lm-eval."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from lm_eval.api.instance import Instance

from conftest import TASKS
from lm_eval_layers.evaluate import Evaluator
from lm_eval_layers.model import LayeredLM
from lm_eval_layers.plan import PlanSpec

pytestmark = pytest.mark.slow  # real model / subprocesses: deselected by `make test-quick`

LIMIT = 100


@pytest.fixture(scope="module")
def smollm2() -> LayeredLM:
    """With lm-eval's own `hf` loop (fast=False): the reference the fast paths are checked against."""
    return LayeredLM(pretrained="smollm2", dtype="float32", device="cpu", batch_size=32, fast=False)


def test_alias_loads_the_30_block_gguf(smollm2):
    assert smollm2.plan.num_layers == 30
    assert len(smollm2.model.model.layers) == 30


def test_dropping_block_0_collapses_accuracy_while_a_middle_block_costs_little(smollm2, local_data):
    plans = [("full", PlanSpec()), ("drop 0", PlanSpec.from_args(drop=0)), ("drop 15", PlanSpec.from_args(drop=15))]
    results = Evaluator(smollm2, ["arc_easy_local"], limit=LIMIT).evaluate_all(plans)
    acc = {r.name: r.metrics["arc_easy_local"]["acc"] for r in results}
    # Measured on validation[:200]: full 0.50, without block 0: 0.29, without block 15: 0.475.
    assert acc["full"] >= 0.40
    assert acc["drop 0"] <= 0.33  # chance is 0.25
    assert abs(acc["drop 15"] - acc["full"]) <= 0.06
    assert smollm2.plan.is_identity  # the evaluator leaves the model in its full form


def test_function_preserving_presets_reproduce_the_real_model(smollm2):
    ids = torch.tensor([smollm2.tok_encode("The capital of France is Paris, and the capital of Italy is")])
    with torch.no_grad():
        base = smollm2.model(ids).logits
        smollm2.use_plan(PlanSpec.from_args(preset="llama-pro:6"))
        expanded = smollm2.model(ids).logits
        smollm2.use_plan(PlanSpec.from_args(insert="0:avg-zero;14:avg-zero;28:copy-zero"))
        inserted = smollm2.model(ids).logits
        smollm2.use_plan(PlanSpec())
    assert len(smollm2.model.model.layers) == 30
    torch.testing.assert_close(expanded, base, atol=1e-5, rtol=0)
    torch.testing.assert_close(inserted, base, atol=1e-5, rtol=0)


def test_generate_until_with_cache_equals_uncached_generation(smollm2):
    prompt = "Question: What is the boiling point of water at sea level?\nAnswer:"
    smollm2.use_plan(PlanSpec.from_args(drop="3,20", insert="5:copy", drop_attn="10"))
    try:
        request = Instance("generate_until", {}, (prompt, {"until": ["\n\n"], "max_gen_toks": 24, "do_sample": False}), 0)
        (text,) = smollm2.generate_until([request])
        ids = torch.tensor([smollm2.tok_encode(prompt)])
        with torch.no_grad():
            out = smollm2.model.generate(ids, max_new_tokens=24, do_sample=False, use_cache=False)
        expected = smollm2.tok_decode(out[0, ids.shape[1]:].tolist()).split("\n\n")[0]
    finally:
        smollm2.use_plan(PlanSpec())
    assert text == expected and len(text) > 0


def test_pruned_gguf_checkpoint_scores_exactly_like_the_layered_variant(smollm2, local_data, tmp_path):
    """GGUF -> `surgery prune` -> `lm_eval --model hf` gives the per-sample results of
    `layered` with the same plan on the loaded model."""
    import json
    import subprocess
    import sys

    from typer.testing import CliRunner

    from surgery.cli import app

    out = tmp_path / "pruned"
    result = CliRunner().invoke(app, ["prune", "smollm2", "--drop", "24-27", "--drop-attn", "5", "--out", str(out)])
    assert result.exit_code == 0, result.output
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("lm_eval")), "--model", "hf",
         "--model_args", f"pretrained={out},dtype=float32", "--tasks", "arc_easy_local", "--include_path", str(TASKS),
         "--limit", "24", "--batch_size", "32", "--device", "cpu", "--log_samples", "--output_path", str(tmp_path / "res")],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "_name_or_path" not in json.loads((out / "config.json").read_text())  # no site-packages path
    inspected = CliRunner().invoke(app, ["inspect", "smollm2", "--json"])  # the same GGUF, opened once per process
    report = json.loads(inspected.stdout)
    assert report["stored_types"]["Q4_1"] > 0 and report["other_dtypes"] == ["float32"]
    assert 90e6 < report["stored_bytes"] < 110e6 and report["bytes"] > 5 * report["stored_bytes"]  # 98 MB file, 538 MB fp32
    (samples_file,) = (tmp_path / "res").rglob("samples_arc_easy_local_*.jsonl")
    hf = [json.loads(line) for line in samples_file.read_text().splitlines()]
    pruned = PlanSpec.from_args(drop="24-27", drop_attn=5)
    layered = Evaluator(smollm2, ["arc_easy_local"], limit=24, prepared=False).evaluate(pruned, log_samples=True)
    def loglikelihoods(samples) -> dict:  # the log file stores numbers as strings
        return {s["doc_id"]: [float(r[0][0]) for r in s["resps"]] for s in samples}

    got, expected = loglikelihoods(layered.samples["arc_easy_local"]), loglikelihoods(hf)
    assert len(got) == 24 and got.keys() == expected.keys()
    for doc_id, lls in got.items():  # another process: same batches, equal up to float rounding
        assert lls == pytest.approx(expected[doc_id], abs=1e-6)
    smollm2.prepared = True  # shared contexts: hf's numbers to float rounding, the same accuracy
    try:
        shared = Evaluator(smollm2, ["arc_easy_local"], limit=24, prepared=False).evaluate(pruned, log_samples=True)
    finally:
        smollm2.prepared = False
    for doc_id, lls in loglikelihoods(shared.samples["arc_easy_local"]).items():
        assert lls == pytest.approx(expected[doc_id], abs=1e-4)
    assert shared.metrics["arc_easy_local"]["acc"] == layered.metrics["arc_easy_local"]["acc"]


def test_ablation_ranks_an_early_cornerstone_block_first(smollm2, local_data, tmp_path):
    """Removing block 0 or 1 costs the most (the cornerstone layers); a cheap smooth metric
    shows it. Runs on prepared requests, checked against lm-eval's own loop on the same slice."""
    from lm_eval_layers.importance.scoring import score_units
    from lm_eval_layers.importance.store import Store
    from lm_eval_layers.importance.task_game import TaskGame

    fast = Evaluator(smollm2, ["arc_easy_local"], limit=20)
    slow = Evaluator(smollm2, ["arc_easy_local"], limit=20, prepared=False)
    for plan in (PlanSpec(), PlanSpec.from_args(drop=0), PlanSpec.from_args(drop=15)):
        got, expected = fast.evaluate(plan).metrics, slow.evaluate(plan).metrics
        for metric in ("acc", "acc_norm"):
            assert got["arc_easy_local"][metric] == expected["arc_easy_local"][metric]

    game = TaskGame(lambda plan: fast.evaluate(plan).examples, 30, "block", "loglik", Store(tmp_path / "s.sqlite", {"test": 1}))
    est, _, sample_se = score_units(game, "ablation", 0, "regression", 0, 3)
    ranking = list(np.argsort(-est.values))
    assert ranking[0] in (0, 1), ranking[:5]
    assert est.values[ranking[0]] > 5 * np.median(est.values)  # a cornerstone, not a close call
    assert sample_se[ranking[0]] > 0
