"""Training-free repair: the fitted map equals an independent float64 closed form; the repaired
variant in memory, on disk and under lm-eval's loaders computes the same; the original model is
untouched; fits are cached per model, plan and calibration; what cannot be folded is refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as T

from conftest import make_model
from lm_eval_layers.arch import layout_for
from lm_eval_layers.errors import LayersError, PlanError, UnsupportedArchitecture
from lm_eval_layers.plan import LayerPlan, PlanSpec
from lm_eval_layers.repair.fit import fit_repair
from lm_eval_layers.variant import apply_plan

pytestmark = pytest.mark.usefixtures("no_grad")
WORDS = "the of and a to in is was for on as with by at from his that it an were are which this be".split()


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    g = torch.Generator().manual_seed(0)
    words = [WORDS[i] for i in torch.randint(0, len(WORDS), (6000,), generator=g).tolist()]
    path = tmp_path_factory.mktemp("calibration") / "calibration.txt"
    path.write_text(" ".join(words))
    return path


class SmallVocab:
    """A real tokenizer's ids folded into a tiny model's 128-token vocabulary."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def __call__(self, text, return_tensors=None):
        return type("Encoded", (), {"input_ids": self.tokenizer(text, return_tensors="pt").input_ids % 128})


@pytest.fixture(scope="module")
def small_vocab(tokenizer_dir) -> SmallVocab:
    return SmallVocab(T.AutoTokenizer.from_pretrained(tokenizer_dir))


def plan_for(text_file: Path, drop: str, **repair) -> LayerPlan:
    return PlanSpec.from_args(drop=drop, repair=repair.pop("method", "lstsq"), calibration=str(text_file),
                              tokens=repair.pop("tokens", "8x64"), **repair).resolve(6)


def closed_form(model, windows, a: int, b: int, ridge: float = 0.0, variant=None) -> torch.Tensor:
    """T from every activation at once: block outputs from `output_hidden_states`, M from a hook."""
    layout = layout_for(model)
    recorded = []
    proj = layout.find_blocks(model)[a - 1].get_submodule(layout.mlp_out[0])
    if variant is not None:  # X and M from the repaired variant, Y from the unpruned model
        y = model(input_ids=windows, output_hidden_states=True).hidden_states[b + 1]
        with variant() as v:
            k = next(i for i, s in enumerate(v.plan.slots) if s.source == a - 1)
            handle = v.blocks[k].get_submodule(layout.mlp_out[0]).register_forward_hook(lambda m, i, o: recorded.append(o))
            x = model(input_ids=windows, output_hidden_states=True).hidden_states[k + 1]
    else:
        handle = proj.register_forward_hook(lambda m, i, o: recorded.append(o))
        states = model(input_ids=windows, output_hidden_states=True).hidden_states
        x, y = states[a], states[b + 1]
    handle.remove()
    d = x.shape[-1]
    x, y, m = (v.reshape(-1, d).double() for v in (x, y, recorded[0]))
    mm = m.T @ m
    s = ridge * torch.trace(mm) / d
    return torch.linalg.solve(mm + s * torch.eye(d, dtype=torch.float64), m.T @ (y - x + m) + s * torch.eye(d, dtype=torch.float64))


def windows_of(text_file: Path, tok, n: int = 8, t: int = 64) -> torch.Tensor:
    from lm_eval_layers.calibration import calibration_windows

    return calibration_windows(tok, text_file.read_text(), n, t)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "falcon", "bloom", "starcoder2"])
def test_fitted_map_equals_the_closed_form(arch, text_file, small_vocab):
    model = make_model(arch)
    for ridge in (0.0, 0.05):
        plan = plan_for(text_file, "2-3", ridge=ridge)
        fit = fit_repair(model, small_vocab, plan)
        expected = closed_form(model, windows_of(text_file, small_vocab), 2, 3, ridge)
        assert (fit.transforms[1] - expected).norm() / expected.norm() <= 1e-6
        assert fit.report[0]["tokens"] == 8 * 64 and 0 < fit.report[0]["residual_vs_drop"] < 1


def test_the_repaired_block_outputs_x_minus_m_plus_m_t_and_restore_is_exact(text_file, small_vocab):
    model = make_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = plan_for(text_file, "2-3")
    fit = fit_repair(model, small_vocab, plan)
    ids = windows_of(text_file, small_vocab)[:2]
    layout = layout_for(model)
    mlp_out = []
    handle = model.model.layers[1].mlp.down_proj.register_forward_hook(lambda mod, i, o: mlp_out.append(o))
    x = model(input_ids=ids, output_hidden_states=True).hidden_states[2]
    handle.remove()
    m = mlp_out[0].double()
    with apply_plan(model, plan, fit.tensors(model, plan)) as variant:
        repaired = model(input_ids=ids, output_hidden_states=True).hidden_states[2]
        assert variant.blocks[1].mlp.down_proj.weight is not variant.original_blocks[1].mlp.down_proj.weight
        assert variant.blocks[0].mlp.down_proj.weight is variant.original_blocks[0].mlp.down_proj.weight
    assert torch.allclose(repaired.double(), x.double() - m + m @ fit.transforms[1], atol=1e-5)
    assert layout.find_blocks(model) is model.model.layers
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_runs_are_fitted_in_order_on_the_variant_repaired_so_far(text_file, small_vocab):
    model = make_model("llama")
    plan = plan_for(text_file, "1,3-4")
    fit = fit_repair(model, small_vocab, plan)
    windows = windows_of(text_file, small_vocab)
    first = closed_form(model, windows, 1, 1)
    assert (fit.transforms[0] - first).norm() / first.norm() <= 1e-6
    only_first = {0: fit.transforms[0]}
    from lm_eval_layers.repair.fold import folded_tensors

    second = closed_form(model, windows, 3, 4, variant=lambda: apply_plan(
        model, plan, folded_tensors(model.model.layers, layout_for(model), plan, only_first)))
    assert (fit.transforms[2] - second).norm() / second.norm() <= 1e-6
    assert [r["folded_into"] for r in fit.report] == [0, 2]


def test_cosine_starts_from_lstsq_and_lowers_the_cosine_distance(text_file, small_vocab):
    model = make_model("llama")
    lstsq = fit_repair(model, small_vocab, plan_for(text_file, "2-3"))
    cosine = fit_repair(model, small_vocab, plan_for(text_file, "2-3", method="cosine"))
    assert not torch.equal(lstsq.transforms[1], cosine.transforms[1])
    assert (lstsq.transforms[1] - cosine.transforms[1]).norm() / lstsq.transforms[1].norm() < 0.5


def test_fits_are_cached_per_model_plan_and_calibration(tmp_path, monkeypatch, text_file, small_vocab):
    monkeypatch.setenv("LM_EVAL_LAYERS_CACHE", str(tmp_path / "cache"))
    model = make_model("llama")
    identity = {"model": "tiny-llama", "files": None}
    plan = plan_for(text_file, "2-3")
    first = fit_repair(model, small_vocab, plan, identity=identity)
    again = fit_repair(model, small_vocab, plan, identity=identity)
    assert not first.cached and again.cached and torch.equal(first.transforms[1], again.transforms[1])
    other_text = tmp_path / "other.txt"
    other_text.write_text(text_file.read_text()[::-1])
    assert not fit_repair(model, small_vocab, plan_for(other_text, "2-3"), identity=identity).cached
    assert not fit_repair(model, small_vocab, plan_for(text_file, "2-3", ridge=0.1), identity=identity).cached
    assert not fit_repair(model, small_vocab, plan, identity={**identity, "model": "another"}).cached


def test_plan_records_the_repair_and_refuses_a_changed_calibration_text(tmp_path, text_file):
    text = tmp_path / "text.txt"
    text.write_text(text_file.read_text())
    plan = plan_for(text, "2-3", ridge=0.5)
    assert LayerPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    assert "repaired by lstsq" in plan.describe()
    assert "repair" not in PlanSpec.from_args(drop="2-3").resolve(6).to_dict()  # unrepaired records unchanged
    record = tmp_path / "layer_plan.json"
    record.write_text(json.dumps({"plan": plan.to_dict()}))
    assert PlanSpec.from_args(plan=str(record)).resolve(6) == plan
    text.write_text("changed")
    with pytest.raises(PlanError, match="changed since the plan was made"):
        PlanSpec.from_args(plan=str(record)).resolve(6)


@pytest.mark.parametrize("args,message", [
    (dict(drop="0-1"), "starts at block 0"),
    (dict(drop_attn="2"), "drop_attn"),
    (dict(insert="2:copy", drop="4"), "inserted"),
    (dict(), "needs blocks to replace"),
    (dict(drop="2", ridge=-1), "ridge"),
    (dict(drop="2", repair="svd"), "repair='svd'"),
    (dict(drop="2", tokens="8"), "WINDOWSxTOKENS"),
])
def test_plans_a_repair_cannot_fold_are_refused_before_loading(text_file, args, message):
    args = {"repair": "lstsq", "calibration": str(text_file), **args}
    with pytest.raises(LayersError, match=message):
        PlanSpec.from_args(**args).resolve(6)


def test_calibration_options_without_repair_are_refused():
    with pytest.raises(PlanError, match="add repair=lstsq"):
        PlanSpec.from_args(drop="2", ridge=0.1)


@pytest.mark.parametrize("arch,message", [("gemma2", "normalise the MLP output"), ("mixtral", "mixture of experts")])
def test_families_that_cannot_fold_are_refused(arch, message, text_file, small_vocab):
    with pytest.raises(UnsupportedArchitecture, match=message):
        fit_repair(make_model(arch), small_vocab, plan_for(text_file, "2-3"))


def test_calibration_shorter_than_the_windows_is_refused(text_file, small_vocab):
    with pytest.raises(LayersError, match="fewer than"):
        fit_repair(make_model("llama"), small_vocab, plan_for(text_file, "2-3", tokens="4000x64"))


def test_a_repaired_plan_without_its_tensors_is_refused(text_file):
    with pytest.raises(PlanError, match="fitted tensors"):
        apply_plan(make_model("llama"), plan_for(text_file, "2-3"))


@pytest.mark.slow
def test_written_repair_equals_the_plugin_and_loads_in_transformers(tmp_path, monkeypatch, tiny_llama_dir, text_file):
    """`surgery prune --repair` (a subprocess) writes what `layered` with repair= evaluates; every
    tensor but the folded projection is byte-identical to plain `surgery prune`."""
    from lm_eval_layers.model import LayeredLM
    from test_surgery import raw_tensors

    monkeypatch.setenv("LM_EVAL_LAYERS_CACHE", str(tmp_path / "cache"))
    surgery = Path(sys.executable).with_name("surgery")
    common = [str(surgery), "prune", str(tiny_llama_dir), "--drop", "3-4"]
    run = subprocess.run([*common, "--repair", "lstsq", "--calibration", str(text_file), "--tokens", "8x64",
                          "--out", str(tmp_path / "repaired"), "--verify"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    said = " ".join((run.stdout + run.stderr).split())
    assert "verified: max |Δ logit| = 0" in said and "map folded into block 2" in said
    assert subprocess.run([*common, "--out", str(tmp_path / "plain")], capture_output=True).returncode == 0
    repaired, plain = raw_tensors(tmp_path / "repaired"), raw_tensors(tmp_path / "plain")
    changed = sorted(k for k in plain if repaired[k] != plain[k])
    assert changed == ["model.layers.2.mlp.down_proj.weight"]
    record = json.loads((tmp_path / "repaired" / "layer_plan.json").read_text())
    assert record["plan"]["repair"]["method"] == "lstsq" and record["repair_fit"][0]["blocks"] == [3, 4]
    assert "**Repair**" in (tmp_path / "repaired" / "README.md").read_text()

    ids = torch.randint(3, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    written = T.AutoModelForCausalLM.from_pretrained(tmp_path / "repaired", dtype=torch.float32).eval()
    lm = LayeredLM(pretrained=str(tiny_llama_dir), drop="3-4", repair="lstsq", calibration=str(text_file),
                   tokens="8x64", dtype="float32", device="cpu", batch_size=1)
    assert torch.allclose(lm.model(ids).logits, written(ids).logits, atol=1e-5)
    from lm_eval.models.huggingface import HFLM

    hf = HFLM(pretrained=str(tmp_path / "repaired"), dtype="float32", device="cpu", batch_size=1)
    request = [(("ctx", "cont"), [5, 9, 11, 13], [17, 19])]
    assert abs(hf._loglikelihood_tokens(request)[0][0] - lm._loglikelihood_tokens(request)[0][0]) <= 1e-5
    bad = subprocess.run([*common, "--repair", "lstsq", "--ridge", "-1", "--out", str(tmp_path / "bad")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error:") and len(bad.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()


def test_bench_refuses_a_repair_it_would_not_measure():
    from lm_eval_layers.cost.settings import plan_from_text

    with pytest.raises(LayersError, match="does not change a variant's cost"):
        plan_from_text("drop=20-23,repair=lstsq")


def test_a_cached_fit_is_read_back_before_any_weight_loads(tmp_path, monkeypatch, tiny_llama_dir, text_file):
    """`surgery prune --repair` again on the same files and plan: the fit comes from the cache
    and the model is never loaded to fit it."""
    from lm_eval_layers.checkpoint import verify
    from lm_eval_layers.checkpoint.sources import open_model
    from lm_eval_layers.repair.fit import fit_source

    monkeypatch.setenv("LM_EVAL_LAYERS_CACHE", str(tmp_path / "cache"))
    plan = plan_for(text_file, "3-4")
    first = fit_source(open_model(str(tiny_llama_dir)), plan)

    def refuse(*_a, **_k):
        raise AssertionError("the model was loaded although its fit is cached")

    monkeypatch.setattr(verify, "load_source", refuse)
    again = fit_source(open_model(str(tiny_llama_dir)), plan)
    assert not first.cached and again.cached and torch.equal(first.transforms[2], again.transforms[2])
    with pytest.raises(AssertionError, match="was loaded"):  # another plan needs its own fit
        fit_source(open_model(str(tiny_llama_dir)), plan_for(text_file, "2-3"))
