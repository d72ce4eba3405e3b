"""Layer importance on real (tiny) models through real lm-eval: exact Shapley values equal the
definition, resume after a kill gives the values of an uninterrupted run, Shapley-scored
variants in the plugin and in `surgery prune`."""

from __future__ import annotations

import itertools
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as T
from typer.testing import CliRunner

from conftest import DATA, TASKS, _SMALL
from lm_eval_layers.importance.games import key
from lm_eval_layers.columns import example_columns, gold_index, value_of
from lm_eval_layers.importance.task_game import coalition_plan
from lm_eval_layers.model import LayeredLM
from lm_eval_layers.plan import PlanError, PlanSpec
from lm_eval_layers.scores_file import Scores, read_scores
from surgery.cli import app

SURGERY = str(Path(sys.executable).with_name("surgery"))


@pytest.fixture(scope="module")
def tiny4(tmp_path_factory, tokenizer_dir) -> Path:
    """A 4-block random Llama with a real tokenizer: 16 coalitions, cheap enough for exact."""
    tok = T.AutoTokenizer.from_pretrained(tokenizer_dir)
    config = T.LlamaConfig(**{**_SMALL, "vocab_size": len(tok), "num_hidden_layers": 4}, tie_word_embeddings=True)
    torch.manual_seed(1)
    out = tmp_path_factory.mktemp("tiny4")
    T.AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def score_args(model: Path, out: Path, *extra: str) -> list[str]:
    return ["score", str(model), "--tasks", "arc_easy_local", "--include-path", str(TASKS), "--limit", "3",
            "--metric", "loglik", "--out", str(out), *extra]


def stored_values(sqlite_path: Path, metric: str) -> dict[int, float]:
    with sqlite3.connect(sqlite_path) as db:
        return {int(c, 16): value_of(json.loads(s), metric) for c, s in db.execute("SELECT coalition, scores FROM coalitions")}


def test_coalition_plans():
    plan = coalition_plan(np.array([1, 0, 1, 0], bool), "block", 4)
    assert plan.dropped == (1, 3)
    empty = coalition_plan(np.zeros(4, bool), "block", 4)  # v(∅): every branch removed, nothing dropped
    assert len(empty.slots) == 4 and all(s.drop_attn and s.drop_mlp for s in empty.slots)
    halves = coalition_plan(np.array([0, 1, 0, 0, 1, 1], bool), "attn", 3)  # attn0 mlp0 attn1 mlp1 attn2 mlp2
    assert halves.dropped == (1,)
    assert [(s.source, s.drop_attn, s.drop_mlp) for s in halves.slots] == [(0, True, False), (2, False, False)]


def test_example_columns_of_a_real_document(local_data):
    from lm_eval_layers.task_suite import load_tasks, task_manager

    task = load_tasks(task_manager(), ["arc_easy_local"])["arc_easy_local"]
    doc = next(iter(task.test_docs()))  # "Which factor will most likely cause a person to develop a fever?"
    gold, choices = gold_index(task, doc), len(task.doc_to_choice(doc))
    assert gold == doc["choices"]["label"].index(doc["answerKey"]) and choices == 4
    lls = [-3.0] * choices
    lls[gold], lls[(gold + 1) % choices] = -1.0, -2.5
    columns = example_columns(task, doc, {"acc": True, "acc_norm": 0.0, "acc_mutual_info": 0.5}, lls)
    assert columns == {"acc": 1.0, "acc_norm": 0.0, "loglik": -1.0, "margin": 1.5, "chance": 1 / 4}


@pytest.mark.slow
def test_exact_shapley_on_a_real_model_equals_the_definition(tiny4, tmp_path, local_data):
    out = tmp_path / "scores.json"
    result = CliRunner().invoke(app, score_args(tiny4, out, "--method", "exact", "--plot", str(tmp_path / "s.png")))
    assert result.exit_code == 0, result.output
    scores = json.loads(out.read_text())
    values = stored_values(out.with_suffix(".sqlite"), "loglik")
    assert len(values) == 16 and scores["evaluations"] == 16
    phi = np.zeros(4)
    for order in itertools.permutations(range(4)):
        x = np.zeros(4, bool)
        for p in order:
            before = values[key(x)]
            x[p] = True
            phi[p] += values[key(x)] - before
    phi /= 24
    np.testing.assert_allclose([u["value"] for u in scores["units"]], phi, atol=1e-9)
    assert scores["efficiency"]["gap"] == pytest.approx(0, abs=1e-9)
    assert all(u["sample_stderr"] > 0 for u in scores["units"])
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    # One stored value, checked against an independent evaluation of that variant (hf's loop).
    lm = LayeredLM(pretrained=str(tiny4), drop="1,3", dtype="float32", device="cpu", batch_size=32, fast=False)
    import lm_eval
    from lm_eval.tasks import TaskManager

    res = lm_eval.simple_evaluate(model=lm, tasks=["arc_easy_local"], limit=3, log_samples=True,
                                  task_manager=TaskManager(include_path=str(TASKS)))
    ll = [float(s["filtered_resps"][int(s["target"])][0]) for s in res["samples"]["arc_easy_local"]]
    assert values[key(np.array([1, 0, 1, 0], bool))] == pytest.approx(np.mean(ll), abs=1e-5)


@pytest.mark.slow
def test_interrupted_run_says_how_to_resume_and_resumes_to_the_uninterrupted_values(tiny_llama_dir, tmp_path, local_data):
    env = {**os.environ, "LM_EVAL_LAYERS_DATA": str(DATA)}
    args = ["--method", "shapley", "--estimator", "permutation", "--budget", "24", "--seed", "3"]
    full = tmp_path / "full.json"
    subprocess.run([SURGERY, *score_args(tiny_llama_dir, full, *args)], env=env, check=True, capture_output=True)
    part = tmp_path / "part.json"
    proc = subprocess.Popen([SURGERY, *score_args(tiny_llama_dir, part, *args)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    store = part.with_suffix(".sqlite")
    deadline = time.time() + 300
    while time.time() < deadline:
        if store.exists():
            try:
                with sqlite3.connect(store) as db:
                    if db.execute("SELECT COUNT(*) FROM coalitions").fetchone()[0] >= 6:
                        break
            except sqlite3.OperationalError:
                pass
        time.sleep(0.3)
    proc.send_signal(signal.SIGINT)  # Ctrl-C: says what it kept and the command that resumes
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130 and not part.exists(), err[-2000:]  # interrupted before the end
    assert f"kept in {store}" in err and "continue with: surgery score" in err and err.rstrip().endswith("--resume")
    again = subprocess.run([SURGERY, *score_args(tiny_llama_dir, part, *args)], env=env, capture_output=True, text=True)
    assert again.returncode == 2 and "--resume" in again.stderr  # refuses to mix runs silently
    resumed = subprocess.run([SURGERY, *score_args(tiny_llama_dir, part, *args, "--resume")], env=env, check=True,
                             capture_output=True, text=True)
    assert "read back from the store" in resumed.stdout + resumed.stderr  # a resumed run says what it reused
    a, b = json.loads(full.read_text()), json.loads(part.read_text())
    assert b["reused"] >= 6 and b["new_evaluations"] < a["new_evaluations"]
    # Separate processes: equal up to float rounding (same batches and threads, but not promised bit-equal).
    assert [u["value"] for u in a["units"]] == pytest.approx([u["value"] for u in b["units"]], rel=1e-5, abs=1e-7)
    assert [u["stderr"] for u in a["units"]] == pytest.approx([u["stderr"] for u in b["units"]], rel=1e-5, abs=1e-7)


def _scores_file(path: Path, unit: str, values: list[float], num_layers: int = 6, model_type: str = "llama") -> Path:
    units = [{"name": f"{unit} {i}", "index": i, "value": v} for i, v in enumerate(values)]
    path.write_text(json.dumps({"unit": unit, "num_layers": num_layers, "model_type": model_type, "units": units}))
    return path


def test_drop_lowest_in_the_plugin_and_the_cli(tiny_llama_dir, tmp_path):
    blocks = _scores_file(tmp_path / "b.json", "block", [0.5, 0.01, 0.2, -0.1, 0.3, 0.02])
    lm = LayeredLM(pretrained=str(tiny_llama_dir), scores=str(blocks), drop_lowest=3, device="cpu")
    assert lm.plan.dropped == (1, 3, 5)
    halves = _scores_file(tmp_path / "h.json", "attn", [0.9, 0.1, 0.8, 0.05, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.95, 0.85])
    plan = PlanSpec.from_args(scores=read_scores(halves), drop_lowest=2).resolve(6)
    assert [(s.source, s.drop_attn, s.drop_mlp) for s in plan.slots if s.drop_attn or s.drop_mlp] == [(0, False, True), (1, False, True)]
    result = CliRunner().invoke(app, ["prune", str(tiny_llama_dir), "--scores", str(blocks), "--drop-lowest", "2",
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 4


def test_scores_from_another_model_are_refused(tiny_llama_dir, tmp_path):
    other = _scores_file(tmp_path / "o.json", "block", [0.1] * 24, num_layers=24)
    with pytest.raises(PlanError, match="scores file is for a model with 24 blocks, this one has 6"):
        LayeredLM(pretrained=str(tiny_llama_dir), scores=str(other), drop_lowest=2, device="cpu")
    arch = _scores_file(tmp_path / "a.json", "block", [0.1] * 6, model_type="gpt2")
    with pytest.raises(PlanError, match="scores file is for a gpt2 model, this one is llama"):
        LayeredLM(pretrained=str(tiny_llama_dir), scores=str(arch), drop_lowest=2, device="cpu")
    with pytest.raises(PlanError, match="go together"):
        PlanSpec.from_args(drop_lowest=2)
    nulls = tmp_path / "n.json"
    nulls.write_text(json.dumps({"unit": "block", "num_layers": 6, "model_type": None, "v_full": None, "efficiency": None,
                                 "units": [{"name": f"block {i}", "index": i, "value": 0.1 * i, "stderr": None} for i in range(6)]}))
    assert read_scores(nulls).lowest(2) == (0, 1)  # angular / bi files: null where a game's values would be
    nulls.write_text(json.dumps({"unit": "block", "num_layers": 6, "units": [{"name": "block 0", "index": 0, "value": None}]}))
    with pytest.raises(PlanError, match="has no value for unit block 0"):
        read_scores(nulls)
    with pytest.raises(PlanError, match="does not exist"):
        read_scores(tmp_path / "nope.json")


def test_a_scores_file_of_another_depth_is_refused_before_its_unit_count():
    deeper = Scores("block", 24, "llama", tuple(0.1 * i for i in range(24)))
    for k in (2, 40):  # 40 would also remove every unit: the depth is the mistake to name
        with pytest.raises(PlanError, match="scores file is for a model with 24 blocks, this one has 6"):
            deeper.lowest_for(k, 6, "llama")
    with pytest.raises(PlanError, match="scores file is for a gpt2 model, this one is llama"):
        Scores("block", 6, "gpt2", (0.0,) * 6).lowest_for(40, 6, "llama")
    with pytest.raises(PlanError, match="drop_lowest=6 would remove all 6 block units"):
        Scores("block", 6, "llama", (0.0,) * 6).lowest_for(6, 6, "llama")
    assert Scores("block", 6, "llama", (0.5, 0.01, 0.2, -0.1, 0.3, 0.02)).lowest_for(3, 6, "llama") == (1, 3, 5)


def test_prune_reports_the_depth_mismatch_before_the_count(tiny_llama_dir, tmp_path):
    deeper = _scores_file(tmp_path / "d.json", "block", [0.1] * 24, num_layers=24)
    result = CliRunner().invoke(app, ["prune", str(tiny_llama_dir), "--scores", str(deeper), "--drop-lowest", "40",
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: the scores file is for a model with 24 blocks, this one has 6"), result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_angular_and_block_influence(tiny_llama_dir, tmp_path, local_data):
    import hashlib

    wikitext = DATA / "wikitext2" / "wiki.test.raw"

    def strict(constant: str):
        raise AssertionError(f"{constant} is not JSON")

    for method in ("angular", "bi"):
        out = tmp_path / f"{method}.json"
        result = CliRunner().invoke(app, ["score", str(tiny_llama_dir), "--method", method, "--out", str(out)])
        assert result.exit_code == 0, result.output
        scores = json.loads(out.read_text(), parse_constant=strict)
        values = [u["value"] for u in scores["units"]]
        assert len(values) == 6 and all(0 < v < (1 if method == "angular" else 2) for v in values)
        assert all(u["stderr"] is None and u["ci_low"] is None for u in scores["units"])
        assert scores["efficiency"] is None and scores["v_full"] is None and scores["metric"] is None
        assert scores["calibration"] == {"path": str(wikitext.resolve()), "sha256": hashlib.sha256(wikitext.read_bytes()).hexdigest(),
                                         "windows": 16, "tokens": 128}
        shown = result.stdout + result.stderr
        assert result.stdout.split()[:2] == [method, "of"]  # the title names no estimator (the path may wrap)
        assert "± coalitions" not in shown and "± examples" not in shown
        assert "None" not in shown and "nan" not in shown and "v(N)" not in shown
        assert f"{method} on 16 windows of 128 tokens of {wikitext.resolve()}" in " ".join(result.stderr.split())
    fewer = CliRunner().invoke(app, ["score", str(tiny_llama_dir), "--method", "bi", "--tokens", "4x32", "--out", str(tmp_path / "few.json")])
    assert fewer.exit_code == 0 and json.loads((tmp_path / "few.json").read_text())["calibration"]["windows"] == 4
    assert json.loads((tmp_path / "few.json").read_text())["calibration"]["tokens"] == 32
    # Cross-check block 0's influence from output_hidden_states (its input and output).
    model = T.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    tok = T.AutoTokenizer.from_pretrained(tiny_llama_dir)
    from lm_eval_layers.similarity import block_similarity, calibration_batches

    batches = calibration_batches(tok, wikitext.read_text())
    sims = block_similarity(model, batches)
    with torch.no_grad():
        expected = np.mean([1 - torch.nn.functional.cosine_similarity(*model(b, output_hidden_states=True).hidden_states[0:2], dim=-1).mean().item()
                            for b in batches])
    assert sims["bi"][0] == pytest.approx(expected, rel=1e-5)


def test_score_refuses_bad_options_before_loading(tmp_path, tmp_path_factory):
    runner = CliRunner()
    empty = tmp_path_factory.mktemp("text") / "empty.txt"
    empty.write_text("\n  \n")
    for args, message in [
        (["--method", "magic"], "--method': Value error, 'magic' is not one of 'shapley'"),
        (["--unit", "head"], "--unit': Value error, 'head' is not one of 'block', 'halves', 'attn', 'mlp'"),
        (["--metric", "f1"], "--metric': Value error, 'f1' is not one of 'acc'"),
        (["--method", "angular", "--unit", "attn"], "error: --method angular scores blocks; use --unit block"),
        (["--estimator", "mc"], "error: --estimator 'mc' is not one of ramc, ramc-kadd, regression, permutation, or shapiq:NAME"),
        (["--estimator", "shapiq:magic"], "error: --estimator shapiq:magic: unknown shapiq approximator; use shapiq:kernelshap"),
        (["--estimator", "regression", "--tol", "0.01"], "error: --tol needs --method shapley with --estimator ramc"),
        (["--method", "ablation", "--limit", "0"], "error: --limit 0: give at least 1"),
        (["--batch-size", "0"], "error: --batch-size 0: give at least 1"),
        (["--batch-size", "-4"], "error: --batch-size -4: give at least 1"),
        (["--tasks", ","], "error: --tasks is empty"),
        (["--tasks", "arc_easy_locl"], "error: task 'arc_easy_locl' is not known to lm-eval or to the shipped tasks; did you mean arc_easy_local"),
        (["--include-path", str(tmp_path / "none")], "error: task folder"),
        (["--method", "bi", "--calibration", str(empty)], f"error: --calibration {empty} is empty"),
        (["--tokens", "4x32"], "error: --tokens sets the calibration windows of --method angular or bi"),
        (["--method", "bi", "--tokens", "4"], "error: --tokens '4': write WINDOWSxTOKENS"),
    ]:
        result = runner.invoke(app, ["score", "does-not-matter", "--out", str(tmp_path / "s.json"), *args])
        text = " ".join(result.stderr.replace("│", " ").split())  # Typer boxes its usage errors
        assert result.exit_code == 2 and message in text, result.output
    assert not list(tmp_path.iterdir())  # nothing written


def test_an_existing_out_is_refused_unless_forced(tmp_path, local_data):
    """Before the model loads: the earlier scores.json is kept; --force passes the check (then
    the model that does not exist is what stops the run)."""
    out = tmp_path / "scores.json"
    out.write_text("{}")
    runner = CliRunner()
    for method in ("angular", "ablation"):
        result = runner.invoke(app, ["score", str(tmp_path / "missing"), "--method", method, "--out", str(out)])
        assert result.exit_code == 2 and result.stderr == f"error: --out {out} exists; choose another name or pass --force to replace it\n"
        forced = runner.invoke(app, ["score", str(tmp_path / "missing"), "--method", method, "--out", str(out), "--force"])
        assert forced.exit_code == 2 and forced.stderr.startswith("error: cannot load a model config from"), forced.output
    assert out.read_text() == "{}" and sorted(p.name for p in tmp_path.iterdir()) == ["scores.json"]


def test_a_metric_a_task_lacks_is_refused_before_the_first_coalition(tiny4, tmp_path, local_data, monkeypatch):
    """boolq has no acc_norm: refused once the requests are prepared, after v(N) alone, with
    the metrics it does report; no scores.sqlite is left behind."""
    from lm_eval_layers.evaluate import Evaluator

    calls = []
    real = Evaluator.evaluate
    monkeypatch.setattr(Evaluator, "evaluate", lambda self, plan, *a, **k: calls.append(plan) or real(self, plan, *a, **k))
    out = tmp_path / "s.json"
    result = CliRunner().invoke(app, ["score", str(tiny4), "--tasks", "boolq_local", "--include-path", str(TASKS),
                                      "--limit", "2", "--method", "exact", "--metric", "acc_norm", "--out", str(out)])
    assert result.exit_code == 2, result.output
    line = result.stderr.strip().splitlines()[-1]
    assert line == "error: --metric acc_norm is not reported by boolq_local; use acc or loglik or margin", result.stderr
    assert len(calls) == 1 and calls[0].is_identity  # v(N) only, of 16 coalitions
    assert not list(tmp_path.iterdir())


def test_scoring_from_python_without_the_cli(tiny4, tmp_path, local_data, monkeypatch):
    """`score_model` on a loaded model: leave-one-out values equal v(N) − v(N∖{i}) measured
    directly, with the evaluations kept in memory (no file written)."""
    from lm_eval_layers.evaluate import Evaluator
    from lm_eval_layers.importance.session import load_model, score_model
    from lm_eval_layers.importance.settings import ScoreSettings
    from lm_eval_layers.task_suite import task_manager

    monkeypatch.chdir(tmp_path)
    settings = ScoreSettings(str(tiny4), method="ablation", include_path=TASKS, limit=3, metric="loglik")
    lm = load_model(settings)
    document = score_model(lm, settings)
    evaluator = Evaluator(lm, ["arc_easy_local"], task_manager(TASKS), 3)

    def v(**plan) -> float:
        return value_of(evaluator.evaluate(PlanSpec.from_args(**plan)).examples, "loglik")

    full = v()
    assert [u["value"] for u in document["units"]] == pytest.approx([full - v(drop=i) for i in range(4)], abs=1e-9)
    assert document["new_evaluations"] == 6 and document["v_full"] == pytest.approx(full)
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_two_processes_split_the_coalitions_into_one_store(tiny_llama_dir, tmp_path, local_data):
    """`torchrun` with two CPU processes (gloo): each evaluates its share of the coalitions,
    rank 0 stores all of them and reports the values of a single-process run."""
    env = {**os.environ, "LM_EVAL_LAYERS_DATA": str(DATA)}
    args = ["--method", "shapley", "--estimator", "permutation", "--budget", "16", "--seed", "5"]
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    subprocess.run([SURGERY, *score_args(tiny_llama_dir, one, *args)], env=env, check=True, capture_output=True)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "surgery", *score_args(tiny_llama_dir, two, *args)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert a["evaluations_per_process"] == [a["new_evaluations"]]
    assert len(b["evaluations_per_process"]) == 2 and min(b["evaluations_per_process"]) > 0  # both did work
    assert sum(b["evaluations_per_process"]) == b["new_evaluations"] == a["new_evaluations"]
    # torchrun runs each process with one thread, so log-likelihoods (means of ~-30) differ from the
    # single-process run at float rounding (seen: 2.5e-6 on values of ~1e-2); a missing or doubled
    # coalition moves values by 1e-3 or more.
    assert [u["value"] for u in b["units"]] == pytest.approx([u["value"] for u in a["units"]], abs=5e-5)
    split, single = stored_values(two.with_suffix(".sqlite"), "loglik"), stored_values(one.with_suffix(".sqlite"), "loglik")
    assert split.keys() == single.keys()
    assert [split[c] for c in sorted(split)] == pytest.approx([single[c] for c in sorted(single)], rel=1e-5, abs=1e-6)
    assert proc.stdout.count("shapley (permutation) of") == 1  # one table, from rank 0


@pytest.mark.slow
def test_defaults_work_from_any_directory(tiny_llama_dir, tmp_path):
    """A new user's first command, run outside the repository with no --include-path: the
    shipped tasks are found; a model path that does not exist is one line, exit 2."""
    env = {**os.environ, "LM_EVAL_LAYERS_DATA": str(DATA)}
    proc = subprocess.run([SURGERY, "score", str(tiny_llama_dir), "--method", "ablation", "--limit", "5"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores["tasks"] == ["arc_easy_local"] and len(scores["units"]) == 6
    bad = subprocess.run([SURGERY, "score", str(tmp_path / "missing"), "--method", "ablation", "--out", "x.json"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and bad.stderr.startswith("error: cannot load a model config from") and bad.stderr.count("\n") == 1
    assert not (tmp_path / "x.json").exists() and not (tmp_path / "x.sqlite").exists()


@pytest.mark.slow
def test_sampling_on_a_model_with_few_coalitions_finishes(tiny4, tmp_path, local_data):
    """4 blocks have 16 coalitions: a budget of 60 buys the exact values (once every coalition
    is cached, sampling more orders costs nothing, so it must not be what ends the run)."""
    env = {**os.environ, "LM_EVAL_LAYERS_DATA": str(DATA)}
    out = tmp_path / "perm.json"
    subprocess.run([SURGERY, *score_args(tiny4, out, "--estimator", "permutation", "--budget", "60")],
                   env=env, check=True, capture_output=True, timeout=300)
    scores = json.loads(out.read_text())
    assert scores["evaluations"] == 16 and all(u["stderr"] == 0 for u in scores["units"])
    exact = tmp_path / "exact.json"
    subprocess.run([SURGERY, *score_args(tiny4, exact, "--method", "exact")], env=env, check=True, capture_output=True, timeout=300)
    assert [u["value"] for u in scores["units"]] == pytest.approx([u["value"] for u in json.loads(exact.read_text())["units"]], abs=1e-9)


@pytest.mark.slow
def test_tol_stops_on_rank_0_and_resume_and_two_processes_keep_the_round(tiny_llama_dir, tmp_path, local_data):
    """`--tol`: rounds planned up front, the stop decided on rank 0 after a round and broadcast.
    A loose tolerance is met at once, so the run stops after the minimum number of rounds; a
    resumed run and a two-process run stop at the same round with the same values."""
    from lm_eval_layers.importance import stopping

    env = {**os.environ, "LM_EVAL_LAYERS_DATA": str(DATA)}
    args = ["--estimator", "ramc", "--budget", "60", "--seed", "2", "--tol", "100"]
    one = tmp_path / "one.json"
    subprocess.run([SURGERY, *score_args(tiny_llama_dir, one, *args)], env=env, check=True, capture_output=True, timeout=600)
    a = json.loads(one.read_text())
    assert (a["stop_reason"], a["rounds"], a["rounds_planned"]) == ("tolerance", stopping.MIN_ROUNDS, 8)
    assert a["evaluations"] == a["round_budget"] < 60 and a["widest_half_width"] <= 100
    one.unlink()
    subprocess.run([SURGERY, *score_args(tiny_llama_dir, one, *args, "--resume")], env=env, check=True, capture_output=True, timeout=600)
    again = json.loads(one.read_text())
    assert again["new_evaluations"] == 0 and again["rounds"] == a["rounds"]
    assert [u["value"] for u in again["units"]] == [u["value"] for u in a["units"]]
    two = tmp_path / "two.json"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "surgery", *score_args(tiny_llama_dir, two, *args)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    b = json.loads(two.read_text())
    assert (b["stop_reason"], b["rounds"], b["evaluations"]) == (a["stop_reason"], a["rounds"], a["evaluations"])
    assert min(b["evaluations_per_process"]) > 0
    assert [u["value"] for u in b["units"]] == pytest.approx([u["value"] for u in a["units"]], abs=5e-5)


@pytest.mark.slow
def test_the_store_answers_only_for_the_model_files_and_settings_that_produced_it(tiny4, tmp_path, local_data):
    """`--resume` reuses stored coalitions of the same model, dtype, tasks and limit only: another
    model, a model folder retrained in place, or another --limit are evaluated afresh."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny4, model)
    out = tmp_path / "s.json"
    runner = CliRunner()

    def run(*extra: str) -> dict:
        result = runner.invoke(app, [*score_args(model, out, "--method", "ablation", "--resume", "--force"), *extra])
        assert result.exit_code == 0, result.output
        return json.loads(out.read_text())

    first = run()
    assert first["reused"] == 0 and first["new_evaluations"] == 6  # v(N), v(∅) and four leave-one-out variants
    assert run()["reused"] == 6  # the same model and settings: all reused
    assert run("--limit", "2")["reused"] == 0  # another document limit
    weights = model / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # retrained in place
    again = run()
    assert again["reused"] == 0 and again["new_evaluations"] == 6


def test_a_store_beside_an_out_in_a_new_folder_creates_the_folder(tmp_path):
    """`surgery score/search --out new/dir/x.json` keep their store beside --out: its folder is
    made (as prune makes its --out), not an sqlite3 'unable to open database file' after loading."""
    from lm_eval_layers.importance.store import Store

    store = Store(tmp_path / "new" / "dir" / "scores.sqlite", {"test": 1})
    store.put("0101", {"task": {"acc": [1.0]}})
    assert (tmp_path / "new" / "dir" / "scores.sqlite").is_file() and len(store) == 1


def test_the_ablation_table_shows_only_what_ablation_has():
    """Leave-one-out values have no coalition-sampling error (0 for every unit) and no efficiency
    property: neither a column of zeros nor a Σφ line is shown; Shapley keeps both."""
    from surgery.score import summary, table

    units = [{"name": str(i), "index": i, "value": 0.1 * i, "rank": 3 - i, "stderr": 0.0, "sample_stderr": 0.01}
             for i in range(3)]
    result = {"method": "ablation", "estimator": None, "metric": "acc", "model": "m", "units": units, "evaluations": 4,
              "efficiency": {"sum_phi": 0.3, "v_full_minus_v_empty": 0.5}}

    def columns(doc: dict) -> list[str]:
        return [str(c.header) for c in table(doc).columns]

    assert columns(result) == ["rank", "unit", "value", "± examples"]
    assert "Σφ" not in summary(result) and summary(result).startswith("4 coalitions")
    shapley = {**result, "method": "shapley", "units": [{**u, "stderr": 0.02} for u in units]}
    assert columns(shapley) == ["rank", "unit", "value", "± coalitions", "± examples"]
    assert "Σφ = 0.3000" in summary(shapley)
