"""`surgery ila`: gates on LoRA deltas for every family, the ε-stop, reproducible ila.json, a
planted ground truth, the comparisons and the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import ARCHS, DATA, make_model
from lm_eval_layers.arch import layout_for
from lm_eval_layers.errors import UsageError
from lm_eval_layers.training.gates import Gates, lora_layers
from lm_eval_layers.training.ila import EpsilonStop, EpsilonStopCallback, learn_gates
from lm_eval_layers.training.ila_command import write_ila_json
from lm_eval_layers.training.ila_compare import compare_runs, compare_scores, expected_jaccard
from lm_eval_layers.training.ila_file import SCHEMA, TIMING_FIELDS
from lm_eval_layers.training.ila_settings import ILASettings
from lm_eval_layers.training.selection import Selection, lora_config
from lm_eval_layers.training.gate_units import UnitKind
from surgery.cli import app


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and other jobs share these cores (also: fixed
    float summation order, so repeated runs are bit-identical)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def peft_model(arch: str, rank: int = 2):
    """A tiny model with LoRA on every linear module of every block, B drawn at random (PEFT
    starts B at zero, which would make every gate test pass trivially)."""
    from peft import get_peft_model

    model = make_model(arch)
    layout = layout_for(model)
    blocks = layout.find_blocks(model)
    config = lora_config(model, layout, Selection(tuple(range(len(blocks))), "all"), rank, 2.0 * rank, 0.0)
    peft = get_peft_model(model, config).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for _, _, layer in lora_layers(peft, layout):
            layer.lora_B["default"].weight.normal_(0, 0.5)
    return peft, layout


IDS = torch.tensor([[5, 17, 33, 2, 90, 64, 7, 12, 101, 3]])


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_gates_scale_exactly_the_lora_delta_of_their_unit(arch):
    peft, layout = peft_model(arch)
    want_peft = logits(peft)
    with peft.disable_adapter():
        want_base = logits(peft)
    assert (want_peft - want_base).abs().max() > 1e-3, "the adapters must change the logits"
    layers = lora_layers(peft, layout)
    gates = Gates.attach(peft, layout, UnitKind.module, init=0.0)
    assert [u.name for u in gates.units] == [f"{i}.{rel}" for i, rel, _ in layers]
    n = len(gates.units)

    gates.set_values(torch.ones(n))
    assert torch.equal(logits(peft), want_peft)  # σ = 1: the PEFT model
    gates.set_values(torch.zeros(n))
    torch.testing.assert_close(logits(peft), want_base, rtol=0, atol=1e-6)  # σ = 0: the base model

    k = n // 2 + 1  # a unit in the middle of the stack
    _, _, layer = layers[k]
    values = torch.ones(n)
    values[k] = 0.0
    gates.set_values(values)
    off = logits(peft)
    values[k] = 0.5
    gates.set_values(values)
    half = logits(peft)

    gates.detach(peft)
    assert torch.equal(logits(peft), want_peft)
    layer.enable_adapters(False)
    torch.testing.assert_close(off, logits(peft), rtol=0, atol=1e-6)  # one gate off = that adapter disabled
    assert (off - want_peft).abs().max() > 1e-5
    layer.enable_adapters(True)
    layer.scaling["default"] *= 0.5
    torch.testing.assert_close(half, logits(peft), rtol=0, atol=1e-5)  # σ = 0.5 = that adapter's scaling halved


def test_block_unit_ties_a_blocks_matrices_to_one_gate():
    peft, layout = peft_model("gpt2")  # Conv1D: c_attn, c_proj, c_fc, mlp.c_proj
    depth = len(layout.find_blocks(peft.get_base_model()))
    gates = Gates.attach(peft, layout, UnitKind.block, init=0.0)
    assert [u.name for u in gates.units] == [str(i) for i in range(depth)]
    values = torch.ones(depth)
    values[2] = 0.0
    gates.set_values(values)
    off = logits(peft)
    gates.detach(peft)
    for i, _, layer in lora_layers(peft, layout):
        if i == 2:
            layer.enable_adapters(False)
    torch.testing.assert_close(off, logits(peft), rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------
# stage 1's ε-stop


def stop_step(losses, epsilon=0.02, patience=2, window=10) -> int | None:
    """The step (1-based) at which the callback ends training, fed as the Trainer would."""
    from transformers import TrainerControl, TrainerState

    callback = EpsilonStopCallback(EpsilonStop(epsilon, patience, window))
    state, control = TrainerState(), TrainerControl()
    for step, loss in enumerate(losses, 1):
        state.global_step = step
        callback.on_log(None, state, control, logs={"loss": loss, "learning_rate": 1e-3})
        if control.should_training_stop:
            break
    return callback.stop_step


def test_flat_loss_stops_at_the_first_eligible_window():
    assert stop_step([2.0] * 100) == 30  # windows 1..3: two comparisons (patience 2), both calm
    assert stop_step([2.0] * 100, patience=1, window=5) == 10
    assert stop_step([2.0] * 29) is None


def test_falling_loss_does_not_stop_until_it_flattens():
    falling = [3.0 - 0.01 * t for t in range(200)]  # ≥ 5% lower every window of 10 steps
    assert stop_step(falling) is None
    # then flat at 1.0: the first flat window still differs from the last falling one by 5%,
    # the next two are calm, so the stop comes two windows later
    assert stop_step(falling + [1.0] * 100) == 230
    noisy = [2.0 + (0.3 if t % 2 else -0.3) * (t // 10 % 2) for t in range(100)]  # flat mean, alternating spread
    assert stop_step(noisy) == 30
    zigzag = [2.0 if t // 10 % 2 else 1.5 for t in range(200)]  # windows alternate 1.5 / 2.0: never stable
    assert stop_step(zigzag) is None


# --------------------------------------------------------------------------------------------
# planted ground truth


def planted_teacher(seed: int, sharpen: float = 20.0, scale: float = 2.0, samples: int = 1024, length: int = 32):
    """(base, the 3 planted unit names, examples sampled from the teacher, every unit name).

    The teacher is the base plus a rank-2 change of norm `scale`·‖W‖ in 3 units drawn at random
    among the matrices that write values (v/o/gate/up/down: a change to q or k passes through
    the attention softmax of this tiny random model's near-zero scores and barely moves the
    output). Both share an LM head sharpened ×`sharpen`: with this initialisation a ×8 head
    leaves the teacher's samples near-uniform (4.47 nats of at most 4.85) and base and teacher
    within 0.01–0.08 nats of each other, so the text would carry no planted signal.
    """
    import copy
    import random

    from lm_eval_layers.training.examples import Example

    base = make_model("llama", seed=seed)
    with torch.no_grad():
        base.lm_head.weight.mul_(sharpen)
    teacher = copy.deepcopy(base)
    blocks = layout_for(teacher).find_blocks(teacher)
    units = [(i, rel) for i, block in enumerate(blocks) for rel, m in block.named_modules() if isinstance(m, torch.nn.Linear)]
    candidates = [u for u in units if not u[1].endswith(("q_proj", "k_proj"))]
    planted = random.Random(seed).sample(candidates, 3)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i, rel in planted:
            weight = blocks[i].get_submodule(rel).weight
            delta = torch.randn(weight.shape[0], 2, generator=generator) @ torch.randn(2, weight.shape[1], generator=generator)
            weight.add_(delta * scale * weight.norm() / delta.norm())
        torch.manual_seed(seed)
        start = torch.randint(3, teacher.config.vocab_size, (samples, 1))
        text = teacher.generate(start, do_sample=True, top_k=0, max_new_tokens=length - 1, min_new_tokens=length - 1, pad_token_id=0)
    examples = [Example(row.tolist(), row.tolist()) for row in text]
    return base, {f"{i}.{rel}" for i, rel in planted}, examples, [f"{i}.{rel}" for i, rel in units]


@pytest.mark.slow
def test_planted_units_are_found_where_the_lora_update_norm_fails(capsys):
    from math import comb

    settings = dict(rank=4, lr=1e-2, epsilon=0.005, window=10, max_steps=400, batch_size=16, max_length=64)
    lines, hits = [], []
    for seed in range(3):
        base, planted, examples, names = planted_teacher(seed)
        where = dict(model=f"planted seed {seed}", data="teacher samples", out=Path("unused.json"))  # not read here
        result = learn_gates(base, examples, 0, ILASettings(**where, seed=seed, **settings))
        assert [u.name for u in result.units] == names
        n = len(names)
        top = {names[i] for i in sorted(range(n), key=lambda i: -result.logits[i])[:3]}
        by_norm = {names[i] for i in sorted(range(n), key=lambda i: -result.delta_norms[i])[:3]}
        hits.append(len(top & planted))
        lines.append(f"seed {seed}: planted {sorted(planted)}; gates' top 3 {sorted(top)} ({len(top & planted)} of 3); "
                     f"‖BA‖ top 3 {sorted(by_norm)} ({len(by_norm & planted)} of 3); stage 1: "
                     + (f"ε-stop at step {result.stop_step}" if result.stop_step else f"{result.stage1_steps} steps (cap)"))
    chance = sum(comb(3, x) * comb(n - 3, 3 - x) for x in (2, 3)) / comb(n, 3)
    with capsys.disabled():
        print("\n" + "\n".join(lines) + f"\nchance of ≥2 of 3 in a random top 3 of {n}: {chance:.4f} (expected hits {9 / n:.2f})")
    assert all(h >= 2 for h in hits), hits


# --------------------------------------------------------------------------------------------
# ila.json, compare, the command line


@pytest.fixture(scope="module")
def qa_data(tmp_path_factory) -> Path:
    """32 conversations from the shared SFT data."""
    path = tmp_path_factory.mktemp("data") / "nq32.jsonl"
    path.write_text("\n".join((DATA / "sft" / "nq_open.jsonl").read_text().splitlines()[:32]) + "\n")
    return path


SHORT = dict(max_steps=6, gate_steps=4, batch_size=4, max_length=64, window=2)


def ranked(model: Path, data: Path, out: Path, plot: Path | None = None, **settings) -> dict:
    return write_ila_json(ILASettings(model=str(model), data=str(data), out=out, plot=plot, **{**SHORT, **settings}))


@pytest.mark.slow
def test_same_seed_and_data_give_the_same_ila_json(tiny_llama_dir, qa_data, tmp_path):
    a = ranked(tiny_llama_dir, qa_data, tmp_path / "a.json", tmp_path / "a.png", seed=3)
    b = ranked(tiny_llama_dir, qa_data, tmp_path / "b.json", seed=3)
    c = ranked(tiny_llama_dir, qa_data, tmp_path / "c.json", seed=4, unit=UnitKind.block)
    on_disk = json.loads((tmp_path / "a.json").read_text())
    assert on_disk == json.loads(json.dumps(a)) and (tmp_path / "a.png").stat().st_size > 0
    untimed = [{k: v for k, v in d.items() if k not in TIMING_FIELDS} for d in (a, b, c)]
    assert untimed[0] == untimed[1]
    assert untimed[0]["units"] != untimed[2]["units"]

    n = 6 * 7  # q, k, v, o, gate, up, down in each of 6 blocks
    assert a["schema"] == SCHEMA and a["num_layers"] == 6 and a["unit"] == "module" and len(a["units"]) == n
    assert a["data"]["records"] == 32 and a["data"]["format"] == "messages" and len(a["data"]["digest"]) == 64
    assert a["stage1"]["steps"] == len(a["stage1"]["loss_curve"]) and a["stage2"]["steps"] == 4
    assert {"lm_loss", "penalty", "mean_gate"} <= set(a["stage2"]["loss_curve"][0])
    assert sorted(u["rank"] for u in a["units"]) == list(range(1, n + 1))
    best = min(a["units"], key=lambda u: u["rank"])
    assert best["s"] == max(u["s"] for u in a["units"]) and best["name"] == a["top"]["10%"][0]
    assert [len(a["top"][k]) for k in ("10%", "25%", "50%")] == [4, 11, 21]
    assert sum(b["total"] for b in a["blocks"]) == pytest.approx(sum(u["gate"] for u in a["units"]))
    assert [u["name"] for u in c["units"]] == [str(i) for i in range(6)] and c["settings"]["unit"] == "block"


def test_expected_jaccard_is_exact():
    from itertools import combinations
    from math import comb

    for n, k in ((6, 2), (7, 3), (5, 5), (9, 1)):
        subsets = [set(s) for s in combinations(range(n), k)]
        brute = sum(len(a & b) / len(a | b) for a in subsets for b in subsets) / comb(n, k) ** 2
        assert expected_jaccard(n, k) == pytest.approx(brute, abs=1e-12)
    assert abs(expected_jaccard(42, 10) - 10 / (84 - 10)) > 1e-3  # the ratio of expectations is not it


def ila_doc(gates: list[float], names: list[str] | None = None) -> dict:
    """A minimal ila.json with the given gates (units named by index, one unit per block)."""
    names = names or [str(i) for i in range(len(gates))]
    order = sorted(range(len(gates)), key=lambda i: (-gates[i], i))
    rank = {i: r + 1 for r, i in enumerate(order)}
    units = [{"name": names[i], "block": i, "module": "*", "s": g, "gate": g, "rank": rank[i], "delta_norm": 0.0}
             for i, g in enumerate(gates)]
    return {"schema": SCHEMA, "unit": "block", "num_layers": len(gates), "units": units,
            "blocks": [{"block": i, "total": g, "units": 1} for i, g in enumerate(gates)]}


def test_compare_runs_and_against_a_scores_file(tmp_path):
    a = ila_doc([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0])
    b = ila_doc([0.0, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.9])
    rows = {r["top"]: r for r in compare_runs([("a", a), ("b", b)])}
    assert rows["10%"]["jaccard"] == 0.0 and rows["25%"]["jaccard"] == pytest.approx(2 / 4)  # top 3: {0,1,2} vs {9,1,2}
    assert rows["50%"]["jaccard"] == pytest.approx(4 / 6) and rows["50%"]["chance"] == pytest.approx(expected_jaccard(10, 5))
    with pytest.raises(UsageError, match="rank different units"):
        compare_runs([("a", a), ("c", ila_doc([0.5] * 9))])

    scores = {"schema": "lm-eval-layers/scores/v1", "unit": "block", "num_layers": 10, "method": "ablation",
              "units": [{"index": i, "value": v} for i, v in enumerate([9, 8, 7, 6, 5, 4, 3, 2, 1, 0])]}
    same = compare_scores("a", a, "s", scores)
    assert same["spearman"] == pytest.approx(1.0) and all(o["overlap"] == 1.0 for o in same["top_k"])
    flipped = compare_scores("a", a, "s", {**scores, "units": [{"index": i, "value": -v["value"]} for i, v in enumerate(scores["units"])]})
    assert flipped["spearman"] == pytest.approx(-1.0) and [o["overlap"] for o in flipped["top_k"]] == [0.0, 0.0, 0.0]
    with pytest.raises(UsageError, match="--unit block"):
        compare_scores("a", a, "s", {**scores, "unit": "attn"})

    files = []
    for name, doc in (("a.json", a), ("b.json", b), ("scores.json", scores)):
        files.append(str(tmp_path / name))
        (tmp_path / name).write_text(json.dumps(doc))
    result = CliRunner().invoke(app, ["ila", "compare", *files, "--out", str(tmp_path / "cmp.json")])
    assert result.exit_code == 0, result.output
    written = json.loads((tmp_path / "cmp.json").read_text())
    assert len(written["pairs"]) == 3 and len(written["scores"]) == 2
    assert "Jaccard" in result.stdout and "Spearman" in result.stdout


def test_compare_refuses_files_without_what_it_reads_in_one_line(tmp_path):
    """An empty ranking, and ila.json or scores.json files missing a key, are one `error:` line
    naming the file and the key (not a ValueError or KeyError), and nothing is written."""
    a = ila_doc([0.9, 0.5, 0.1])
    scores = {"schema": "lm-eval-layers/scores/v1", "unit": "block", "num_layers": 3, "method": "ablation",
              "units": [{"index": i, "value": v} for i, v in enumerate([3, 2, 1])]}
    no_rank = json.loads(json.dumps(a))
    del no_rank["units"][2]["rank"]
    no_value = json.loads(json.dumps(scores))
    del no_value["units"][1]["value"]
    files = {"a.json": a, "empty.json": {**a, "units": []}, "no_rank.json": no_rank, "no_blocks.json": {k: v for k, v in a.items() if k != "blocks"},
             "no_units.json": {k: v for k, v in a.items() if k != "units"}, "scores.json": scores, "no_value.json": no_value,
             "no_unit.json": {k: v for k, v in scores.items() if k != "unit"}}
    for name, doc in files.items():
        (tmp_path / name).write_text(json.dumps(doc))
    cases = [
        (["a.json", "empty.json"], "empty.json ranks no units"),
        (["a.json", "no_rank.json"], "no_rank.json unit 2 has no 'rank'"),
        (["a.json", "no_units.json"], "no_units.json has no 'units'"),
        (["no_blocks.json", "scores.json"], "no_blocks.json has no 'blocks'"),
        (["a.json", "no_value.json"], "no_value.json unit 1 has no 'value'; give a scores.json written by `surgery score"),
        (["a.json", "no_unit.json"], "no_unit.json has no 'unit'"),
    ]
    for names, message in cases:
        out = tmp_path / "cmp.json"
        result = CliRunner().invoke(app, ["ila", "compare", *(str(tmp_path / n) for n in names), "--out", str(out)])
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (names, result.stderr)
        assert not out.exists()


def test_ila_option_mistakes_are_one_line_before_anything_is_read(tmp_path):
    """Refused by the settings, before the model is opened (it does not even exist here)."""
    cases = [
        (["--lora-alpha", "0"], "--lora-alpha 0.0 must be positive"),
        (["--plot", "gates.jpg"], "--plot gates.jpg: the heat map is a PNG"),
        (["--rank", "0"], "--rank 0: the LoRA rank must be a positive whole number"),
        *([(["--dtype", "float16"], "--dtype float16 trains with loss scaling on a GPU only")] if not torch.cuda.is_available() else []),
    ]
    for args, message in cases:
        result = CliRunner().invoke(app, ["ila", str(tmp_path / "no-model"), "--data", "d.jsonl", "--out", str(tmp_path / "ila.json"), *args])
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], (args, result.stderr)
    assert list(tmp_path.iterdir()) == []
    settings = ILASettings(model="m", data="d", out=tmp_path / "ila.json", rank=4)
    assert settings.resolved().alpha == 8.0 and settings.alpha is None and settings.resolved().resolved() == settings.resolved()
    assert "out" not in settings.recorded() and settings.recorded()["alpha"] == 8.0 and settings.recorded()["dtype"] == "float32"


def surgery(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([str(Path(sys.executable).with_name("surgery")), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_cli_runs_and_bad_inputs_write_nothing(tiny_llama_dir, qa_data, tmp_path):
    short = ["--max-steps", "4", "--gate-steps", "2", "--batch-size", "4", "--max-length", "64"]
    proc = surgery("ila", str(tiny_llama_dir), "--data", str(qa_data), "--out", "ila.json", "--plot", "ila.png",
                   "--unit", "block", *short, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    document = json.loads((tmp_path / "ila.json").read_text())
    assert document["unit"] == "block" and len(document["units"]) == 6 and (tmp_path / "ila.png").is_file()
    assert "ILA:" in proc.stdout and "stage 1: LoRA r=8" in proc.stderr

    unknown = tmp_path / "rows.jsonl"
    unknown.write_text('{"question": "q", "answer": "a"}\n')
    before = sorted(p.name for p in tmp_path.iterdir())
    for args, message in (
        (["--data", str(unknown)], "error: unknown record format: record 0 has fields answer, question"),
        (["--data", str(qa_data), "--budget", "1.5"], "error: --budget 1.5 must be a share of units in (0, 1)"),
    ):
        proc = surgery("ila", str(tiny_llama_dir), *args, "--out", "new.json", "--plot", "new.png", cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip().splitlines() == [proc.stderr.strip().splitlines()[-1]]
        assert proc.stderr.strip().startswith(message)
        assert sorted(p.name for p in tmp_path.iterdir()) == before
    proc = surgery("ila", str(tiny_llama_dir), "--data", str(qa_data), "--out", "ila.json", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --out") and "exists" in proc.stderr


def test_tied_gates_are_said_not_ranked_silently():
    """53 gates at one σ (a stage 2 that separated nothing) and a tie at a top-K boundary are
    warnings in ila.json and on the console; a clear ranking has none."""
    from lm_eval_layers.training.ila_report import tie_warnings

    assert tie_warnings([0.917] * 53) == [
        "all 53 gates are tied (σ ≈ 0.917): the ranking is arbitrary; raise --gate-steps or --gate-lr, or lower --budget"]
    clear = [0.9 - 0.05 * i for i in range(10)]
    assert tie_warnings(clear) == []
    boundary = clear[:2] + [clear[2]] * 2 + clear[4:]  # ranks 3 and 4 tied; the top 25% of 10 is 3 units
    assert tie_warnings(boundary) == ["the top 25% ends in a tie (ranks 3 and 4: σ ≈ 0.800): which units it holds is arbitrary"]
