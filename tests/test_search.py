"""`surgery search`: the fast path scores every candidate exactly as a full run of the variant
would; greedy removes what SLEB's loop removes, in the same order, for fewer block passes;
budgets and bad input."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import DEPTH, make_model
from lm_eval_layers.arch import layout_for
from lm_eval_layers.search.engine import CalibrationEngine
from lm_eval_layers.search.methods import Budget, Problem, greedy, last
from lm_eval_layers.search.removable import all_units, plan_without, unit_parameters
from lm_eval_layers.variant import apply_plan
from surgery.cli import app

pytestmark = pytest.mark.usefixtures("no_grad")
WINDOWS = torch.randint(3, 128, (6, 16), generator=torch.Generator().manual_seed(0))


def direct_nll(model, plan) -> torch.Tensor:
    """Per-window summed NLL of a variant, computed plainly (no cache, one window at a time)."""
    with apply_plan(model, plan):
        logp = model(WINDOWS).logits.float().log_softmax(-1)
    return -logp[:, :-1].gather(-1, WINDOWS[:, 1:, None]).squeeze(-1).sum(-1).double()


def direct_kl(model, plan) -> torch.Tensor:
    full = model(WINDOWS).logits.float().log_softmax(-1)
    with apply_plan(model, plan):
        logp = model(WINDOWS).logits.float().log_softmax(-1)
    return (full.exp() * (full - logp)).sum(-1).sum(-1).double()


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
@pytest.mark.parametrize("objective", ["nll", "kl"])
def test_cached_scores_equal_a_plain_run_of_each_variant(arch, objective):
    model = make_model(arch)
    engine = CalibrationEngine(model, WINDOWS, objective, batch_size=4)
    direct = direct_nll if objective == "nll" else direct_kl
    assert torch.allclose(engine.full_scores, direct(model, plan_without(DEPTH, [])), atol=1e-4)
    engine.rebase(plan_without(DEPTH, [3]))  # a reference other than the full model
    for removed in ([3, 1], [3, 4], [3, 5], [3, "attn.4"], [3, "mlp.0"], [3, "attn.5", "mlp.5"]):
        plan = plan_without(DEPTH, removed)
        assert torch.allclose(engine.score(plan), direct(model, plan), atol=1e-4), removed


def sleb(model, k: int) -> list[int]:
    """SLEB's loop as published: blocks deleted from a copy of the HF model, every candidate run
    whole, first and last block protected."""
    blocks_of = lambda m: layout_for(m).find_blocks(m)  # noqa: E731
    kept = list(range(DEPTH))
    removed = []
    for _ in range(k):
        best = None
        for candidate in kept[1:-1]:
            trial = copy.deepcopy(model)
            parent, name = layout_for(trial).parent_and_name(trial)
            setattr(parent, name, torch.nn.ModuleList(
                [blocks_of(trial)[i] for i, b in enumerate(range(DEPTH)) if b in kept and b != candidate]))
            logp = trial(WINDOWS).logits.float().log_softmax(-1)
            nll = -logp[:, :-1].gather(-1, WINDOWS[:, 1:, None]).sum().item()
            if best is None or nll < best[0]:
                best = (nll, candidate)
        removed.append(best[1])
        kept.remove(best[1])
    return removed


def problem(model, engine, removable, **budget) -> Problem:
    sizes = unit_parameters(model, layout_for(model), False)
    return Problem(engine, removable, sizes, sum(p.numel() for p in model.parameters()), Budget(**budget), model.config.model_type)


def test_greedy_removes_what_slebs_loop_removes_in_the_same_order():
    model = make_model("llama", seed=1)
    expected = sleb(model, 3)
    engine = CalibrationEngine(model, WINDOWS, "nll", batch_size=4)
    steps = greedy(problem(model, engine, list(range(1, DEPTH - 1)), remove=3))
    assert steps[-1].removed == expected
    assert [len(s.removed) for s in steps] == [1, 2, 3]
    # each candidate runs only the blocks after its change: fewer passes than SLEB's whole-model runs
    as_written = sum(n * (DEPTH - i - 1) for i, n in enumerate((4, 3, 2)))
    assert steps[-1].block_passes < 0.8 * as_written
    assert steps[0].runner_up is not None and steps[0].runner_up["objective"] >= steps[0].objective
    lo, hi = steps[0].margin_ci
    assert lo <= steps[0].runner_up["objective"] - steps[0].objective <= hi


def test_beam_is_at_least_as_good_as_greedy_and_last_takes_the_deepest():
    model = make_model("llama", seed=2)
    engine = CalibrationEngine(model, WINDOWS, "nll", batch_size=6)
    units = list(range(1, DEPTH - 1))
    g = greedy(problem(model, engine, units, remove=3))
    b = greedy(problem(model, engine, units, remove=3), beam=3)
    assert b[-1].objective <= g[-1].objective + 1e-9
    deepest = last(problem(model, engine, units, remove=2))
    assert deepest[-1].removed == [4, 3]
    assert deepest[-1].objective == pytest.approx(float(direct_nll(model, plan_without(DEPTH, [4, 3])).sum()) / (6 * 15), rel=1e-5)


def test_params_budget_with_halves_stops_once_the_share_is_met():
    model = make_model("llama", seed=3)
    engine = CalibrationEngine(model, WINDOWS, "kl", batch_size=6)
    layout = layout_for(model)
    sizes = unit_parameters(model, layout, True)
    total = sum(p.numel() for p in model.parameters())
    units = [u for u in all_units(DEPTH, True) if u.split(".")[1] not in ("0", str(DEPTH - 1))]
    steps = greedy(Problem(engine, units, sizes, total, Budget(keep_share=0.9), "llama"))
    assert steps[-1].params <= 0.9 * total < steps[-2].params if len(steps) > 1 else steps[-1].params <= 0.9 * total
    assert steps[-1].params == total - sum(sizes[u] for u in steps[-1].removed)


@pytest.fixture(scope="module")
def calibration(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cal") / "text.txt"
    path.write_text(" ".join(f"word{i % 97} and more text {i}" for i in range(3000)))
    return path


def invoke(*args):
    return CliRunner().invoke(app, ["search", *map(str, args)])


BAD = [
    (["--remove", "6"], "removes every unit"),
    (["--remove", "0"], "remove at least 1 unit"),
    (["--remove", "5"], "only 4 units are not protected"),
    (["--remove", "1", "--params", "50%"], "give one budget"),
    ([], "give one budget"),
    (["--params", "100%"], "--params 100% is outside (0, 100%)"),
    (["--params", "0"], "--params 0 is outside (0, 100%)"),
    (["--remove", "1", "--protect", "0-5"], "covers every block"),
    (["--remove", "1", "--method", "beam:0"], "--method beam:0"),
    (["--remove", "1", "--tokens", "100000x64"], "fewer than 100000 windows"),
    (["--remove", "1", "--tokens", "8"], "WINDOWSxTOKENS"),
    (["--remove", "1", "--unit", "halves", "--method", "angular"], "contiguous run of blocks; use --unit block"),
    (["--remove", "1", "--method", "scores:/no/such.json"], "no scores file at /no/such.json"),
    (["--remove", "1", "--method", "evolve:3"], "--method evolve:3: use one of"),
    (["--remove", "1", "--method", "evolve", "--generations", "0"], "--generations 0: give at least 1"),
    (["--remove", "1", "--method", "evolve", "--survivors", "20"], "--survivors 20 exceeds --offspring 16"),
    (["--remove", "1", "--objective", "acc", "--tasks", "arc_easy_locl"], "is not known"),
    (["--remove", "1", "--tasks", "arc_easy_local"], "are for a task objective"),
    (["--remove", "1", "--objective", "acc", "--limit", "0"], "give at least 1 document"),
    (["--remove", "1", "--objective", "acc", "--tasks", ","], "--tasks is empty"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[m for _, m in BAD])
def test_bad_input_is_one_line_and_writes_nothing(tiny_llama_dir, calibration, tmp_path, args, message):
    result = invoke(tiny_llama_dir, "--calibration", calibration, "--out", tmp_path / "s.json", *args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_search_command_writes_a_plan_prune_can_use(tiny_llama_dir, calibration, tmp_path):
    out = tmp_path / "search.json"
    proc = subprocess.run([str(Path(sys.executable).with_name("surgery")), "search", str(tiny_llama_dir), "--remove", "2",
                           "--calibration", str(calibration), "--tokens", "4x32", "--out", str(out), "--plot", str(tmp_path / "s.png")],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    assert [len(s["removed"]) for s in doc["steps"]] == [1, 2]
    assert doc["block_passes"] < doc["as_written_block_passes"]
    assert doc["plan"]["num_layers"] == DEPTH and len(doc["plan"]["slots"]) == DEPTH - 2
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    again = invoke(tiny_llama_dir, "--remove", "2", "--calibration", calibration, "--out", out)
    assert again.exit_code == 2 and "exists" in again.stderr

    # one plan, every executor: the plugin (plan=FILE) and surgery prune --plan FILE
    import transformers as T

    from lm_eval_layers.model import LayeredLM
    from lm_eval_layers.plan import LayerPlan

    plan = LayerPlan.from_dict(doc["plan"])
    assert LayeredLM(pretrained=str(tiny_llama_dir), plan=str(out), device="cpu").plan == plan
    pruned = tmp_path / "pruned"
    result = CliRunner().invoke(app, ["prune", str(tiny_llama_dir), "--plan", str(out), "--out", str(pruned)])
    assert result.exit_code == 0, result.output
    ids = torch.randint(3, 100, (1, 12), generator=torch.Generator().manual_seed(1))
    reference = T.AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    with apply_plan(reference, plan):
        expected = reference(ids).logits
    assert torch.equal(T.AutoModelForCausalLM.from_pretrained(pruned).eval()(ids).logits, expected)
    mixed = CliRunner().invoke(app, ["prune", str(tiny_llama_dir), "--plan", str(out), "--drop", "1", "--out", str(tmp_path / "x")])
    assert mixed.exit_code == 2 and "does not combine with drop" in mixed.stderr


def test_angular_removes_the_closest_contiguous_run():
    from lm_eval_layers.search.methods import _last_token_states, angular

    model = make_model("llama", seed=4)
    engine = CalibrationEngine(model, WINDOWS, "nll", batch_size=6)
    units = list(range(1, DEPTH - 1))
    (step,) = angular(problem(model, engine, units, remove=2))
    states = _last_token_states(engine)
    by_hand = {}
    for l in range(1, DEPTH - 2):  # runs of 2 inside blocks 1..4
        cos = torch.nn.functional.cosine_similarity(states[l], states[l + 2], dim=-1)
        by_hand[l] = float((torch.arccos(cos.clamp(-1, 1)) / torch.pi).mean())
    best = min(by_hand, key=by_hand.get)
    assert step.removed == [best, best + 1]


def test_bi_values_and_order_equal_shortgpts_formula_by_hand_on_unequal_batches():
    """ShortGPT's block influence BI_i = 1 − mean over tokens of cos(x_i, x_i+1), x_i the block's
    input and x_i+1 its output, computed from output_hidden_states (the final norm swapped for an
    identity, so the last entry is the last block's own output). The windows come in batches of
    4 and 2: a mean of per-batch means weighs the short batch's tokens double, which moves the
    values by up to 1e-2 and swaps blocks 1 and 3 in the order of this model."""
    from lm_eval_layers.search.methods import block_influence_order
    from lm_eval_layers.similarity import block_similarity

    model = make_model("llama", seed=4)
    norm, model.model.norm = model.model.norm, torch.nn.Identity()
    try:
        states = model(WINDOWS, output_hidden_states=True).hidden_states  # embeddings, then each block's output
    finally:
        model.model.norm = norm
    assert len(states) == DEPTH + 1
    cos = [torch.nn.functional.cosine_similarity(states[i], states[i + 1], dim=-1).double() for i in range(DEPTH)]
    bi = [float(1 - c.mean()) for c in cos]
    last_angular = [float((torch.arccos(c[:, -1].clamp(-1, 1)) / torch.pi).mean()) for c in cos]
    engine = CalibrationEngine(model, WINDOWS, "nll", batch_size=4)
    assert [len(b) for b in engine.batches] == [4, 2]
    sims = block_similarity(model, engine.batches)
    assert sims["bi"] == pytest.approx(bi, abs=1e-5)
    assert sims["angular"] == pytest.approx(last_angular, abs=1e-5)  # Gromov et al.'s distance at the last token
    units = list(range(1, DEPTH - 1))
    expected = sorted(units, key=lambda u: bi[u])
    assert expected not in (units, units[::-1])  # neither stack order nor `last`'s: the order says something
    assert block_influence_order(problem(model, engine, units, remove=2)) == expected


def test_evolve_is_bounded_deterministic_and_never_worse_than_its_start():
    from lm_eval_layers.search.evolve import evaluation_bound, evolve, start_set

    model = make_model("llama", seed=5)
    runs = []
    for _ in range(2):
        engine = CalibrationEngine(model, WINDOWS, "nll", batch_size=6)
        screen = CalibrationEngine(model, WINDOWS[:2], "nll", batch_size=6)
        p = Problem(engine, [1, 2, 3, 4], unit_parameters(model, layout_for(model), False),
                    sum(x.numel() for x in model.parameters()), Budget(remove=2), "llama", 7, None, screen)
        runs.append((evolve(p, generations=3, offspring=2, survivors=1), p))
    (steps, p), (again, _) = runs
    assert [(s.removed, s.objective) for s in steps] == [(s.removed, s.objective) for s in again]
    assert steps[0].removed == start_set(p) == [3, 4] and steps[0].generation == 0
    assert steps[-1].evaluations <= evaluation_bound(3, 2, 1)
    assert p.evaluations.count + p.screening.count == steps[-1].evaluations
    assert all(s.objective <= steps[0].objective for s in steps)
    assert all(len(s.removed) == 2 and set(s.removed) <= {1, 2, 3, 4} for s in steps)
    best = float(direct_nll(model, plan_without(DEPTH, steps[-1].removed)).sum()) / (6 * 15)
    assert steps[-1].objective == pytest.approx(best, rel=1e-5)


def test_resume_reads_every_stored_candidate_and_other_settings_never(tiny_llama_dir, calibration, tmp_path):
    out = tmp_path / "s.json"
    args = [tiny_llama_dir, "--remove", "2", "--calibration", calibration, "--tokens", "4x16", "--method", "evolve",
            "--generations", "2", "--offspring", "3", "--screen", "2", "--out", out]
    first = invoke(*args)
    assert first.exit_code == 0, first.output
    doc = json.loads(out.read_text())
    assert doc["evaluations"]["stored"] == 0 and (tmp_path / "s.sqlite").is_file()
    refused = invoke(*args, "--force")  # --force alone starts afresh; without it and --resume: refused
    assert refused.exit_code == 0
    out.unlink()  # a killed search leaves only its store
    again = invoke(*args)
    assert again.exit_code == 2 and "already holds evaluations" in again.stderr and len(again.stderr.strip().splitlines()) == 1
    resumed = invoke(*args, "--resume")
    assert resumed.exit_code == 0, resumed.output
    redo = json.loads(out.read_text())
    assert redo["evaluations"]["computed"] == 0 and redo["block_passes"] == 0
    strip = lambda d: [{k: v for k, v in s.items() if k not in ("seconds", "block_passes")} for s in d["steps"]]  # noqa: E731
    assert strip(redo) == strip(doc) and redo["plan"] == doc["plan"]
    out.unlink()
    other = invoke(*args[:-1], out, "--objective", "kl", "--resume")  # another objective: nothing read back
    assert other.exit_code == 0, other.output
    assert json.loads(out.read_text())["evaluations"]["stored"] == 0


def test_task_objective_scores_each_step_as_lm_eval_scores_its_plan(tiny_llama_dir, calibration, tmp_path, local_data):
    """Each step's objective is the mean over tasks of 1 − acc that lm-eval's own loop gives the
    step's plan; the search starts from the full model's cached prefix, so it costs fewer
    block passes than running every candidate whole."""
    from lm_eval_layers.evaluate import Evaluator
    from lm_eval_layers.model import LayeredLM
    from lm_eval_layers.plan import LayerPlan
    from lm_eval_layers.task_suite import task_manager

    out = tmp_path / "s.json"
    tasks = ["arc_easy_local", "piqa_local"]
    result = invoke(tiny_llama_dir, "--remove", "2", "--objective", "acc_norm", "--tasks", ",".join(tasks), "--limit", "6",
                    "--calibration", calibration, "--tokens", "2x16", "--out", out)
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert doc["tasks"] == tasks and doc["limit"] == 6 and doc["minimised"]["label"] == "1 − acc_norm"
    assert [len(s["removed"]) for s in doc["steps"]] == [1, 2]
    assert doc["block_passes"] < doc["as_written_block_passes"]
    lm = LayeredLM(pretrained=str(tiny_llama_dir), device="cpu")
    loop = Evaluator(lm, tasks, task_manager(), limit=6, prepared=False)
    for plan, expected in [(LayerPlan.identity(DEPTH), doc["full_objective"])] + [
            (plan_without(DEPTH, s["removed"]), s["objective"]) for s in doc["steps"]]:
        metrics = loop.evaluate(plan).metrics
        assert sum(1 - metrics[t]["acc_norm"] for t in tasks) / len(tasks) == pytest.approx(expected, abs=1e-9)


@pytest.mark.slow
def test_two_processes_split_each_step_and_choose_what_one_process_chooses(tiny_llama_dir, calibration, tmp_path):
    """`torchrun` with two CPU processes (gloo): the candidates of each greedy step (and evolve's
    screened children) are split, rank 0 stores every one of them and writes the plan a single
    process finds."""
    args = ["--remove", "3", "--calibration", str(calibration), "--tokens", "4x32"]
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run([str(Path(sys.executable).with_name("surgery")), "search", str(tiny_llama_dir), *args, "--out", str(one)],
                   env=env, check=True, capture_output=True)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "surgery", "search", str(tiny_llama_dir), *args, "--out", str(two)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert (a["processes"], b["processes"]) == (1, 2)
    assert [s["removed"] for s in b["steps"]] == [s["removed"] for s in a["steps"]] and b["plan"] == a["plan"]
    # one thread per torchrun process: sums differ from the single process at float rounding only
    assert [s["objective"] for s in b["steps"]] == pytest.approx([s["objective"] for s in a["steps"]], rel=1e-6)
    assert b["evaluations"] == a["evaluations"] == {"computed": 1 + 4 + 3 + 2, "stored": 0}  # the full model, then each step
    import sqlite3

    keys = lambda path: sorted(r[0] for r in sqlite3.connect(path).execute("SELECT coalition FROM coalitions"))  # noqa: E731
    assert keys(two.with_suffix(".sqlite")) == keys(one.with_suffix(".sqlite"))
    assert proc.stdout.count("greedy search of") == 1  # one table, from rank 0
    evolve = [*args, "--method", "evolve", "--generations", "3", "--offspring", "4", "--screen", "2", "--force"]
    for out, launcher in ((one, [str(Path(sys.executable).with_name("surgery"))]),
                          (two, [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "surgery"])):
        run = subprocess.run([*launcher, "search", str(tiny_llama_dir), *evolve, "--out", str(out)], env=env, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-3000:]
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert [s["removed"] for s in b["steps"]] == [s["removed"] for s in a["steps"]] and b["evaluations"] == a["evaluations"]


def test_task_scores_are_stored_for_the_tasks_as_they_were(tiny_llama_dir, calibration, tmp_path, local_data):
    """A task objective's store answers only for the same tasks, in the same order, with the same
    configs: an edited task YAML or reordered --tasks is computed afresh, not read back."""
    import shutil

    from lm_eval_layers.task_suite import tasks_dir

    yamls = tmp_path / "tasks"
    yamls.mkdir()
    shutil.copy(tasks_dir() / "utils.py", yamls)
    source = (tasks_dir() / "arc_easy_local.yaml").read_text().replace("task: arc_easy_local", "task: my_arc")
    (yamls / "my_arc.yaml").write_text(source)
    out = tmp_path / "s.json"
    args = [tiny_llama_dir, "--remove", "1", "--objective", "loglik", "--limit", "4", "--include-path", yamls,
            "--calibration", calibration, "--tokens", "2x16", "--out", out, "--force"]

    def run(tasks: str, *extra: str) -> dict:
        result = invoke(*args, "--tasks", tasks, *extra)
        assert result.exit_code == 0, result.output
        return json.loads(out.read_text())["evaluations"]

    assert run("my_arc,piqa_local")["stored"] == 0
    assert run("my_arc,piqa_local", "--resume") == {"computed": 0, "stored": 5}  # the full model and 4 candidates
    assert run("piqa_local,my_arc", "--resume")["stored"] == 0
    (yamls / "my_arc.yaml").write_text(source.replace('doc_to_text: "Question:', 'doc_to_text: "Q:'))
    assert run("my_arc,piqa_local", "--resume")["stored"] == 0
